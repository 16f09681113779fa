"""The onnx package's node test cases (`onnx.backend.test.case.node`, about 1,900 small models, one
per operator variant) written out as a model file and ONNX `test_data_set_0` folders, as onnx's own
`backend-test-tools generate-data` writes them: sequences as SequenceProto, optionals as
OptionalProto, maps as MapProto. Nothing is downloaded; collecting them takes ~15 s.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def node_cases() -> Iterator:
    """Every node test case that comes with data (`name`, `model`, `data_sets`)."""
    import onnx.backend.test.case.node as node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some cases compute inf / nan on purpose
        cases = node.collect_testcases(None)
    return (case for case in cases if case.model is not None and case.data_sets)


def _proto(value, vi: onnx.ValueInfoProto):
    kind = vi.type.WhichOneof("value")
    if kind == "sequence_type":
        return numpy_helper.from_list(value, vi.name)
    if kind == "optional_type":
        return numpy_helper.from_optional(value, vi.name)
    if kind == "map_type":
        return numpy_helper.from_dict(value, vi.name)
    return value if isinstance(value, TensorProto) else numpy_helper.from_array(np.asarray(value), vi.name)


def write_case(case, folder: Path) -> tuple[Path, Path]:
    """(model path, its first test_data_set folder) under `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / "model.onnx"
    model_path.write_bytes(case.model.SerializeToString())
    data = folder / "test_data_set_0"
    data.mkdir(exist_ok=True)
    inputs, _ = case.data_sets[0]
    for index, (vi, value) in enumerate(zip(case.model.graph.input, inputs)):
        (data / f"input_{index}.pb").write_bytes(_proto(value, vi).SerializeToString())
    return model_path, data
