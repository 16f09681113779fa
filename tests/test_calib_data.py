"""Calibration data: every source kind, batching, sample caps, fingerprints and each validation error."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import ROOT, parse
from onnx import numpy_helper

import onnxopt
from onnxopt.data import RANDOM_SAMPLES, Batches, RepresentativeData, open_batches
from onnxopt.errors import OnnxoptError

DEMO_NPZ = ROOT / "models" / "demo_inputs.npz"


@pytest.fixture(scope="module")
def demo() -> onnx.ModelProto:
    return onnx.load(str(ROOT / "models" / "demo.onnx"))


@pytest.fixture(scope="module")
def tokens() -> onnx.ModelProto:
    """input_ids, attention_mask: int64 [batch, seq] (dynamic); a constant `bias` also listed as input."""
    return parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, float[4] bias) => (float[batch, seq, 4] y)
        <float[3, 4] table = {0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1},
         float[4] bias = {0.5, 0.5, 0.5, 0.5}, int64[1] axes = {2}>
        {
            e = Gather(table, input_ids)
            m = Cast<to = 1>(attention_mask)
            mu = Unsqueeze(m, axes)
            y0 = Mul(e, mu)
            y = Add(y0, bias)
        }
    """)


def token_batch(batch: int, seq: int, dtype=np.int64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seq)
    return {"input_ids": rng.integers(0, 3, (batch, seq)).astype(dtype),
            "attention_mask": np.ones((batch, seq), dtype=dtype)}


def sizes(data) -> list[int]:
    return [next(iter(feeds.values())).shape[0] for feeds in data]


def test_npz_batches_cap_and_fingerprint(demo):
    data = open_batches(DEMO_NPZ, demo, batch_size=5)
    assert isinstance(data, Batches)
    assert data.num_samples == 16 and data.num_batches == 4
    assert sizes(data) == [5, 5, 5, 1] and sizes(data) == [5, 5, 5, 1]  # re-iterable
    reference = np.load(DEMO_NPZ)["image"]
    np.testing.assert_array_equal(np.concatenate([f["image"] for f in data]), reference)
    capped = open_batches(DEMO_NPZ, demo, batch_size=4, samples=6)
    assert sizes(capped) == [4, 2] and capped.num_samples == 6
    assert data.fingerprint() == open_batches(str(DEMO_NPZ), demo, batch_size=5).fingerprint()
    assert data.fingerprint() != capped.fingerprint()


def test_held_out_samples_are_the_ones_after_what_a_pass_reads(demo):
    data = RepresentativeData(DEMO_NPZ)
    reference = np.load(DEMO_NPZ)["image"]  # 16 samples
    for after, count, want in ((10, 8, reference[10:16]), (4, 8, reference[4:12]), (3, 5, reference[3:8])):
        feeds, samples = data.held_out(demo, after, count)
        np.testing.assert_array_equal(feeds["image"], want)
        assert samples == len(want)
    assert data.held_out(demo, 16) is None


