"""Upgrading a model to a newer default-domain opset with onnx's version converter, weights untouched.

The converter serializes the model it is given; a model's large weights say nothing about its
opset, so only its skeleton (large initializers as typed inputs) goes through the converter and the
weights are put back afterwards, by name. Adapters that need a tensor's value (a Split's sizes, a
Reshape's shape) find it: such tensors are small and stay in the skeleton.
"""
from __future__ import annotations

import onnx
from onnx import version_converter

from .graph import is_large, skeleton


def default_opset(model: onnx.ModelProto) -> int:
    return next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """`model` at default-domain opset `target` (raises what the converter raises when it cannot)."""
    light = skeleton(model)
    large = {t.name: t for t in model.graph.initializer if is_large(t)}
    converted = version_converter.convert_version(light, target)
    graph = converted.graph
    kept = [i for i in graph.input if i.name not in large]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(large.values())
    del converted.metadata_props[:]
    converted.metadata_props.extend(model.metadata_props)
    return converted
