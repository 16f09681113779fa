"""The core's services for lossy passes, used by a second lossy technique that knows nothing of quant.

`RoundWeights` (test-only) rounds each constant MatMul weight to fewer bits, per layer, as far as an
error budget allows: it asks the context for representative data, fits its per-layer strengths with
`onnxopt.budget`, and keeps its input when the speed guard says its output is slower.
"""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import helper, numpy_helper

import onnxopt
from onnxopt import OnnxoptError, Pass, PassResult, budget, option
from onnxopt.graph import GraphView
from onnxopt.manager import copy_model

BITS = (None, 6, 4, 2)  # strength 0 leaves a layer alone; 3 rounds it to 2 bits


def round_to_bits(weight: np.ndarray, bits: int) -> np.ndarray:
    scale = np.abs(weight).max() / (2 ** (bits - 1) - 1)
    return (np.round(weight / scale) * scale).astype(weight.dtype)


@dataclasses.dataclass(frozen=True)
class RoundOptions:
    max_error: float = option(0.01, "largest 1 - cosine of the outputs on the representative data")
    slow_down: int = option(0, "append this many identity MatMuls (an output the guard must refuse)")


class RoundWeights(Pass):
    """Round MatMul weights to fewer bits, layer by layer, within an error budget."""

    name = "roundw"
    Options = RoundOptions
    lossy = True

    def run(self, model: onnx.ModelProto, ctx) -> PassResult:
        data = ctx.require_data(self.name).batches(model, batch_size=16)
        layers = RoundedLayers(model, self.options.slow_down)
        error_of, measure = budget.output_error(model, data)
        fit = budget.fit(layers, error_of, self.options.max_error, ctx.progress)
        result = layers.build(fit.strengths)
        # rounding leaves the speed as it was: only a clear loss counts, not timing noise
        verdict = ctx.guard.check(model, result, data.first_batch(), min_seconds=0.05, tolerance=0.8)
        if verdict.slower:
            return PassResult(model, changed=False, notes=[f"kept the input: slower ({verdict.slower})"],
                              tables=[verdict.table("speed guard")])
        bits = {unit: BITS[level] for unit, level in fit.strengths.items()}
        return PassResult(result, changed=True, counts={"layers rounded": sum(b is not None for b in bits.values())},
                          notes=[f"error {fit.error_after:.4g} on the {measure}"], details={"bits": bits})


class RoundedLayers:
    """budget.Tunable: each MatMul with a constant weight, at BITS[strength]."""

    def __init__(self, model: onnx.ModelProto, slow_down: int):
        self.model, self.slow_down = model, slow_down
        view = GraphView(model.graph)
        self.weights = {n.input[1]: view.constant(n.input[1]) for n in model.graph.node
                        if n.op_type == "MatMul" and view.constant(n.input[1]) is not None}

    def units(self) -> list[str]:
        return list(self.weights)

    def strengths(self, unit: str) -> tuple:
        return BITS

    def build(self, strengths) -> onnx.ModelProto:
        model = copy_model(self.model)
        for tensor in model.graph.initializer:
            if tensor.name in self.weights and BITS[strengths[tensor.name]] is not None:
                tensor.CopyFrom(numpy_helper.from_array(
                    round_to_bits(self.weights[tensor.name], BITS[strengths[tensor.name]]), tensor.name))
        if self.slow_down:  # y = y @ I, many times: the same values, much more work
            out = model.graph.output[0].name
            width = model.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
            model.graph.initializer.append(numpy_helper.from_array(np.eye(width, dtype=np.float32), "eye"))
            producer = next(n for n in model.graph.node if out in n.output)
            producer.output[list(producer.output).index(out)] = "slow_0"
            for i in range(self.slow_down):
                model.graph.node.append(helper.make_node(
                    "MatMul", [f"slow_{i}", "eye"], [out if i == self.slow_down - 1 else f"slow_{i + 1}"]))
        return model


def mlp(seed: int = 0) -> onnx.ModelProto:
    """x[N, 32] -> 64 -> Relu -> 64 -> Relu -> 16: three MatMul layers."""
    rng = np.random.default_rng(seed)
    sizes = [32, 64, 64, 16]
    nodes, inits, h = [], [], "x"
    for i, (k, n) in enumerate(zip(sizes, sizes[1:])):
        inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [h, f"w{i}"], [f"m{i}"]))
        h = f"m{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 16])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def samples() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)}


def worst_cosine_error(before, after, samples) -> float:
    ref, got = ort_run(before, samples)[0].ravel(), ort_run(after, samples)[0].ravel()
    return 1 - float(ref @ got / np.linalg.norm(ref) / np.linalg.norm(got))


