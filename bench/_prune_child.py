"""One pruning in a fresh process, so wall time and peak RSS are the tool's own (bench/lowrank.py
runs its factorizations here too).

usage: _prune_child.py TOOL SRC CALIB_NPZ OUT_PATH [TRAIN_NPZ]   -> prints one JSON line

TOOL is one of
  onnxopt:PIPELINE                      onnxopt.optimize(SRC, PIPELINE, calib=CALIB_NPZ[, train=TRAIN_NPZ])
  onnxsim:FUNCTION:SPARSITY[:N:M][+ft]  onnxsim.apply_FUNCTION(SRC, sparsity=...) (+ft: then apply_pruning_finetune)
  torch-pruning:RATIO[+ftEPOCHS]        Torch-Pruning's MagnitudePruner on the digits CNN's torch module
                                        (+ftEPOCHS: then fine-tuned on the training labels, as its docs do)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _quant_child import peak_rss_mb  # noqa: E402

ONNXSIM_USES_DATA = {"structured_wanda_pruning", "attention_head_wanda_pruning", "wanda_pruning", "sparsegpt_pruning"}


def calibration_entries(calib: str, model_path: str, batch: int = 8) -> list[dict]:
    """The calibration npz as a list of feed dicts of `batch` samples, limited to the model's inputs."""
    import onnx

    wanted = {i.name for i in onnx.load(model_path, load_external_data=False).graph.input}
    with np.load(calib) as data:
        arrays = {k: data[k] for k in data.files if k in wanted}
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch] for k, v in arrays.items()} for i in range(0, n, batch)]


def onnxsim_prune(spec: str, src: str, calib: str, out: str) -> dict:
    import onnx
    import onnxsim

    finetune = spec.endswith("+ft")
    function, sparsity, *nm = spec.removesuffix("+ft").split(":")
    kwargs: dict = {"sparsity": float(sparsity)}
    if nm:
        kwargs.update(n=int(nm[0]), m=int(nm[1]))
    data = calibration_entries(calib, src)
    if function in ONNXSIM_USES_DATA:
        kwargs.update(calibration_data=data, num_samples=len(data))
    pruned = getattr(onnxsim, f"apply_{function}")(onnx.load(src), **kwargs)
    if finetune:
        pruned = onnxsim.apply_pruning_finetune(onnx.load(src), pruned, calibration_data=data, num_samples=len(data))
    onnx.save(pruned, out)
    return {}


def torch_pruning(spec: str, out: str) -> dict:
    """Torch-Pruning's DepGraph magnitude pruner on the trained digits CNN (its final classifier kept whole),
    exported like the fp32 model; `RATIO+ftN`: then N epochs of ordinary fine-tuning on the labels
    (cross-entropy, Adam 1e-3, batch 64), the recovery Torch-Pruning's own examples use."""
    import torch
    import torch_pruning as tp

    from models import digits

    ratio, _, epochs = spec.partition("+ft")
    module = digits.trained_module()
    classifier = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(module, torch.zeros(1, 1, 8, 8), importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=float(ratio), ignored_layers=[classifier])
    pruner.step()
    if epochs:
        x, y, _, _ = digits._split()
        torch.manual_seed(0)
        optimizer = torch.optim.Adam(module.parameters(), lr=1e-3)
        module.train()
        for _ in range(int(epochs)):
            for i in torch.randperm(len(x)).split(64):
                loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(x[i.numpy()])), torch.from_numpy(y[i.numpy()]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    digits.export(module.eval(), Path(out))
    return {}


def onnxopt_prune(pipeline: str, src: str, calib: str, out: str, train: str | None = None) -> dict:
    import onnxopt

    _, report = onnxopt.optimize(src, pipeline, output=out, calib=calib, train=train, compare=False, verify="none")
    info: dict = {}
    for p in report.passes:
        details = p.get("details", {})
        if p["name"] in ("prune", "lowrank") and "changed" not in info:
            info.update(changed=p.get("changed"), notes=p.get("notes", []), ratios=details.get("ratios"),
                        ranks=details.get("ranks"), speed_check=details.get("speed_check"))
        if p["name"] == "distill":
            cache = details.get("teacher_cache", {})
            info["distill"] = {"changed": p.get("changed"), "cache_seconds": cache.get("seconds"),
                               "train_seconds": details.get("train_seconds"), "steps": details.get("steps"),
                               "epochs": details.get("epochs"), "held_out": [details.get("held_out_loss_before"),
                                                                              details.get("held_out_loss_after")]}
            info.setdefault("notes", []).extend(p.get("notes", []) + [
                f"distill: teacher cache filled in {cache.get('seconds', 0):.0f} s, trained {details.get('steps')} "
                f"steps in {details.get('train_seconds')} s, held-out loss {details.get('held_out_loss_before'):.4g} "
                f"-> {details.get('held_out_loss_after'):.4g}"])
    return info


def main() -> None:
    tool, src, calib, out = sys.argv[1:5]
    train = sys.argv[5] if len(sys.argv) > 5 else None
    # nothing reused from an earlier run; bench/distill.py shares one cache between its rows (the teacher's
    # outputs are filled by the first row that needs them and read by the others, as in real use)
    os.environ["ONNXOPT_CACHE"] = os.environ.get("BENCH_SHARED_CACHE") or tempfile.mkdtemp()
    start = time.perf_counter()
    info: dict = {}
    try:
        kind, _, spec = tool.partition(":")
        if kind == "onnxopt":
            info = onnxopt_prune(spec, src, calib, out, train)
        elif kind == "onnxsim":
            info = onnxsim_prune(spec, src, calib, out)
        elif kind == "torch-pruning":
            info = torch_pruning(spec, out)
        else:
            raise ValueError(f"unknown tool {tool}")
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ''}"
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "error": error, **info}, default=str))


if __name__ == "__main__":
    main()
