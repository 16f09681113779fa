"""Small models of the kinds people deploy and quantization must take, each with representative data
in the form its users would write it (tests build them; nothing is downloaded):

- `lstm_tagger` / `gru_tagger`: torch nn.LSTM / nn.GRU sequence models exported at opset 12 by the
  TorchScript exporter, input [seq, batch, features] and a state input [layers, batch, hidden] (the
  batch on axis 1), with calibration data holding one whole feed per entry (arrays of rank + 1);
- `cnn_opset11`: the digits CNN's layout exported at opset 11;
- `constant_weights`: the demo CNN with every weight in a Constant node instead of an initializer;
- `float16`: the demo CNN with every float tensor in float16 (weights, input, output), as models
  converted for GPUs come;
- `streaming_if`: a stateful network behind an If on a scalar mode input, as some exporters emit it
  (the whole network in the branches, weights outside).

Weights are random but seeded, so every build gives the same model.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
SEQ, FEATURES, HIDDEN, CLASSES = 20, 128, 256, 10


def _export(module, args: tuple, path: Path, input_names, output_names, dynamic_axes, opset: int) -> Path:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=False)
    onnx.checker.check_model(str(path))
    return path


def _recurrent_tagger(kind: str, path: Path, opset: int) -> Path:
    import torch

    torch.manual_seed(0)

    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = getattr(torch.nn, kind)(FEATURES, HIDDEN)
            self.head = torch.nn.Linear(HIDDEN, CLASSES)

        def forward(self, x, h0, *c0):
            out, _ = self.rnn(x, (h0, c0[0]) if c0 else h0)
            return self.head(out)

    state = torch.zeros(1, 1, HIDDEN)
    args = (torch.zeros(SEQ, 1, FEATURES), state) + ((state,) if kind == "LSTM" else ())
    names = ["x", "h0"] + (["c0"] if kind == "LSTM" else [])
    axes = {"x": {0: "seq", 1: "batch"}, "h0": {1: "batch"}, "scores": {0: "seq", 1: "batch"}}
    if kind == "LSTM":
        axes["c0"] = {1: "batch"}
    return _export(Tagger().eval(), args, path, names, ["scores"], axes, opset)


def lstm_tagger(folder: Path, opset: int = 12) -> Path:
    return _recurrent_tagger("LSTM", Path(folder) / "lstm.onnx", opset)


def gru_tagger(folder: Path, opset: int = 12) -> Path:
    return _recurrent_tagger("GRU", Path(folder) / "gru.onnx", opset)


def recurrent_feeds(model_path: Path, entries: int, seed: int = 1) -> dict[str, np.ndarray]:
    """One whole feed per entry, as users save sequence-model data: x [entries, seq, 1, features],
    states [entries, layers, 1, hidden] (each entry a batch of one, the model's own layout)."""
    rng = np.random.default_rng(seed)
    names = [i.name for i in onnx.load(str(model_path)).graph.input]
    feeds = {"x": rng.standard_normal((entries, SEQ, 1, FEATURES)).astype(np.float32)}
    for state in ("h0", "c0"):
        if state in names:
            feeds[state] = (0.1 * rng.standard_normal((entries, 1, 1, HIDDEN))).astype(np.float32)
    return feeds


def cnn_opset11(folder: Path) -> Path:
    """Conv-BN-ReLU x2, pool, Linear: the digits CNN's layout at opset 11, random weights."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10)).eval()
    return _export(net, (torch.zeros(2, 1, 8, 8),), Path(folder) / "cnn11.onnx", ["image"], ["logits"],
                   {"image": {0: "batch"}, "logits": {0: "batch"}}, 11)


def constant_weights(folder: Path) -> Path:
    """models/demo.onnx with each initializer turned into a Constant node."""
    model = onnx.load(str(REPO / "models" / "demo.onnx"))
    constants = [helper.make_node("Constant", [], [t.name], value=t) for t in model.graph.initializer]
    del model.graph.initializer[:]
    nodes = constants + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.checker.check_model(model)
    path = Path(folder) / "constant_weights.onnx"
    onnx.save(model, str(path))
    return path


def float16(folder: Path) -> Path:
    """models/demo.onnx in float16: initializers, Constant values, inputs, outputs and Cast targets."""
    model = onnx.load(str(REPO / "models" / "demo.onnx"))

    def half(tensor: onnx.TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))

    for tensor in model.graph.initializer:
        half(tensor)
    for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT:
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                half(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    onnx.checker.check_model(model, full_check=True)
    path = Path(folder) / "float16.onnx"
    onnx.save(model, str(path))
    return path


def streaming_if(folder: Path, features: int = FEATURES, hidden: int = HIDDEN) -> Path:
    """y, new_state = If(mode == 1, fast path, full path): x [batch, features], state [2, batch, hidden]
    (batch on axis 1), mode a scalar int64. Both branches run MatMuls on outer-scope weights and update
    the state; the full path sums two linear layers, as an RNN cell does."""
    rng = np.random.default_rng(0)

    def weight(name, k, n):
        return numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), name)

    inits = [weight("w_in", features, hidden), weight("w_rec", hidden, hidden), weight("w_out", hidden, CLASSES),
             weight("w_fast_in", features, 64), weight("w_fast_out", 64, CLASSES), numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "layer0")]

    def branch(name: str, full: bool) -> onnx.GraphProto:
        nodes = [helper.make_node("Gather", ["state", "layer0"], [f"{name}_s0"], axis=0),
                 helper.make_node("Squeeze", [f"{name}_s0", "layer0"], [f"{name}_prev"])]
        if full:
            nodes += [helper.make_node("MatMul", ["x", "w_in"], [f"{name}_a"]),
                      helper.make_node("MatMul", [f"{name}_prev", "w_rec"], [f"{name}_b"]),
                      helper.make_node("Add", [f"{name}_a", f"{name}_b"], [f"{name}_pre"]),
                      helper.make_node("Tanh", [f"{name}_pre"], [f"{name}_h"]),
                      helper.make_node("MatMul", [f"{name}_h", "w_out"], [f"{name}_y"])]
        else:
            nodes += [helper.make_node("MatMul", ["x", "w_fast_in"], [f"{name}_t"]),
                      helper.make_node("Relu", [f"{name}_t"], [f"{name}_r"]),
                      helper.make_node("MatMul", [f"{name}_r", "w_fast_out"], [f"{name}_y"]),
                      helper.make_node("Identity", [f"{name}_prev"], [f"{name}_h"])]
        nodes += [helper.make_node("Unsqueeze", [f"{name}_h", "layer0"], [f"{name}_h1"]),
                  helper.make_node("Concat", [f"{name}_h1", f"{name}_h1"], [f"{name}_state"], axis=0)]
        return helper.make_graph(nodes, name, [], [
            helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["batch", CLASSES]),
            helper.make_tensor_value_info(f"{name}_state", TensorProto.FLOAT, [2, "batch", hidden])])

    nodes = [helper.make_node("Equal", ["mode", "one"], ["fast"]),
             helper.make_node("If", ["fast"], ["y", "new_state"], then_branch=branch("fast_path", False),
                              else_branch=branch("full_path", True))]
    graph = helper.make_graph(nodes, "streaming", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden]),
        helper.make_tensor_value_info("mode", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES]),
         helper.make_tensor_value_info("new_state", TensorProto.FLOAT, [2, "batch", hidden])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    path = Path(folder) / "streaming_if.onnx"
    onnx.save(model, str(path))
    return path


def streaming_feeds(entries: int, mode: int = 0, seed: int = 2, batch: int = 1, features: int = FEATURES,
                    hidden: int = HIDDEN) -> dict[str, np.ndarray]:
    """One feed per entry: x [entries, batch, features], state [entries, 2, batch, hidden], mode
    [entries] (a scalar each)."""
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((entries, batch, features)).astype(np.float32),
            "state": (0.5 * rng.standard_normal((entries, 2, batch, hidden))).astype(np.float32),
            "mode": np.full(entries, mode, np.int64)}