def test_the_budget_chooses_per_layer_bits_and_holds(samples):
    model = mlp()
    loose, report = onnxopt.optimize(model, [RoundWeights(RoundOptions(max_error=0.9))], calib=samples, compare=False)
    assert set(report.passes[0]["details"]["bits"].values()) == {2}  # everything at its strongest fits
    tight, report = onnxopt.optimize(model, [RoundWeights(RoundOptions(max_error=0.03))], calib=samples,
                                     compare=False)
    bits = report.passes[0]["details"]["bits"]
    assert len(set(bits.values())) > 1 and 2 not in bits.values(), bits  # per layer, stepped back from 2 bits
    error = worst_cosine_error(model, tight, samples)  # on all 64 samples, measured here, not by the pass
    assert 0.003 < error <= 0.03  # lossy (the oracle can fail), within budget
    assert worst_cosine_error(model, loose, samples) > 0.03


class AdditiveUnits:
    """budget.Tunable over a table {unit: error at each strength}: the "model" is the assignment
    itself, and its error is the sum of the units' errors (`error_of`)."""

    def __init__(self, errors: dict[str, tuple[float, ...]]):
        self.errors = errors

    def units(self):
        return list(self.errors)

    def strengths(self, unit):
        return self.errors[unit]

    def build(self, strengths):
        return strengths

    def error_of(self, strengths) -> float:
        return sum(self.errors[u][s] for u, s in strengths.items())


def test_fit_steps_units_down_several_strengths():
    """Three units whose error adds up: 'a' hurts most, so it is stepped down first and furthest."""
    toy = AdditiveUnits({"a": (0.0, 0.01, 0.05, 0.3), "b": (0.0, 0.001, 0.002, 0.01), "c": (0.0, 0.0, 0.0, 0.001)})
    fit = budget.fit(toy, toy.error_of, max_error=0.02)
    # a: 0.3 -> 0.05 (0.061 in all), -> 0.01 (0.021), -> 0 (0.011 <= 0.02); b and c never needed
    assert fit.strengths == {"a": 0, "b": 3, "c": 3}
    assert fit.error_before == pytest.approx(0.311) and fit.error_after == pytest.approx(0.011)
    assert fit.gains == pytest.approx({"a": 0.25, "b": 0.008, "c": 0.001})
    assert fit.stepped_down(toy) == ["a"] and fit.evaluations == 6  # all strongest, 3 single steps (a's first is the first move), a at 1 and 0


def test_allocate_finds_the_cheapest_combination_that_removes_the_target():
    """Errors that add up: the dynamic programme must find what trying every combination finds."""
    import itertools

    toy = AdditiveUnits({"a": (0.0, 0.001, 0.004, 0.02), "b": (0.0, 0.002, 0.005, 0.006), "c": (0.0, 0.0, 0.01, 0.03)})
    error, error_of = toy.errors, toy.error_of
    removes = {"a": (0, 4, 8, 12), "b": (0, 2, 4, 6), "c": (0, 8, 16, 24)}

    for target in (6, 14, 20, 30, 42):
        plan = budget.allocate(toy, error_of, lambda u, s: removes[u][s], target)
        feasible = [dict(zip(error, c)) for c in itertools.product(range(4), repeat=3)
                    if sum(removes[u][s] for u, s in zip(error, c)) >= target]
        assert plan.predicted == pytest.approx(min(error_of(c) for c in feasible))
        assert plan.size >= target and plan.error == pytest.approx(plan.predicted)
        assert plan.evaluations == 3 * 3 + 1  # each unit alone at each strength, then the chosen one
    # 14: c's first step (8, free) with a's and b's first (4 + 2, 0.001 + 0.002) beats a's second (8, 0.004)
    assert budget.allocate(toy, error_of, lambda u, s: removes[u][s], 14).strengths == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(ValueError, match="cannot remove 43"):
        budget.allocate(toy, error_of, lambda u, s: removes[u][s], 43)