@pytest.mark.parametrize("batch", [1, 4])
def test_held_out_samples_fill_a_fixed_batch_exactly(demo, batch):
    """A model exported with a fixed batch runs on exactly that many samples: the report's comparison
    (`quant` reads 128 samples at most, so it compares on the ones after) must not stack 8 of them."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(demo)
    for value in [*fixed.graph.input, *fixed.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = batch
    data = RepresentativeData(DEMO_NPZ)
    reference = np.load(DEMO_NPZ)["image"]  # 16 samples
    feeds, samples = data.held_out(fixed, 10)
    np.testing.assert_array_equal(feeds["image"], reference[10:10 + batch])
    assert samples == batch
    assert data.held_out(fixed, 16 - batch + 1) is None  # fewer than a batch left
    _, report = onnxopt.optimize(fixed, "quant:keep_if_slower=false,samples=8", calib=str(DEMO_NPZ), runs=0)
    assert report.agreement is not None and "no pass read" in report.notes[0]


def test_npy_and_named_pb_directories_match_npz(demo, tmp_path):
    image = np.load(DEMO_NPZ)["image"]
    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "image.npy", image)
    (tmp_path / "pb").mkdir()
    (tmp_path / "pb" / "image.pb").write_bytes(numpy_helper.from_array(image, "image").SerializeToString())
    npz = open_batches(DEMO_NPZ, demo, batch_size=5).fingerprint()
    assert open_batches(tmp_path / "npy", demo, batch_size=5).fingerprint() == npz
    assert open_batches(tmp_path / "pb", demo, batch_size=5).fingerprint() == npz


def write_test_set(folder, arrays):
    folder.mkdir(parents=True)
    for i, array in enumerate(arrays):
        (folder / f"input_{i}.pb").write_bytes(numpy_helper.from_array(array).SerializeToString())


def test_test_data_sets_map_to_real_inputs_in_order(tokens, tmp_path):
    for i, seq in enumerate((5, 7)):  # one set per folder; sequence lengths differ between sets
        batch = token_batch(3, seq)
        write_test_set(tmp_path / f"test_data_set_{i}", [batch["input_ids"], batch["attention_mask"]])
    data = open_batches(tmp_path, tokens, batch_size=2)
    shapes = [feeds["input_ids"].shape for feeds in data]
    assert shapes == [(2, 5), (1, 5), (2, 7), (1, 7)]
    assert all(set(feeds) == {"input_ids", "attention_mask"} for feeds in data)  # `bias` is an initializer
    assert data.num_samples == 6
    single = open_batches(tmp_path / "test_data_set_1", tokens)
    assert [f["input_ids"].shape for f in single] == [(3, 7)]


def test_callable_spec_with_variable_sequence_lengths(tokens, tmp_path, monkeypatch):
    (tmp_path / "my_calib.py").write_text(
        "import numpy as np\n"
        "def batches():\n"
        "    for seq in (32, 57):\n"
        "        yield {'input_ids': np.zeros((4, seq), np.int64), 'attention_mask': np.ones((4, seq), np.int64)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = open_batches("my_calib:batches", tokens)
    assert [f["input_ids"].shape for f in data] == [(4, 32), (4, 57)]
    by_file = open_batches(f"{tmp_path / 'my_calib.py'}:batches", tokens)
    assert by_file.fingerprint() == data.fingerprint()
    with pytest.raises(OnnxoptError, match="has no attribute 'nope'"):
        open_batches("my_calib:nope", tokens)
    with pytest.raises(OnnxoptError, match="cannot import 'no_such_module_xyz'"):
        open_batches("no_such_module_xyz:batches", tokens)


def test_a_module_beside_the_user_imports_without_pythonpath(tmp_path, monkeypatch):
    """`onnxopt ... eval=mymodule:f` from the folder holding mymodule.py, as `python -m` would find it."""
    import sys

    from onnxopt.imports import import_object

    (tmp_path / "beside_user_xyz.py").write_text("def f():\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_object("beside_user_xyz:f", "a test", "")() == 7
    monkeypatch.delitem(sys.modules, "beside_user_xyz")


def test_python_objects(tokens):
    batches = [token_batch(3, 5), token_batch(2, 9)]
    assert sizes(open_batches(lambda: iter(batches), tokens, batch_size=2)) == [2, 1, 2]
    assert sizes(open_batches(batches, tokens)) == [3, 2]
    assert sizes(open_batches(token_batch(5, 4), tokens, batch_size=2)) == [2, 2, 1]
    once = open_batches(iter(batches), tokens)
    assert not once.reiterable and sizes(once) == [3, 2]
    with pytest.raises(OnnxoptError, match="already consumed"):
        list(once)


def test_random_data_warns_loudly(demo, capsys):
    data = open_batches("random", demo, batch_size=8)
    err = capsys.readouterr().err
    assert "RANDOM" in err and "MEANINGLESS" in err and "--calib" in err
    assert data.num_samples == RANDOM_SAMPLES and sizes(data) == [8] * (RANDOM_SAMPLES // 8)
    assert data.fingerprint() == open_batches("random", demo, batch_size=8).fingerprint()  # seeded
    assert sizes(open_batches("random", demo, batch_size=2, samples=3)) == [2, 1]


def test_fixed_batch_dimension_sets_the_batch(tmp_path):
    model = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 3] x) => (float[1, 3] y) { y = Relu(x) }
    """)
    assert sizes(open_batches({"x": np.zeros((4, 3), np.float32)}, model, batch_size=8)) == [1, 1, 1, 1]


