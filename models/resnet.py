"""A ResNet-18-shaped conv net at 224x224 with random weights, for int8 speed and agreement benchmarks.

BasicBlocks (conv3x3-BN-ReLU-conv3x3-BN plus identity or 1x1 downsample), stages 64/128/256/512,
7x7 stem with max-pool, global average pool, FC to 1000; opset 17, dynamic batch. Weights are He-normal
and BN statistics random but sane, so activations keep a realistic scale through the depth; nothing
here is trained, so "accuracy" means top-1 agreement with the fp32 model on random-normal inputs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, save_npz, save_onnx  # noqa: E402

MODEL_PATH = BUILD_DIR / "resnet18_random.onnx"


def _graph():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []

    def conv_bn(x, cin, cout, k, stride, name, relu=True):
        weight = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.w"], [f"{name}.c"], kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        stats = {"g": rng.uniform(0.5, 1.5, cout), "b": rng.normal(0, 0.1, cout), "m": rng.normal(0, 0.1, cout),
                 "v": rng.uniform(0.5, 1.5, cout)}
        inits.extend(numpy_helper.from_array(v.astype(np.float32), f"{name}.{k_}") for k_, v in stats.items())
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.c"] + [f"{name}.{k_}" for k_ in "gbmv"],
                                      [f"{name}.bn"]))
        if not relu:
            return f"{name}.bn"
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.r"]))
        return f"{name}.r"

    x = conv_bn("image", 3, 64, 7, 2, "stem")
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4))
    x, cin = "pool", 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if block == 0 and stage > 0 else 1
            name = f"s{stage}b{block}"
            h = conv_bn(conv_bn(x, cin, cout, 3, stride, f"{name}.a"), cout, cout, 3, 1, f"{name}.b", relu=False)
            shortcut = conv_bn(x, cin, cout, 1, stride, f"{name}.d", relu=False) if stride != 1 or cin != cout else x
            nodes.append(helper.make_node("Add", [h, shortcut], [f"{name}.sum"]))
            nodes.append(helper.make_node("Relu", [f"{name}.sum"], [f"{name}.out"]))
            x, cin = f"{name}.out", cout
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1)]
    inits += [numpy_helper.from_array((rng.standard_normal((1000, 512)) * 0.05).astype(np.float32), "fc.w"),
              numpy_helper.from_array(np.zeros(1000, np.float32), "fc.b")]
    graph = helper.make_graph(nodes, "resnet18_random",
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1000])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def build(force: bool = False) -> Path:
    if force or not MODEL_PATH.exists():
        save_onnx(MODEL_PATH, _graph())
    return MODEL_PATH


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def calibration_npz(n: int = 32) -> Path:
    dest = BUILD_DIR / f"resnet18_calib_{n}.npz"
    if not dest.exists():
        save_npz(dest, image=images(n, seed=0))
    return dest


if __name__ == "__main__":
    print(build(force="--force" in sys.argv), calibration_npz())
