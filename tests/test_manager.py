"""Pipeline parsing, the registry, and the PassManager's ordering, verification and failure handling."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from conftest import parse

import onnxopt
from onnxopt import OnnxoptError, Pass, PassFailedError, PassResult, option
from onnxopt.manager import PassManager
from onnxopt.pass_api import PassContext
from onnxopt.pipeline import build_pipeline, parse_spec
from onnxopt.registry import all_passes

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[3] x) => (float[3] y) {
    a = Constant<value = float[3] {1, 2, 3}>()
    b = Neg(a)
    t = Identity(x)
    y = Add(t, b)
}
"""


def test_builtins_register_through_entry_points():
    passes = all_passes()
    assert {"fold", "fuse"} <= set(passes)
    assert passes["fold"].__module__ == "onnxopt.passes.fold"


def test_parse_spec_forms():
    assert parse_spec("fold,fuse") == [("fold", {}), ("fuse", {})]
    assert parse_spec("fold:max_folded_mb=4:dedupe=false,fuse") == [
        ("fold", {"max_folded_mb": "4", "dedupe": "false"}), ("fuse", {})]
    # key=value after a comma continues the previous pass
    assert parse_spec("fold:max_folded_mb=4,dedupe=false,fuse") == [
        ("fold", {"max_folded_mb": "4", "dedupe": "false"}), ("fuse", {})]
    # a colon inside a value (module:function) stays in it
    assert parse_spec("quant:auto=true,eval=models.minilm:score:max_error=0.01,fold") == [
        ("quant", {"auto": "true", "eval": "models.minilm:score", "max_error": "0.01"}), ("fold", {})]
    assert parse_spec("quant:eval=C:/x/f.py:score") == [("quant", {"eval": "C:/x/f.py:score"})]


def test_options_are_type_checked():
    (fold,) = build_pipeline("fold:max_folded_mb=2.5,dedupe=no")
    assert fold.options.max_folded_mb == 2.5 and fold.options.dedupe is False


@pytest.mark.parametrize("spec,message", [
    ("nosuchpass", "unknown pass 'nosuchpass' (valid passes: distill, fold, fuse"),
    ("fold:bogus=1", "pass 'fold' has no option 'bogus' (valid options: max_folded_mb, fold_shapes"),
    ("fuse:gemm=maybe", "option fuse:gemm: expected true or false, got 'maybe'"),
    ("fold:max_folded_mb", "malformed option 'max_folded_mb'"),
    ("", "the pipeline is empty"),
    ("=1", "starts with an option"),
])
def test_pipeline_errors_are_clear(spec, message):
    with pytest.raises(OnnxoptError) as info:
        build_pipeline(spec)
    assert message in str(info.value)


def test_cleanup_passes_run_to_fixed_point():
    manager = PassManager(build_pipeline("fold,fuse"))
    model = manager.run(parse(MODEL))
    assert [n.op_type for n in model.graph.node] == ["Add"]
    runs = [(r.name, r.iteration, r.changed) for r in manager.records]
    # fold changed the model, fuse then found nothing: the group is at its fixed point (passes are idempotent)
    assert runs == [("fold", 1, True), ("fuse", 1, False)]


def test_fixed_point_reruns_until_the_others_are_quiet():
    class Countdown(Pass):
        """Changes the model on its first two runs only."""

        name = "countdown"
        fixed_point = True
        runs = 0

        def run(self, model, ctx):
            Countdown.runs += 1
            return PassResult(model, changed=Countdown.runs <= 2)

    manager = PassManager([Countdown()] + build_pipeline("fold"))
    manager.run(parse(MODEL))
    runs = [(r.name, r.changed) for r in manager.records]
    assert runs == [("countdown", True), ("fold", True), ("countdown", True), ("fold", False)]


@dataclasses.dataclass(frozen=True)
class BreakOptions:
    mode: str = option("dangling", "how to break the model")


class BreakModel(Pass):
    """Test pass that produces an invalid or numerically different model."""

    name = "break"
    Options = BreakOptions

    def run(self, model, ctx):
        node = model.graph.node[-1]
        if self.options.mode == "dangling":
            node.input[0] = "does_not_exist"
        elif self.options.mode == "numeric":
            node.op_type = "Sub"
        else:
            raise RuntimeError("boom")
        return PassResult(model, changed=True, counts={"broken": 1})


@pytest.mark.parametrize("mode,verify,reason", [
    ("dangling", "structure", "checker"),
    ("numeric", "numeric", "outputs differ"),
    ("raise", "structure", "RuntimeError: boom"),
])
def test_broken_pass_stops_with_its_name_and_keeps_last_good(mode, verify, reason):
    ctx = PassContext(sample_inputs=[{"x": np.array([1, 2, 3], np.float32)}])
    passes = build_pipeline("fold") + [BreakModel(BreakOptions(mode))]
    manager = PassManager(passes, verify=verify, ctx=ctx)
    with pytest.raises(PassFailedError) as info:
        manager.run(parse(MODEL))
    assert info.value.pass_name == "break"
    assert reason in str(info.value)
    last_good = info.value.last_good
    onnx.checker.check_model(last_good)
    assert [n.op_type for n in last_good.graph.node] == ["Add"]  # fold's work is kept


