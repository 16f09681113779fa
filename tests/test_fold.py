"""The `fold` pass: constant folding, static shapes, identities, duplicates, dead code."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_same_outputs, op_types, parse, run_pass

from onnxopt.passes.fold import FoldConstants

SHAPE_ARITHMETIC = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3, 4] x) => (float[2, 12] y) {
    s = Shape(x)
    i0 = Constant<value = int64[1] {0}>()
    d0 = Gather<axis = 0>(s, i0)
    rest = Constant<value = int64[1] {-1}>()
    new_shape = Concat<axis = 0>(d0, rest)
    y = Reshape(x, new_shape)
}
"""

CONSTANT_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[4] x) => (float[4] y) {
    a = Constant<value = float[4] {1, 2, 3, 4}>()
    b = Constant<value = float[4] {10, 20, 30, 40}>()
    ab = Mul(a, b)
    c = Sqrt(ab)
    t = Identity(x)
    y = Add(t, c)
}
"""


def test_folds_constant_chain_into_one_initializer():
    model = parse(CONSTANT_CHAIN)
    result = run_pass(FoldConstants, model)
    assert result.changed
    assert op_types(result.model) == ["Add"]
    assert len(result.model.graph.initializer) == 1
    x = np.arange(4, dtype=np.float32)
    assert_same_outputs(model, result.model, {"x": x})


def test_static_shape_arithmetic_becomes_constant():
    model = parse(SHAPE_ARITHMETIC)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Reshape"]
    shape = onnx.numpy_helper.to_array(result.model.graph.initializer[0])
    assert shape.tolist() == [2, -1]
    assert_same_outputs(model, result.model, {"x": np.random.rand(2, 3, 4).astype(np.float32)})


def test_dynamic_shape_is_left_alone():
    model = parse(SHAPE_ARITHMETIC.replace("float[2, 3, 4] x", "float[N, 3, 4] x").replace("float[2, 12] y", "float[N, 12] y"))
    result = run_pass(FoldConstants, model, fold_shapes=True)
    assert "Shape" in op_types(result.model) and "Reshape" in op_types(result.model)
    assert_same_outputs(model, result.model, {"x": np.random.rand(5, 3, 4).astype(np.float32)})


def test_leaves_a_clean_graph_unchanged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 3] x, float[3, 4] w) => (float[2, 4] y) { y = MatMul(x, w) }
    """)
    result = run_pass(FoldConstants, model)
    assert not result.changed
    assert result.counts == {}


def test_idempotent():
    first = run_pass(FoldConstants, parse(CONSTANT_CHAIN)).model
    second = run_pass(FoldConstants, first)
    assert not second.changed
    assert second.model.SerializeToString() == first.SerializeToString()


def test_removes_dead_nodes_and_unused_initializers():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) <float[3] unused = {1, 2, 3}> {
        dead = Relu(x)
        dead2 = Neg(dead)
        y = Abs(x)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Abs"]
    assert len(result.model.graph.initializer) == 0
    assert result.counts["dead nodes removed"] == 2


def test_removes_dropout_in_inference_but_keeps_used_mask():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y, bool[3] m) {
        d = Dropout(x)
        y = Relu(d)
        a, m = Dropout(x)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model).count("Dropout") == 1
    assert result.counts["identities removed"] == 1


def test_identity_producing_a_graph_output_keeps_the_output_name():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) { r = Relu(x)
      y = Identity(r) }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Relu"]
    assert result.model.graph.node[0].output[0] == "y"
    assert_same_outputs(model, result.model, {"x": np.array([-1, 0, 2], np.float32)})