@pytest.mark.parametrize("batch, message", [
    ({"image": np.zeros((2, 1, 8, 8), np.float32), "label": np.zeros(2)},
     r"unknown input\(s\) label .*inputs are image"),
    ({}, r"no data for input\(s\) image"),
    ({"image": np.zeros((2, 1, 8, 8), np.float64)}, "'image' is float64, the model wants float32"),
    ({"image": np.zeros((2, 8, 8), np.float32)}, "'image' has rank 3 .* wants rank 4"),
    ({"image": np.zeros((2, 1, 9, 9), np.float32)}, r"shape \[2, 1, 9, 9\], the model wants \['batch', 1, 8, 8\]"),
    ({"image": np.zeros((0, 1, 8, 8), np.float32)}, "holds no samples"),
])
def test_validation_errors(demo, batch, message):
    with pytest.raises(OnnxoptError, match=message):
        open_batches(batch, demo)


def test_int32_is_not_cast_silently(tokens):
    with pytest.raises(OnnxoptError, match="'input_ids' is int32, the model wants int64.*does not cast"):
        open_batches([token_batch(2, 4, np.int32)], tokens)


def test_a_bad_later_batch_fails_before_it_is_yielded(tokens):
    data = open_batches(lambda: iter([token_batch(2, 4), {"input_ids": np.zeros((2, 4), np.int64)}]), tokens)
    seen = []
    with pytest.raises(OnnxoptError, match=r"batch 1\) has no data for input\(s\) attention_mask"):
        for feeds in data:
            seen.append(feeds)
    assert len(seen) == 1


def test_empty_sources(demo, tmp_path):
    with pytest.raises(OnnxoptError, match="holds no samples"):
        open_batches(lambda: iter([]), demo)
    with pytest.raises(OnnxoptError, match="holds no .npy, .pb or test_data_set"):
        open_batches(tmp_path, demo)


def test_bad_paths_and_objects(demo, tmp_path):
    with pytest.raises(OnnxoptError, match="calibration data not found: .*missing.npz"):
        open_batches(tmp_path / "missing.npz", demo)
    (tmp_path / "broken.npz").write_bytes(b"this is not a zip archive")
    with pytest.raises(OnnxoptError, match="broken.npz is not an .npz"):
        open_batches(tmp_path / "broken.npz", demo)
    with pytest.raises(OnnxoptError, match="bare array"):
        open_batches(np.zeros((2, 1, 8, 8), np.float32), demo)
    with pytest.raises(OnnxoptError, match="is a list, not a dict"):
        open_batches([[1, 2]], demo)
    with pytest.raises(OnnxoptError, match="different numbers of samples"):
        open_batches({"input_ids": np.zeros((3, 4), np.int64), "attention_mask": np.zeros((2, 4), np.int64)},
                         parse("""<ir_version: 8, opset_import: ["" : 17]>
                                  g (int64[b, s] input_ids, int64[b, s] attention_mask) => (int64[b, s] y)
                                  { y = Add(input_ids, attention_mask) }"""))


