"""An ONNX graph as a trainable torch module, and its trained weights written back into the graph.

`TorchGraph(model)` runs the graph node by node with the torch operators of `torch_ops`; the float
initializers with more than one element (weights, biases, norm scales, low-rank factors) are its
parameters, everything else (shape constants, scalars such as a LayerNorm's epsilon or an attention
scale, integer tensors) is a fixed buffer. After training, `write_back(model)` copies the
parameters into the model's initializers, so the ONNX graph that comes out is the graph that went
in, node for node, with new weight values: same opset, same I/O names, nothing for an exporter to
get wrong. (torch.onnx.export, or onnx2torch plus an export, would rebuild a different graph, and
onnx2torch needs torchvision; see docs/distill.md.)

A graph this module does not cover (an op outside `torch_ops.OPS` and ONNX Runtime's ops in
`torch_contrib`, another domain, If/Loop/Scan subgraphs) is refused up front with one line naming
what is missing.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxopt import OnnxoptError
from onnxopt.graph import constant_node_value, has_subgraph

from .torch_contrib import CONTRIB_OPS
from .torch_ops import OPS, Attrs

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def unsupported(model: onnx.ModelProto) -> list[str]:
    """What in `model` the torch module cannot run, one entry per op type (with a node and a count)."""
    missing: Counter = Counter()
    example = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft" and node.op_type in CONTRIB_OPS:
            continue
        if node.domain not in ("", "ai.onnx"):
            what = f"{node.domain}.{node.op_type}"
        elif has_subgraph(node):
            what = f"{node.op_type} (a subgraph)"
        elif node.op_type != "Constant" and node.op_type not in OPS:
            what = node.op_type
        else:
            continue
        missing[what] += 1
        example.setdefault(what, node.name or node.output[0])
    return [f"{what} ({count}x, e.g. '{example[what]}')" for what, count in missing.items()]


def check_supported(model: onnx.ModelProto, who: str = "distill") -> None:
    missing = unsupported(model)
    if missing:
        raise OnnxoptError(f"{who}: the ONNX-to-torch converter does not cover {', '.join(missing)}",
                           f"it runs these ops: {', '.join(sorted(OPS))} and com.microsoft "
                           f"{', '.join(sorted(CONTRIB_OPS))}; or distill into a torch student "
                           "of your own (student=module:function)")


def trainable(tensor: onnx.TensorProto) -> bool:
    return tensor.data_type in _FLOATS and int(np.prod(tensor.dims)) > 1


class TorchGraph(torch.nn.Module):
    """The graph of an ONNX model run by torch (see the module docstring)."""

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None):
        """`outputs`: the tensors `forward` returns (default: the graph outputs)."""
        super().__init__()
        check_supported(model)
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        self.nodes = list(graph.node)
        self.attrs = [Attrs(node) for node in self.nodes]
        initializer_names = {t.name for t in graph.initializer}
        self.input_names = [vi.name for vi in graph.input if vi.name not in initializer_names]
        self.output_names = list(outputs) if outputs else [vi.name for vi in graph.output]
        produced = {o for node in graph.node for o in node.output} | set(self.input_names)
        missing = [name for name in self.output_names if name not in produced]
        if missing:
            raise OnnxoptError(f"distill: the model has no tensor {', '.join(repr(m) for m in missing)}",
                               "name graph outputs or tensors that nodes produce")
        self.weights = torch.nn.ParameterList()
        self.parameter_of: dict[str, int] = {}  # initializer name -> index in `weights`
        self.constants: dict[str, torch.Tensor] = {}
        for tensor in graph.initializer:
            value = torch.from_numpy(np.array(numpy_helper.to_array(tensor)))
            if trainable(tensor):
                self.parameter_of[tensor.name] = len(self.weights)
                self.weights.append(torch.nn.Parameter(value))
            else:
                self.constants[tensor.name] = value
        for node in self.nodes:
            if node.op_type == "Constant":
                self.constants[node.output[0]] = torch.from_numpy(np.array(constant_node_value(node)))
        # a value is dropped after its last reader: inference holds a few tensors, not the whole graph's
        last_use: dict[str, int] = {}
        for i, node in enumerate(self.nodes):
            for name in node.input:
                last_use[name] = i
        keep = set(self.output_names) | set(self.parameter_of) | set(self.constants)  # held by the module
        self.release = [[n for n in dict.fromkeys(node.input) if last_use.get(n) == i and n not in keep]
                        for i, node in enumerate(self.nodes)]

    def parameter(self, name: str) -> torch.nn.Parameter:
        return self.weights[self.parameter_of[name]]

    def forward(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = dict(self.constants)
        values.update({name: self.weights[i] for name, i in self.parameter_of.items()})
        values.update(feeds)
        for node, attrs, release in zip(self.nodes, self.attrs, self.release):
            if node.op_type == "Constant":
                continue
            args = [values[name] if name else None for name in node.input]
            while args and args[-1] is None:
                args.pop()
            try:
                run = CONTRIB_OPS[node.op_type] if node.domain == "com.microsoft" else OPS[node.op_type]
                out = run(attrs, self.opset, *args)
            except (RuntimeError, NotImplementedError, TypeError, ValueError, IndexError) as exc:
                raise OnnxoptError(f"distill: torch cannot run node '{node.name or node.output[0]}' "
                                   f"({node.op_type}): {str(exc).splitlines()[0]}") from exc
            outputs = out if isinstance(out, (list, tuple)) else [out]
            for name, value in zip(node.output, outputs):
                if name:
                    values[name] = value
            for name in release:
                values.pop(name, None)
        return {name: values[name] for name in self.output_names}

    def write_back(self, model: onnx.ModelProto) -> int:
        """Copies the parameters into `model`'s initializers of the same names; returns how many."""
        written = 0
        for tensor in model.graph.initializer:
            index = self.parameter_of.get(tensor.name)
            if index is None:
                continue
            value = self.weights[index].detach().cpu().numpy()
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
            tensor.CopyFrom(numpy_helper.from_array(value.astype(dtype, copy=False), tensor.name))
            written += 1
        return written


def as_tensors(feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, torch.Tensor]:
    """The feeds the graph takes, as tensors (numpy memmaps and read-only arrays copied)."""
    return {name: torch.from_numpy(np.array(feeds[name])) for name in names if name in feeds}