def test_identity_between_input_and_output_stays():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) { y = Identity(x) }
    """)
    assert not run_pass(FoldConstants, model).changed


def test_merges_duplicate_initializers_and_common_subexpressions():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) <float[3] w1 = {1, 2, 3}, float[3] w2 = {1, 2, 3}> {
        a = Mul(x, w1)
        b = Mul(x, w2)
        y = Add(a, b)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Mul", "Add"]
    assert len(result.model.graph.initializer) == 1
    assert_same_outputs(model, result.model, {"x": np.array([1, 2, 3], np.float32)})


def test_random_ops_are_never_folded_or_merged():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[3] x) => (float[3] y) {
        r1 = RandomUniform<shape = [3]>()
        r2 = RandomUniform<shape = [3]>()
        s = Add(r1, r2)
        y = Add(x, s)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model).count("RandomUniform") == 2


def test_subgraph_outer_scope_tensors_survive():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (bool c, float[3] x) => (float[3] y) <float[3] w = {1, 2, 3}> {
        wi = Identity(w)
        y = If(c) <
            then_branch = t () => (float[3] o) { o = Add(x, wi) },
            else_branch = e () => (float[3] o) { o = Sub(x, wi) }
        >
    }
    """)
    result = run_pass(FoldConstants, model)
    onnx.checker.check_model(result.model)
    for c in (True, False):
        assert_same_outputs(model, result.model, {"c": np.array(c), "x": np.array([1, 1, 1], np.float32)})


