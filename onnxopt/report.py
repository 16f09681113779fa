"""The optimization report: what each pass did, and the original vs optimized model side by side."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from .model_io import check_writable
from .stats import ModelStats
from .tempfiles import temporary
from .table import Table, format_table
from .validation import Agreement, Latency


@dataclasses.dataclass
class Report:
    pipeline: str
    input: str | None
    output: str | None
    ep: str
    original: ModelStats
    optimized: ModelStats
    passes: list[dict[str, Any]]
    latency: dict[str, Latency] = dataclasses.field(default_factory=dict)
    agreement: Agreement | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def write_json(self, path: str | Path) -> None:
        """Atomic, like model outputs."""
        path = Path(path)
        check_writable(path)
        with temporary(path.parent, f".{path.name}.") as tmp:
            with open(tmp, "w") as f:
                json.dump(self.to_dict(), f, indent=2, default=_jsonable)
            os.replace(tmp, path)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


SAME_SPEED = 1.03  # a smaller ratio is never called faster or slower: medians move that much between runs


def _speed(original_ms: float, optimized_ms: float, again_ms: float | None = None) -> str:
    """The speed-up, or "no measurable change" when it is within 3 % or no larger than the difference
    between two sessions of the original (`again_ms`, the second one)."""
    if not optimized_ms or not original_ms:
        return ""
    ratio = original_ms / optimized_ms
    noise = abs(np.log(original_ms / again_ms)) if again_ms else 0.0
    if abs(np.log(ratio)) <= max(noise, np.log(SAME_SPEED)):
        return "no measurable change"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _change(a: float, b: float) -> str:
    return f"{(b - a) / a * 100:+.1f}%" if a else ""


def render(report: Report, show_ops: bool = False) -> str:
    """The human-readable report: per-pass table, then the model comparison."""
    parts = []
    pass_rows = []
    for p in report.passes:
        if p["iteration"] > 1 and not p["changed"]:
            continue
        counts = ", ".join(f"{k} {v}" for k, v in p["counts"].items()) or "no change"
        pass_rows.append([p["name"] + (f" #{p['iteration']}" if p["iteration"] > 1 else ""),
                          f"{p['seconds'] * 1e3:.0f} ms", f"{p['nodes'][0]} -> {p['nodes'][1]}", counts])
    parts.append(format_table(pass_rows, ["pass", "time", "nodes", "what changed"]))
    o, n = report.original, report.optimized
    rows = [
        ["nodes", str(o.nodes), str(n.nodes), _change(o.nodes, n.nodes)],
        ["parameters", f"{o.parameters:,}", f"{n.parameters:,}", _change(o.parameters, n.parameters)],
        ["file size", _size(o.size_bytes), _size(n.size_bytes), _change(o.size_bytes, n.size_bytes)],
    ]
    if report.latency:
        lo, ln = report.latency["original"], report.latency["optimized"]
        again = report.latency.get("original_again")
        rows.append([f"latency median ({report.ep})", f"{lo.median_ms:.3f} ms", f"{ln.median_ms:.3f} ms",
                     _speed(lo.median_ms, ln.median_ms, again.median_ms if again else None)])
        rows.append(["latency p90", f"{lo.p90_ms:.3f} ms", f"{ln.p90_ms:.3f} ms", ""])
        if again:
            noise = abs(lo.median_ms / again.median_ms - 1) * 100
            rows.append(["latency, original again", f"{again.median_ms:.3f} ms", "",
                         f"timing noise {noise:.0f}%"])
    if report.agreement is not None:
        a = report.agreement
        rows.append(["max abs error", "", f"{a.max_abs_error:.3g}", ""])
        rows.append(["cosine", "", f"{a.cosine:.6f}", ""])
        if a.top1 is not None:
            rows.append(["top-1 agreement", "", f"{a.top1 * 100:.1f}%", ""])
    parts.append(format_table(rows, ["", "original", "optimized", "change"]))
    if show_ops:
        ops = sorted(set(o.ops) | set(n.ops))
        parts.append(format_table([[op, str(o.ops.get(op, 0)), str(n.ops.get(op, 0)), ""] for op in ops],
                                  ["op type", "original", "optimized", ""]))
    for p in report.passes:
        for table in p.get("tables", []):
            table = Table(**table)
            parts.append(dataclasses.replace(table, title=f"{p['name']}: {table.title}").render())
    skipped = [f"  {p['name']}: {s}" for p in report.passes if p["iteration"] == 1 for s in p["skipped"]]
    if skipped:
        parts.append("skipped:\n" + "\n".join(skipped[:20]) + (f"\n  ... {len(skipped) - 20} more" if len(skipped) > 20 else ""))
    notes = list(report.notes) + [f"{p['name']}: {n}" for p in report.passes if p["iteration"] == 1 for n in p["notes"]]
    if notes:
        parts.append("notes:\n" + "\n".join(f"  {note}" for note in notes))
    return "\n\n".join(parts)