def test_numeric_verification_records_agreement():
    ctx = PassContext(sample_inputs=[{"x": np.array([1, 2, 3], np.float32)}])
    manager = PassManager(build_pipeline("fold"), verify="numeric", ctx=ctx)
    manager.run(parse(MODEL))
    first = manager.records[0]
    assert first.changed and first.agreement.max_abs_error == 0.0


def test_optimize_api_returns_model_and_report(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(parse(MODEL), path)
    model, report = onnxopt.optimize(str(path), "fold,fuse", output=tmp_path / "out.onnx", runs=2)
    assert report.original.nodes == 4 and report.optimized.nodes == 1
    assert report.agreement.max_abs_error == 0.0 and report.agreement.cosine == pytest.approx(1.0)
    assert report.latency["original"].runs >= 2
    assert report.latency["original_again"].runs == report.latency["original"].runs  # timed beside them
    assert onnx.load(tmp_path / "out.onnx").graph.node[0].op_type == "Add"


@pytest.mark.parametrize("original, optimized, again, said", [
    (1.0, 0.5, 0.98, "2.00x faster"),
    (1.0, 2.0, 1.01, "2.00x slower"),
    (0.070, 0.080, 0.060, "no measurable change"),  # two sessions of the original differ by more
    (1.0, 0.98, 1.0, "no measurable change"),  # within 3 %
    (1.0, 0.9, None, "1.11x faster"),  # no second session (a model over 256 MB)
])
def test_a_speed_difference_smaller_than_the_timing_noise_is_not_called_one(original, optimized, again, said):
    from onnxopt.report import _speed

    assert _speed(original, optimized, again) == said


def test_pass_objects_can_be_mixed_with_specs():
    model, report = onnxopt.optimize(parse(MODEL), ["fold", BreakModel(BreakOptions("numeric"))],
                                     verify="none", compare=False)
    assert [n.op_type for n in model.graph.node] == ["Sub"]


def test_dynamic_dims_can_be_given_by_name():
    from onnxopt.inputs import generate_inputs

    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[batch, seq] ids, int64[batch, seq] mask) => (int64[batch, seq] y) { y = Add(ids, mask) }
    """)
    feeds = generate_inputs(model, {"batch": (2,), "seq": (5,)})
    assert feeds["ids"].shape == feeds["mask"].shape == (2, 5)
    assert (feeds["mask"] == 1).all()
    with pytest.raises(OnnxoptError, match="or name the dim: --shape seq=N"):
        generate_inputs(model, {"batch": (2,)})
    with pytest.raises(OnnxoptError, match="dynamic dims are batch, seq"):
        generate_inputs(model, {"nope": (2,)})


class UnknownDomain(Pass):
    """Test-only: moves Range into a domain nobody implements. onnx's checker lets a node of an
    imported but unknown domain pass; ONNX Runtime cannot load it."""

    name = "unknown_domain"

    def run(self, model, ctx):
        node = next(n for n in model.graph.node if n.op_type == "Range")
        if node.domain == "test.unknown":
            return PassResult(model, changed=False)
        node.domain = "test.unknown"
        model.opset_import.append(onnx.helper.make_opsetid("test.unknown", 1))
        return PassResult(model, changed=True)


RANGE = """
<ir_version: 8, opset_import: ["" : 17]>
g (int64 limit, int64 step) => (int64[N] r) {
    zero = Constant<value = int64 {0}>()
    r = Range(zero, limit, step)
}
"""


@pytest.mark.parametrize("verify, check", [("none", "ONNX Runtime load"), ("structure", "")])
def test_a_result_onnxruntime_cannot_load_blames_the_pass(verify, check):
    """Even under --verify none: the pass is named, alone or among cleanup passes (found by rerunning them)."""
    model = parse(RANGE)
    with pytest.raises(PassFailedError, match=f"pass 'unknown_domain' broke the model: {check}"):
        onnxopt.optimize(model, [UnknownDomain()], verify=verify, compare=False)
    UnknownDomain.fixed_point = True  # now it runs in one group with fold, which checks once at its end
    try:
        with pytest.raises(PassFailedError, match=f"pass 'unknown_domain' broke the model: {check}"):
            onnxopt.optimize(model, [build_pipeline("fold")[0], UnknownDomain()], verify=verify, compare=False)
    finally:
        UnknownDomain.fixed_point = False