def test_largest_removes_the_most_that_the_budget_allows():
    """Errors that add up: the knapsack must find what trying every combination finds."""
    import itertools

    toy = AdditiveUnits({"a": (0.0, 0.001, 0.004, 0.02), "b": (0.0, 0.002, 0.005, 0.006), "c": (0.0, 0.0, 0.01, 0.03)})
    removes = {"a": (0, 4, 8, 12), "b": (0, 2, 4, 6), "c": (0, 8, 16, 24)}
    for max_error in (0.0, 0.003, 0.011, 0.02, 0.05, 1.0):
        plan = budget.largest(toy, toy.error_of, lambda u, s: removes[u][s], max_error)
        fitting = [dict(zip(toy.errors, c)) for c in itertools.product(range(4), repeat=3)
                   if toy.error_of(dict(zip(toy.errors, c))) <= max_error]
        assert plan.size == max(sum(removes[u][s] for u, s in c.items()) for c in fitting)
        assert plan.error <= max_error and plan.evaluations == 3 * 3 + 1
    # 0.011: c's free first step with a's second and b's last (8 + 8 + 6 at 0.010) beat c's second with a's
    # first (16 + 4 at 0.011)
    assert budget.largest(toy, toy.error_of, lambda u, s: removes[u][s], 0.011).strengths == {"a": 2, "b": 3, "c": 1}


def test_largest_aims_lower_when_the_errors_do_not_add_up():
    """Units that hurt more together than alone: the first choice measures over the budget, so the
    budget on the summed errors is lowered until a measured one holds."""
    toy = AdditiveUnits({"a": (0.0, 0.004, 0.008), "b": (0.0, 0.004, 0.008)})
    together = lambda strengths: toy.error_of(strengths) * (1 + sum(strengths.values()))  # noqa: E731
    plan = budget.largest(toy, together, lambda u, s: s, max_error=0.02)
    # alone: 0.008 at strength 1, 0.024 at 2; both at 1 sum to 0.016 but measure 0.024, so one unit at 1
    assert plan.error <= 0.02 and plan.evaluations == 2 * 2 + 2
    assert plan.size == 1 and plan.error == pytest.approx(0.008)
    nothing = budget.largest(toy, lambda strengths: 1.0 if any(strengths.values()) else 0.0, lambda u, s: s, 0.5)
    assert nothing.strengths == {"a": 0, "b": 0} and nothing.error == 0.0


def test_the_checks_samples_are_left_out_of_what_a_pass_fits_on():
    class Stream:  # ten batches of 8, numbered
        num_batches, batch_size = 10, 8

        def __iter__(self):
            return iter([{"i": np.full(8, i)} for i in range(10)])

    checked = {int(b["i"][0]) for b in budget._spread_batches(Stream(), budget.CHECK_OFFSET)}
    chosen_on = {int(b["i"][0]) for b in budget._spread_batches(Stream())}
    fitted = budget.without_check(Stream())
    seen = {int(b["i"][0]) for b in fitted}
    assert checked and not checked & seen and seen | checked == set(range(10)) and fitted.num_batches == 8
    assert not checked & chosen_on  # the choice and its check measure on different batches
    assert fitted.batch_size == 8  # the rest is the stream's


def test_the_speed_guard_keeps_the_input_when_the_output_is_slower(samples):
    model = mlp()
    out, report = onnxopt.optimize(model, [RoundWeights(RoundOptions(max_error=0.9, slow_down=200))],
                                   calib=samples, compare=False)
    record = report.passes[0]
    assert not record["changed"] and "kept the input: slower" in record["notes"][0]
    assert record["tables"][0]["title"] == "speed guard"
    assert [n.op_type for n in out.graph.node].count("MatMul") == 3


def test_the_speed_guard_times_a_loss_again_on_fresh_sessions(samples, monkeypatch):
    """One ORT session can run a small model persistently slower than another of the same model, so a
    loss is confirmed on a new pair of sessions before it counts (and a win needs no second pair)."""
    from onnxopt import guard

    opened = []
    real = guard.make_session
    monkeypatch.setattr(guard, "make_session", lambda *a, **k: opened.append(a[0]) or real(*a, **k))
    model = mlp()
    slow = RoundedLayers(model, 200).build({unit: 0 for unit in RoundedLayers(model, 0).units()})
    feeds = {"x": samples["x"][:8]}
    verdict = guard.SpeedGuard().check(model, slow, feeds, batches=(8,), threads=(1,), min_seconds=0.05)
    assert verdict.slower and len(opened) == 4
    opened.clear()
    verdict = guard.SpeedGuard().check(slow, model, feeds, batches=(8,), threads=(1,), min_seconds=0.05)
    assert not verdict.slower and len(opened) == 2


