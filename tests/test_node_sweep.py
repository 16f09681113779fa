"""Every onnx node test case through `fold,fuse`, on its own test data, with numeric verification:
no crash and no pass-broken model. A case may fail only with one line about its input (an op or
type ONNX Runtime cannot run, tensors its Python API cannot pass); every such line must say so."""
from __future__ import annotations

import collections

import pytest

import onnxopt
from onnxopt.errors import OnnxoptError, PassFailedError

# What a refused input may be told; anything else is a new kind of failure to look at.
INPUT_PROBLEMS = ("ONNX Runtime has no kernel", "ONNX Runtime rejected the model", "does not exist in opset",
                  "ONNX Runtime could not run the model", "ONNX Runtime's Python API cannot pass",
                  "ONNX Runtime cannot run this opset", "is not a tensor")


@pytest.mark.slow
def test_node_cases_fold_and_fuse_without_breaking(tmp_path):
    from models.node_tests import node_cases, write_case

    outcomes, unexplained, broken = collections.Counter(), [], []
    for case in node_cases():
        model, data = write_case(case, tmp_path / case.name)
        try:
            onnxopt.optimize(str(model), "fold,fuse", data=str(data), runs=0, verify="numeric")
            outcomes["ok"] += 1
        except PassFailedError as exc:
            broken.append(f"{case.name}: {exc}")
        except OnnxoptError as exc:
            outcomes["input refused"] += 1
            if not any(p in str(exc) for p in INPUT_PROBLEMS):
                unexplained.append(f"{case.name}: {exc}")
        # any other exception is a crash: pytest reports it with the case in the traceback
    assert not broken, "\n".join(broken)
    assert not unexplained, "\n".join(unexplained[:20])
    assert outcomes["ok"] > 1500, outcomes  # today 1,613 of 1,884