def test_max_folded_mb_leaves_large_results_unfolded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[512, 1024] x) => (float[512, 1024] y) {
        shape = Constant<value = int64[2] {512, 1024}>()
        big = ConstantOfShape<value = float[1] {0.5}>(shape)
        y = Add(x, big)
    }
    """)
    result = run_pass(FoldConstants, model, max_folded_mb=1.0)
    assert "ConstantOfShape" in op_types(result.model)
    assert any("MB" in s for s in result.skipped)
    unlimited = run_pass(FoldConstants, model)
    assert op_types(unlimited.model) == ["Add"]


def test_option_validation_message():
    from onnxopt.errors import OnnxoptError
    from onnxopt.options import build_options

    with pytest.raises(OnnxoptError, match="max_folded_mb must be >= 0"):
        build_options("fold", FoldConstants.Options, {"max_folded_mb": "-1"})
    with pytest.raises(OnnxoptError, match="expected float"):
        build_options("fold", FoldConstants.Options, {"max_folded_mb": "lots"})


def test_reshape_copying_dynamic_dims_gets_a_constant_shape():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, S, 8] x) => (float[B, S, 2, 4] y) {
        s = Shape(x)
        i0 = Constant<value = int64 {0}>()
        i1 = Constant<value = int64 {1}>()
        ax = Constant<value = int64[1] {0}>()
        b = Gather(s, i0)
        q = Gather(s, i1)
        bu = Unsqueeze(b, ax)
        qu = Unsqueeze(q, ax)
        rest = Constant<value = int64[2] {2, 4}>()
        shape = Concat<axis = 0>(bu, qu, rest)
        y = Reshape(x, shape)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Reshape"]
    target = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer
                                             if t.name == result.model.graph.node[0].input[1]))
    assert target.tolist() == [0, 0, 2, 4]
    for shape in ((1, 3, 8), (4, 7, 8)):
        assert_same_outputs(model, result.model, {"x": np.random.rand(*shape).astype(np.float32)})


def test_a_reshape_target_with_a_computed_dim_is_left_alone():
    """ShuffleNet's channel shuffle as TorchScript writes it: one piece of the target is a dim divided
    by the number of groups and cast, not a copy of an input dim (the fold crashed on it)."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 8, 3] x) => (float[B, 2, 4, 3] y) {
        s = Shape(x)
        i0 = Constant<value = int64 {0}>()
        i1 = Constant<value = int64 {1}>()
        two = Constant<value = int64 {2}>()
        ax = Constant<value = int64[1] {0}>()
        b = Gather(s, i0)
        c = Gather(s, i1)
        half = Div(c, two)
        cast = Cast<to = 7>(half)
        bu = Unsqueeze(b, ax)
        cu = Unsqueeze(cast, ax)
        groups = Constant<value = int64[1] {2}>()
        rest = Constant<value = int64[1] {3}>()
        shape = Concat<axis = 0>(bu, groups, cu, rest)
        y = Reshape(x, shape)
    }
    """)
    result = run_pass(FoldConstants, model)
    onnx.checker.check_model(result.model)
    assert_same_outputs(model, result.model, {"x": np.random.rand(2, 8, 3).astype(np.float32)})


def test_reshapes_sharing_a_target_share_its_constant_copy():
    """Q, K and V's Reshapes read one target Concat (a ViT's TorchScript export): the static copy is
    made once, under a name nothing else has (once per Reshape, the checker refused the model)."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, S, 8] x) => (float[B, S, 2, 4] q, float[B, S, 2, 4] k, float[B, S, 2, 4] v) {
        s = Shape(x)
        i0 = Constant<value = int64 {0}>()
        i1 = Constant<value = int64 {1}>()
        ax = Constant<value = int64[1] {0}>()
        b = Gather(s, i0)
        n = Gather(s, i1)
        bu = Unsqueeze(b, ax)
        nu = Unsqueeze(n, ax)
        rest = Constant<value = int64[2] {2, 4}>()
        shape = Concat<axis = 0>(bu, nu, rest)
        shape_static = Identity(rest)
        xk = Neg(x)
        xv = Abs(x)
        q = Reshape(x, shape)
        k = Reshape(xk, shape)
        v = Reshape(xv, shape)
    }
    """)
    result = run_pass(FoldConstants, model)
    onnx.checker.check_model(result.model, full_check=True)
    targets = {n.input[1] for n in result.model.graph.node if n.op_type == "Reshape"}
    assert len(targets) == 1 and targets != {"shape_static"}
    assert_same_outputs(model, result.model, {"x": np.random.rand(3, 5, 8).astype(np.float32)})


def test_static_dims_sliced_from_a_dynamic_shape_are_folded():
    """TorchScript writes x.size(-1) as Slice(Shape(x), -1, INT_MAX): with the last dim known, a constant."""
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, S, 8] x) => (float[B, S, 8] y) {
        s = Shape(x)
        last = Constant<value = int64[1] {-1}>()
        end = Constant<value = int64[1] {9223372036854775807}>()
        first = Constant<value = int64[1] {0}>()
        width = Slice(s, last, end)
        lead = Slice(s, first, last)
        shape = Concat<axis = 0>(lead, width)
        y = Reshape(x, shape)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert "Slice" in op_types(result.model)  # [B, S] stays dynamic
    assert op_types(result.model).count("Slice") == 1
    assert_same_outputs(model, result.model, {"x": np.random.rand(2, 3, 8).astype(np.float32)})


def test_static_dim_gathered_from_a_dynamic_shape_is_folded():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[B, 8] x) => (float[B, 8] y) {
        s = Shape(x)
        i = Constant<value = int64 {1}>()
        d = Gather(s, i)
        f = Cast<to = 1>(d)
        y = Div(x, f)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Div"]
    assert_same_outputs(model, result.model, {"x": np.random.rand(3, 8).astype(np.float32)})


def test_unsqueeze_chains_and_same_type_casts_collapse():
    model = parse("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[N] x) => (int64[1, N, 1, 1] y) {
        a0 = Constant<value = int64[1] {0}>()
        a1 = Constant<value = int64[1] {2}>()
        a2 = Constant<value = int64[1] {-1}>()
        u = Unsqueeze(x, a0)
        v = Unsqueeze(u, a1)
        w = Unsqueeze(v, a2)
        y = Cast<to = 7>(w)
    }
    """)
    result = run_pass(FoldConstants, model)
    assert op_types(result.model) == ["Unsqueeze"]
    assert_same_outputs(model, result.model, {"x": np.arange(5, dtype=np.int64)})


