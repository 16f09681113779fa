"""Small torch networks in the shapes of model families the other builders do not cover, exported by
TorchScript (opset 13 and 17) and by dynamo (opset 18): what a pass does to their graphs (groups found,
exactness, validity), not accuracy. Nothing is trained; weights are seeded.

- ``shufflenet``: ShuffleNetV2's unit: channels split in halves by chunk, one half through a
  1x1 / depthwise 3x3 / 1x1 branch, concatenated and shuffled (Reshape [N, 2, C/2, H, W], Transpose,
  Reshape back, the sizes computed at run time).
- ``mobilenetv3``: inverted residuals with squeeze-and-excitation (a pooled 1x1 bottleneck scaling
  the channels through HardSigmoid), HardSwish, and a classifier after ``x.mean((2, 3))``.
- ``unet``: a two-level U-Net: MaxPool down, a ConvTranspose and a nearest-neighbour Resize up,
  skip connections by Concat.
- ``densenet``: dense blocks, each layer's output concatenated to all before it.
- ``resnext``: ResNeXt's bottleneck (a 3x3 Conv in 8 groups between 1x1s, a residual Add), then a
  depthwise Conv with multiplier 2 and a per-channel PReLU.
- ``groupnorm``: a diffusion U-Net's residual block: GroupNorm (8 groups) and SiLU before each 3x3 Conv,
  exported as Reshape [N, 8, -1], InstanceNormalization, Reshape back to the input's shape.
- ``audio_attention``: Conv1d front end, then ``nn.MultiheadAttention`` (its fused input projection
  split into (3, E) with E read off the query at run time).

``build(name, opset, dynamo)`` writes ``build/family_<name>_<opset>[_dynamo].onnx`` once, checked
against torch; ``feeds(name, n, seed)`` gives its input ``x``.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models._common import BUILD_DIR, atomic_path, is_fresh

NAMES = ("shufflenet", "mobilenetv3", "unet", "densenet", "resnext", "groupnorm", "audio_attention")
SHAPES = {"audio_attention": (40, 50)}  # the others take [N, 3, 32, 32] images
_SOURCES = (__file__, Path(__file__).with_name("_common.py"))


def _module(name: str):
    import torch
    from torch import nn
    from torch.nn import functional as F

    def conv_bn(cin, cout, k=1, groups=1, act=nn.ReLU):
        return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups), nn.BatchNorm2d(cout)] + ([act()] if act else [])

    class ShuffleNet(nn.Module):
        def __init__(self, c=32):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(3, c, 3))
            h = c // 2
            self.branch = nn.Sequential(*conv_bn(h, h), *conv_bn(h, h, 3, groups=h, act=None), *conv_bn(h, h))
            self.head, self.fc = nn.Conv2d(c, 48, 1), nn.Linear(48, 10)

        def forward(self, x):
            x = self.stem(x)
            kept, changed = x.chunk(2, dim=1)
            x = torch.cat([kept, self.branch(changed)], 1)
            n, c, height, width = x.shape
            x = x.view(n, 2, c // 2, height, width).transpose(1, 2).reshape(n, c, height, width)
            return self.fc(F.relu(self.head(x)).mean((2, 3)))

    class Excite(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.down, self.up = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

        def forward(self, x):
            return x * F.hardsigmoid(self.up(F.relu(self.down(F.adaptive_avg_pool2d(x, 1)))))

    class MobileNetV3(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(3, 16, 3, act=nn.Hardswish))
            self.blocks = nn.ModuleList(nn.Sequential(
                *conv_bn(cin, wide, act=nn.Hardswish), *conv_bn(wide, wide, 3, groups=wide, act=nn.Hardswish),
                Excite(wide), *conv_bn(wide, cout, act=None)) for cin, wide, cout in [(16, 64, 16), (16, 72, 24)])
            self.fc = nn.Sequential(nn.Linear(24, 64), nn.Hardswish(), nn.Linear(64, 10))

        def forward(self, x):
            x = self.stem(x)
            x = x + self.blocks[0](x)
            return self.fc(self.blocks[1](x).mean((2, 3)))

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
            self.enc2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
            self.up, self.side = nn.ConvTranspose2d(32, 16, 2, stride=2), nn.Conv2d(32, 16, 1)
            self.dec, self.out = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1), nn.ReLU()), nn.Conv2d(32, 2, 1)

        def forward(self, x):
            a = self.enc1(x)
            b = self.enc2(F.max_pool2d(a, 2))
            side = F.interpolate(self.side(b), scale_factor=2.0, mode="nearest")
            return self.out(torch.cat([self.dec(torch.cat([self.up(b), a], 1)), side], 1))

    class DenseNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.layers = nn.ModuleList(nn.Sequential(nn.BatchNorm2d(16 + 12 * i), nn.ReLU(), *conv_bn(16 + 12 * i, 48),
                                                      nn.Conv2d(48, 12, 3, padding=1)) for i in range(3))
            self.fc = nn.Linear(52, 10)

        def forward(self, x):
            x = self.stem(x)
            for layer in self.layers:
                x = torch.cat([x, layer(x)], 1)
            return self.fc(x.mean((2, 3)))

    class ResNeXt(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(3, 32, 3))
            self.block = nn.Sequential(*conv_bn(32, 64), *conv_bn(64, 64, 3, groups=8), *conv_bn(64, 32, act=None))
            self.wide = nn.Sequential(*conv_bn(32, 64, 3, groups=32, act=None), nn.PReLU(64))
            self.fc = nn.Linear(64, 10)

        def forward(self, x):
            x = self.stem(x)
            x = F.relu(x + self.block(x))
            return self.fc(self.wide(x).mean((2, 3)))

    class GroupNormNet(nn.Module):
        def __init__(self, c=32):
            super().__init__()
            self.inp, self.out = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, 3, 3, padding=1)
            self.norm1, self.conv1 = nn.GroupNorm(8, c), nn.Conv2d(c, 64, 3, padding=1)
            self.norm2, self.conv2 = nn.GroupNorm(8, 64), nn.Conv2d(64, c, 3, padding=1)
            for norm in (self.norm1, self.norm2):  # as trained, not as initialized
                norm.weight.data.uniform_(0.5, 1.5)
                norm.bias.data.uniform_(-0.2, 0.2)

        def forward(self, x):
            h = self.inp(x)
            y = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(h))))))
            return self.out(h + y)

    class AudioAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = nn.Sequential(nn.Conv1d(40, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU(),
                                       nn.Conv1d(64, 64, 5, padding=2), nn.BatchNorm1d(64), nn.ReLU())
            self.attention, self.fc = nn.MultiheadAttention(64, 4, batch_first=True), nn.Linear(64, 12)

        def forward(self, x):
            t = self.front(x).transpose(1, 2)
            t, _ = self.attention(t, t, t, need_weights=False)
            return self.fc(t.mean(1))

    classes = {"shufflenet": ShuffleNet, "mobilenetv3": MobileNetV3, "unet": UNet, "densenet": DenseNet,
               "resnext": ResNeXt, "groupnorm": GroupNormNet, "audio_attention": AudioAttention}
    if name not in classes:
        raise ValueError(f"unknown model {name}; one of {', '.join(NAMES)}")
    torch.manual_seed(0)
    module = classes[name]().eval()
    for layer in module.modules():  # statistics a trained network would have, so BatchNorm does something
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 1.5)
            layer.weight.data.uniform_(0.5, 1.5)
            layer.bias.data.uniform_(-0.2, 0.2)
    return module


def feeds(name: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    shape = SHAPES.get(name, (3, 32, 32))
    return {"x": np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)}


def build(name: str, opset: int = 17, dynamo: bool = False, force: bool = False) -> Path:
    import onnxruntime as ort
    import torch

    dest = BUILD_DIR / f"family_{name}_{opset}{'_dynamo' if dynamo else ''}.onnx"
    if not force and is_fresh([dest], _SOURCES):
        return dest
    module = _module(name)
    example = torch.from_numpy(feeds(name, 2)["x"])
    with atomic_path(dest) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=["x"],
                                        output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        verbose=False)
            program.save(str(tmp))
        else:
            torch.onnx.export(module, (example,), str(tmp), dynamo=False, opset_version=opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
        check = feeds(name, 3, seed=1)
        got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, check)[0]
        with torch.no_grad():
            want = module(torch.from_numpy(check["x"])).numpy()
        if not np.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise RuntimeError(f"{dest.name}: the export differs from torch by {np.abs(got - want).max():.3g}")
    return dest


if __name__ == "__main__":
    for model_name in NAMES:
        print(build(model_name))