def right_padded(lengths, width=10) -> dict[str, np.ndarray]:
    mask = (np.arange(width)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    return {"input_ids": np.where(mask == 1, 2, 0).astype(np.int64), "attention_mask": mask}


def test_padding_layout_finds_the_mask_and_its_sequence_axis(tokens, demo):
    from onnxopt.data.padding import PaddingLayout, padding_layout

    assert padding_layout(tokens) == PaddingLayout("attention_mask", ("input_ids", "attention_mask"))
    assert padding_layout(demo) is None
    fixed = parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (int64[batch, 16] input_ids, int64[batch, 16] attention_mask) => (int64[batch, 16] y) {
            y = Add(input_ids, attention_mask)
        }
    """)
    assert padding_layout(fixed) is None  # a fixed sequence length cannot be cut


def test_trim_cuts_trailing_padding_and_keeps_one_position(tokens):
    from onnxopt.data.padding import padding_layout, trim

    layout = padding_layout(tokens)
    cut = trim(right_padded([3, 5, 2]), layout)
    assert cut["attention_mask"].shape == cut["input_ids"].shape == (3, 6)
    assert cut["attention_mask"][:, -1].sum() == 0  # the additive mask still sees a padded position
    assert trim(right_padded([10, 4]), layout)["input_ids"].shape == (2, 10)  # nothing to cut
    left = {k: v[:, ::-1].copy() for k, v in right_padded([3, 5]).items()}
    assert trim(left, layout)["input_ids"].shape == (2, 10)  # left padding: positions would shift
    counts = right_padded([3, 5])
    counts["attention_mask"] = counts["attention_mask"] * 2
    assert trim(counts, layout)["input_ids"].shape == (2, 10)  # not a 0/1 mask


def test_trimmed_calibration_batches_by_length_and_untrimmed_gives_the_data(tokens):
    lengths = [9, 2, 7, 3, 1, 8, 4]
    data = open_batches(right_padded(lengths), tokens, batch_size=3, samples=6, trim_padding=True)
    batches = list(data)
    assert [b["attention_mask"].sum(1).tolist() for b in batches] == [[1, 2, 3], [7, 8, 9]]  # first 6, sorted
    assert [b["input_ids"].shape[1] for b in batches] == [4, 10]
    assert data.positions == [3 * 4 + 3 * 10, 6 * 10]
    assert [b["input_ids"].shape for b in data.untrimmed()] == [(3, 10), (3, 10)]
    assert [b["attention_mask"].sum(1).tolist() for b in data.untrimmed()] == [[9, 2, 7], [3, 1, 8]]
    plain = open_batches(right_padded(lengths), tokens, batch_size=3, samples=6)
    assert [b["input_ids"].shape for b in plain] == [(3, 10), (3, 10)]


@pytest.mark.slow
def test_real_tokens_do_not_depend_on_trailing_padding(minilm_model):
    """The premise of trim_padding, on the real MiniLM export: cut batches give the same activations."""
    from conftest import ort_run
    from models import minilm

    from onnxopt.data.padding import padding_layout, trim

    model = onnx.load(str(minilm_model))
    feeds = minilm.evaluation_feeds(8)
    cut = trim(feeds, padding_layout(model))
    width = cut["input_ids"].shape[1]
    assert width < feeds["input_ids"].shape[1] // 2
    full, short = ort_run(model, feeds)[0], ort_run(model, cut)[0]
    real = cut["attention_mask"].astype(bool)
    np.testing.assert_allclose(short[real], full[:, :width][real], rtol=1e-4, atol=1e-4)


def test_auto_mode_evaluates_batches_spread_over_length_sorted_data(tokens):
    from onnxopt.budget import EVAL_SAMPLES, _spread_batches

    lengths = list(range(1, 10)) * 8  # 72 samples, 9 batches of 8 once sorted by length
    data = open_batches(right_padded(lengths), tokens, batch_size=8, trim_padding=True)
    list(data)  # a full pass, as calibration makes: the batch count is known from now on
    chosen = _spread_batches(data)
    assert sum(len(b["input_ids"]) for b in chosen) == EVAL_SAMPLES
    assert [int(b["attention_mask"].sum(1).max()) for b in chosen] == [3, 7]  # not the two shortest


def test_sequence_and_optional_inputs_are_read_from_test_data_sets(tmp_path, capsys):
    """onnx's test data writes a sequence input as a SequenceProto and an optional one as an
    OptionalProto; --data reads them by the model's input types (onnx's node tests: sequence_*)."""
    from onnx import helper

    from onnxopt.cli import main
    from onnxopt.data import load_feeds

    seq = helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("SequenceLength", ["s"], ["n"])], "g", [seq],
                              [helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "seq.onnx")
    data = tmp_path / "test_data_set_0"
    data.mkdir()
    items = [np.ones((2, 3), np.float32), np.zeros((4,), np.float32)]
    (data / "input_0.pb").write_bytes(numpy_helper.from_list(items, "s").SerializeToString())
    feeds = load_feeds(data, model)
    assert [a.shape for a in feeds["s"]] == [(2, 3), (4,)]
    assert main([str(tmp_path / "seq.onnx"), "-p", "fold", "--data", str(data), "--runs", "2"]) == 0
    assert "cosine" in capsys.readouterr().out
    np.savez(tmp_path / "array.npz", s=np.ones(3, np.float32))
    with pytest.raises(OnnxoptError, match="input 's' is a sequence, not a ndarray"):
        load_feeds(tmp_path / "array.npz", model)


def test_minilm_calibration_never_reaches_the_evaluation_sentences():
    from models import minilm

    with pytest.raises(ValueError, match="overlap the evaluation sentences"):
        minilm.calibration_npz(minilm.EVAL_OFFSET + 1)