CONSTANT_IF = """
<ir_version: 8, opset_import: ["" : 18]>
g (int64[4] size) => (int64[N] r, int64[1] w1) {
    n = Size(size)
    four = Constant<value = int64 {4}>()
    is_4d = Equal(n, four)
    w = If(is_4d) <then_branch = then_g () => (int64[1] w_then) {
                       a, b, c, w_then = Split<num_outputs = 4>(size)
                   }, else_branch = else_g () => (int64[1] w_else) {
                       w_else = Constant<value = int64[1] {1}>()
                   }>
    zero = Constant<value = int64 {0}>()
    one = Constant<value = int64 {1}>()
    r = Range(zero, w, one)
    w1 = Identity(w)
}
"""


def test_an_if_with_a_constant_condition_becomes_its_branch_and_range_keeps_a_scalar():
    """Once `is_4d` folds to true, ONNX Runtime would inline the If on load and refuse Range's [1]-shaped
    limit; fold inlines it itself and gives Range a scalar, while `w1` keeps its shape [1]."""
    model = parse(CONSTANT_IF)
    result = run_pass(FoldConstants, model)
    assert "If" not in op_types(result.model) and result.counts["constant Ifs inlined"] == 1
    assert op_types(result.model) == ["Split", "Reshape", "Range"]
    assert_same_outputs(model, result.model, {"size": np.array([1, 1, 3, 5], np.int64)})


def test_two_ifs_whose_branches_share_names_are_both_inlined():
    """Branch-local names may repeat across If nodes; the second branch's are renamed as it is inlined."""
    second = CONSTANT_IF.replace("r = Range(zero, w, one)", "r = Range(zero, w, one)\n    v = If(is_4d) <then_branch = "
                                 "then_g2 () => (int64[1] w_then) { a, b, c, w_then = Split<num_outputs = 4>(size) }, "
                                 "else_branch = else_g2 () => (int64[1] w_else) { w_else = Constant<value = int64[1] "
                                 "{1}>() }>\n    v2 = Add(v, w)").replace("=> (int64[N] r, int64[1] w1)",
                                                                        "=> (int64[N] r, int64[1] w1, int64[1] v2)")
    model = parse(second)
    result = run_pass(FoldConstants, model)
    assert "If" not in op_types(result.model) and result.counts["constant Ifs inlined"] == 2
    assert_same_outputs(model, result.model, {"size": np.array([1, 1, 3, 5], np.int64)})


def _recorded(model: onnx.ModelProto) -> set[str]:
    return {vi.name for vi in model.graph.value_info}


def test_recorded_shapes_are_dropped_for_the_cpu_ep_and_kept_elsewhere_or_on_request():
    from onnxopt.manager import copy_model
    from onnxopt.options import build_options
    from onnxopt.pass_api import PassContext

    model = onnx.shape_inference.infer_shapes(parse("""
    <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
    g (float[2, 3] x) => (float[2, 3] y) {
        r = Relu(x)
        c = com.example.Custom(r)
        y = Add(r, c)
    }
    """))
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, [2, 3]))
    assert _recorded(model) == {"r", "c"}
    dropped = run_pass(FoldConstants, model)
    assert dropped.counts == {"recorded shapes dropped": 1}
    assert _recorded(dropped.model) == {"c"}  # onnx cannot infer a custom op's output: its record stays
    assert _recorded(run_pass(FoldConstants, model, recorded_shapes="keep").model) == {"r", "c"}

    def on(ep: str, **options) -> onnx.ModelProto:
        fold = FoldConstants(build_options("fold", FoldConstants.Options, options))
        return fold.run(copy_model(model), PassContext(ep=ep)).model

    assert _recorded(on("cuda")) == {"r", "c"}  # ORT's SkipLayerNormalization is a fused kernel on GPUs
    assert _recorded(on("cuda", recorded_shapes="drop")) == {"c"}