def test_missing_data_is_one_clear_line(tmp_path, capsys):
    from onnxopt import registry
    from onnxopt.cli import main

    with pytest.raises(OnnxoptError, match="roundw needs representative data .*set calib="):
        onnxopt.optimize(mlp(), [RoundWeights()], compare=False)
    registry.register(RoundWeights)
    onnx.save(mlp(), tmp_path / "mlp.onnx")
    assert main([str(tmp_path / "mlp.onnx"), "-p", "roundw", "--no-compare"]) == 2
    assert "roundw needs representative data (pass --calib data.npz" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(("onnxopt",) + path.relative_to(ROOT).parent.parts)  # passes/x -> onnxopt.passes.x
    package = package.replace("onnxopt.onnxopt", "onnxopt")
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_the_core_imports_no_pass_and_no_wing_imports_another():
    for path in (ROOT / "onnxopt").rglob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("onnxopt.passes")}, path
    wings = [p.name for p in (ROOT / "passes").iterdir() if (p / "__init__.py").exists()]
    assert "quant" in wings
    for path in (ROOT / "passes").rglob("*.py"):
        inside = path.relative_to(ROOT / "passes").parts
        own = inside[0] if len(inside) > 1 else None
        for module in imported_modules(path):
            parts = module.split(".")
            if parts[:2] == ["onnxopt", "passes"] and len(parts) > 2:
                assert parts[2] == own or (own is None and parts[2] not in wings), f"{path} imports {module}"
    assert not {m for m in imported_modules(Path(__file__)) if m.startswith("onnxopt.passes")}  # this pass too


def test_to_speedup_times_its_way_to_the_least_error_that_is_fast_enough():
    """Time as a fixed overhead plus the cost left: the first target (all time taken to be cost)
    falls short, the fit through the first model timed reaches the goal exactly, and the choice is
    the least error of every combination that is fast enough."""
    import itertools

    toy = AdditiveUnits({"a": (0.0, 0.001, 0.004, 0.02), "b": (0.0, 0.002, 0.005, 0.006), "c": (0.0, 0.0, 0.01, 0.03)})
    saves = {"a": (0, 4, 8, 12), "b": (0, 2, 4, 6), "c": (0, 8, 16, 24)}
    fixed, total = 30, 42

    def speedup_of(strengths) -> float:
        return (fixed + total) / (fixed + total - sum(saves[u][s] for u, s in strengths.items()))

    for goal in (1.1, 1.2, 1.35):
        plan = budget.to_speedup(toy, toy.error_of, lambda u, s: saves[u][s], total, speedup_of, goal)
        fast_enough = [dict(zip(toy.errors, c)) for c in itertools.product(range(4), repeat=3)
                       if speedup_of(dict(zip(toy.errors, c))) >= goal]
        assert plan.met and plan.speedup >= goal
        assert plan.error == pytest.approx(min(toy.error_of(c) for c in fast_enough))
        # 1.1: the proportional guess (c's free first step) is fast enough; above, it falls short and
        # the fit through it is exact
        assert [s >= goal for _, s in plan.timed] == ([True] if goal == 1.1 else [False, True])
        assert plan.evaluations == 3 * 3 + 1


def test_to_speedup_keeps_the_fastest_where_the_goal_is_out_of_reach():
    toy = AdditiveUnits({"a": (0.0, 0.01, 0.02), "b": (0.0, 0.01, 0.02)})
    # a narrow kernel runs slower than the wide one (a small saving loses), only the most pays a little
    cliff = lambda strengths: 1.1 if sum(strengths.values()) == 4 else 0.9  # noqa: E731
    plan = budget.to_speedup(toy, toy.error_of, lambda u, s: s, 4, cliff, goal=2.0)
    assert not plan.met and plan.speedup == 1.1 and plan.strengths == {"a": 2, "b": 2}
    assert [s for _, s in plan.timed] == [0.9, 1.1]  # the slower one sends it straight to the most


def test_to_speedup_steps_back_where_its_first_guess_is_faster_than_needed():
    """Savings that pay double (time = cost left minus what was saved again): the proportional guess
    overshoots, and the line between the reference and it leads back to a smaller saving."""
    toy = AdditiveUnits({"a": (0.0, 0.001, 0.004, 0.02), "b": (0.0, 0.002, 0.005, 0.006), "c": (0.0, 0.01, 0.02, 0.03)})
    saves = {"a": (0, 4, 8, 12), "b": (0, 2, 4, 6), "c": (0, 8, 16, 24)}
    total = 42

    def speedup_of(strengths) -> float:
        return total / (total - 2 * sum(saves[u][s] for u, s in strengths.items()))

    plan = budget.to_speedup(toy, toy.error_of, lambda u, s: saves[u][s], total, speedup_of, goal=1.2)
    # 1.2 needs a saving of 3.5: the guess (7: a's second step, 8) reads 1.62x; the line through it
    # asks for 3.5, and a's first step (4, 1.24x) is the least error at or above it
    assert plan.met and plan.saved == 4 and plan.strengths == {"a": 1, "b": 0, "c": 0}
    assert [round(s, 2) for _, s in plan.timed] == [1.62, 1.24]
