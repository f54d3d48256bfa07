"""Stage two out of core (pipeline.compute) and its artifacts (store.artifacts)."""
from __future__ import annotations

import numpy as np
import pytest

from store.logits import open_logits
from store.schema import StoreError

scores = pytest.importorskip("pipeline.scores")
compute = pytest.importorskip("pipeline.compute")

METHODS = {"td_dyun": {"trajectory": "all", "wdu": {"window": 4}, "tsdd": {"window": 4}},
           "el2n": {}, "random": {}}


def _mb(samples: int, epochs: int, classes: int) -> float:
    """block_mb that asks for exactly ``samples`` float32 samples of (epochs, classes)."""
    return samples * epochs * classes * 4 / 2**20


def _resolve(methods, epochs, prune_rate=0.5):
    return scores.resolve_methods(methods, epochs=epochs, prune_rate=prune_rate)


# ---------------------------------------------------------------------------------------------
# blocked == whole
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("samples", [32, 64, 96, 128, 10_000])  # 300 = 9×32+12: none divides it but 300
def test_blocked_equals_whole(make_store, samples):
    path, logits, labels, _ = make_store(n=300, classes=5, epochs=10, chunk=32)
    store = open_logits(path)
    resolved = _resolve(METHODS, store.epochs_complete)
    t = scores.epochs_needed(resolved)
    result = compute.score_store(store, resolved, block_mb=_mb(samples, t, 5), seed=3)
    whole = scores.score_arrays(logits, labels, METHODS, prune_rate=0.5, seed=3)
    assert result.block == min(300, samples)
    assert result.num_blocks == -(-300 // result.block)
    assert result.epochs_read == t
    assert result.bytes_read == t * 300 * 5 * 4
    assert set(result.arrays) == set(whole) >= {"td_dyun", "wdu", "tsdd", "el2n", "random"}
    for name, expected in whole.items():
        got = result.arrays[name]
        assert got.shape == (300,), name
        bad = ~np.isclose(got, expected, rtol=2e-5, atol=1e-6)
        assert not bad.any(), _explain_mismatch(store, resolved, logits, labels, result, whole, name, bad)


def _explain_mismatch(store, resolved, logits, labels, result, whole, name, bad) -> str:
    """A blocked-vs-whole mismatch, told so that one CI failure says where it came from: the
    machine, the samples, and for each block holding them whether the store still reads back
    the logits written, and what scoring the block again here (native kernel and eager, this
    thread) gives, against the pass's value and the whole-array one."""
    from pipeline import native

    def rel(a, ref):
        return float(np.max(np.abs(a - ref) / (np.abs(ref) + 1e-6)))

    t, block = result.epochs_read, result.block
    model, _, flags = native._cpu_signature().partition("\n")  # /proc/cpuinfo's model name and flags
    cpu = f"{model.partition(':')[2].strip()} (avx512f {'avx512f' in flags.split()})"
    rows = [f"{name}: {int(bad.sum())} of {bad.size} samples differ, at {np.flatnonzero(bad)[:12].tolist()}; "
            f"CPU {cpu}; kernel {result.extra.get('kernel')} ({native.kernel_path().name})"]
    read_back = store.read_epochs(0, t)
    for b in np.unique(np.flatnonzero(bad) // block):
        part = slice(b * block, min((b + 1) * block, bad.size))
        again = {k: scores.compute_block(logits[:t, part], labels[part], resolved, kernel=k)[name]
                 for k in ("native", "eager") if k == "eager" or native.available()}
        rows.append(
            f"block {b} (samples {part.start}..{part.stop - 1}): store reads back the written logits: "
            f"{np.array_equal(read_back[:, part], logits[:t, part])}; max relative difference from the whole-array "
            f"value: this pass {rel(result.arrays[name][part], whole[name][part]):.2e}, "
            + ", ".join(f"{k} again {rel(v, whole[name][part]):.2e}" for k, v in again.items()))
    return "\n".join(rows)


def test_blocked_equals_whole_workers_and_progress(make_store, capsys):
    path, logits, labels, _ = make_store(n=200, classes=4, epochs=8, chunk=16)
    store = open_logits(path)
    methods = {"td_dyun": {"wdu": {"window": 3}, "tsdd": {"window": 3}}}
    resolved = _resolve(methods, 8, prune_rate=0.3)
    t = scores.epochs_needed(resolved)
    one = compute.score_store(store, resolved, block_mb=_mb(48, t, 4), workers=1)
    two = compute.score_store(store, resolved, block_mb=_mb(16, t, 4), workers=2, progress=True)
    sliced = compute.score_store(store, resolved, block_mb=_mb(48, t, 4), slice_mb=_mb(7, t, 4))
    whole = scores.score_arrays(logits, labels, methods, prune_rate=0.3)  # auto T from E = 8
    for name in whole:
        np.testing.assert_allclose(one.arrays[name], whole[name], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(two.arrays[name], whole[name], rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(sliced.arrays[name], whole[name], rtol=2e-5, atol=1e-6)
    assert "100%" in capsys.readouterr().err  # dask's ProgressBar


def test_reads_only_complete_epochs_and_ignores_later_ones(make_store):
    # epochs 6..9 planned but never written (NaN fill): a trajectory of 6 epochs never touches them
    path, logits, labels, _ = make_store(n=120, classes=3, epochs=10, complete=6, chunk=16)
    store = open_logits(path)
    methods = {"el2n": {"trajectory": 6}}
    result = compute.score_store(store, _resolve(methods, 6), block_mb=1.0)
    np.testing.assert_allclose(result.arrays["el2n"], scores.score_arrays(logits[:6], labels, methods)["el2n"],
                               rtol=2e-5, atol=1e-6)
    assert result.epochs_read == 6


# ---------------------------------------------------------------------------------------------
# block size and the split-axis check
# ---------------------------------------------------------------------------------------------
def test_choose_block_aligns_to_chunks():
    mib = 2**20
    # 10 epochs × 100 classes × 4 B = 4000 B a sample
    assert compute.choose_block(1.0, epochs=10, num_classes=100, chunk=64, num_samples=10_000) == (mib // 4000) // 64 * 64
    # a chunk of all T epochs above twice block_mb is split evenly: memory stays bounded
    per_sample_mb = 10 * 100 * 4 / 2**20
    assert compute.choose_block(40 * per_sample_mb, epochs=10, num_classes=100, chunk=64, num_samples=10_000) == 64
    assert compute.choose_block(31 * per_sample_mb, epochs=10, num_classes=100, chunk=64, num_samples=10_000) == 22
    assert compute.choose_block(1e-6, epochs=10, num_classes=100, chunk=64, num_samples=10_000) == 1
    assert compute.choose_block(1e6, epochs=10, num_classes=100, chunk=64, num_samples=1000) == 1000  # capped at N
    with pytest.raises(ValueError, match="block_mb"):
        compute.choose_block(0.0, epochs=10, num_classes=100, chunk=64, num_samples=1000)


def test_split_axis_check_fires_on_bad_chunking():
    import dask.array as da

    good = da.zeros((8, 100, 5), chunks=(8, 30, 5))
    compute.check_unsplit(good.chunks, epochs=8, num_classes=5)
    with pytest.raises(AssertionError, match="epoch axis is split"):
        compute.check_unsplit(da.zeros((8, 100, 5), chunks=(4, 30, 5)).chunks, epochs=8, num_classes=5)
    with pytest.raises(AssertionError, match="class axis is split"):
        compute.check_unsplit(da.zeros((8, 100, 5), chunks=(8, 30, 2)).chunks, epochs=8, num_classes=5)
    with pytest.raises(AssertionError, match="epoch or class axis was split"):
        compute.check_block((4, 30, 5), epochs=8, num_classes=5, num_labels=30)


def test_block_task_refuses_a_split_block():
    resolved = _resolve({"el2n": {}}, 8)
    x = np.zeros((4, 10, 5), dtype=np.float32)  # half the epochs
    with pytest.raises(AssertionError, match="split"):
        compute._block_task(x, np.zeros((1, 10, 1), dtype=np.int32), resolved=resolved, device="cpu",
                            task_epochs=8, num_classes=5, slice_samples=4)


def test_split_check_fires_inside_score_store(make_store, monkeypatch):
    """A reader that splits the epoch or class axis is caught before any score is computed."""
    path, *_ = make_store(n=64, classes=3, epochs=6, chunk=16)
    store = open_logits(path)
    import dask.array as da

    for chunks, match in (((1, 16, 3), "epoch axis is split"), ((6, 16, 2), "class axis is split")):
        monkeypatch.setattr(compute, "logit_blocks", lambda store, *, epochs, block, chunks=chunks:
                            da.from_zarr(store.logits_array(), chunks=chunks))
        with pytest.raises(AssertionError, match=match):
            compute.score_store(store, _resolve({"el2n": {}}, 6), block_mb=1.0)


def test_read_is_fused_into_the_scoring_task(make_store):
    """One task per block reads and scores it: no separate read task that could run ahead."""
    path, *_ = make_store(n=100, classes=3, epochs=6, chunk=16)
    store = open_logits(path)
    tasks = compute._build_graph(store, _resolve({"el2n": {}}, 6), epochs=6, block=32, device="cpu",
                                 slice_samples=8)
    assert len(tasks) == 4
    graph = dict(tasks[0].__dask_graph__())
    names = {key[0] if isinstance(key, tuple) else key for key in graph}
    assert not any("getitem" in name or name.startswith("from-zarr") for name in names), names


# ---------------------------------------------------------------------------------------------
# errors: too few epochs, NaN/inf, labels
# ---------------------------------------------------------------------------------------------
def test_too_few_complete_epochs_names_store_needed_and_method(make_store):
    path, *_ = make_store(n=64, classes=3, epochs=10, complete=4, chunk=16)
    store = open_logits(path)
    resolved = _resolve({"el2n": {"trajectory": 8}}, 10)  # resolved against the planned 10
    with pytest.raises(StoreError) as info:
        compute.score_store(store, resolved, block_mb=1.0)
    message = str(info.value)
    assert str(path) in message and "8" in message and "el2n" in message and "4" in message


@pytest.mark.parametrize("kernel", ["eager", "auto"])  # auto: the native kernel's own check, where it builds
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_logits_name_epoch_and_count(make_store, bad, kernel):
    def poison(z):
        z = z.copy()
        z[3, [5, 70, 71], 1] = bad  # three samples in two blocks at epoch 3
        z[6, 5, 0] = bad  # one of them again later
        return z

    path, *_ = make_store(n=128, classes=4, epochs=8, chunk=16, mutate=poison)
    store = open_logits(path)
    with pytest.raises(StoreError) as info:
        compute.score_store(store, _resolve({"el2n": {"trajectory": 8}}, 8), block_mb=_mb(32, 8, 4), kernel=kernel)
    message = str(info.value)
    assert str(path) in message
    assert "epoch 3" in message and "3 samples" in message and "NaN or inf" in message


def test_nonfinite_after_the_trajectory_is_ignored(make_store):
    def poison(z):
        z = z.copy()
        z[7, 5, 1] = np.nan
        return z

    path, *_ = make_store(n=64, classes=3, epochs=8, chunk=16, mutate=poison)
    result = compute.score_store(open_logits(path), _resolve({"el2n": {"trajectory": 5}}, 8), block_mb=1.0)
    assert np.isfinite(result.arrays["el2n"]).all()


def test_check_labels_mismatch_names_fingerprints(make_store):
    from store.logits import labels_fingerprint

    path, _, labels, _ = make_store(n=64, classes=3, epochs=4, chunk=16)
    store = open_logits(path)
    compute.check_labels(store, labels)  # same labels: fine
    other = labels.copy()
    other[[0, 1]] = other[[1, 0]] if other[0] != other[1] else (other[[0, 1]] + 1) % 3
    with pytest.raises(StoreError) as info:
        compute.check_labels(store, other)
    message = str(info.value)
    assert str(path) in message and "fingerprint" in message
    assert labels_fingerprint(other) in message and store.fingerprint in message


def test_check_data_config_names_both_values(make_store):
    from pipeline.config import DataConfig, config_to_dict, Config

    path, *_ = make_store(n=64, classes=3, epochs=4, chunk=16)
    store = open_logits(path)
    data = config_to_dict(Config(data=DataConfig(name="synthetic", synthetic_samples=64,
                                                 synthetic_classes=3)))["data"]
    compute.check_data_config(store, data)
    compute.check_data_config(store, {**data, "root": "/elsewhere"})  # where it lives is not what it is
    with pytest.raises(StoreError) as info:
        compute.check_data_config(store, {**data, "seed": 7}, source="p.yaml")
    message = str(info.value)
    assert "data.seed = 7 in p.yaml" in message and "0 in the store" in message and str(path) in message


def test_cuda_unavailable_is_a_clear_error(make_store):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path, *_ = make_store(n=64, classes=3, epochs=4, chunk=16)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        compute.score_store(open_logits(path), _resolve({"el2n": {}}, 4), block_mb=1.0, device="cuda")


# ---------------------------------------------------------------------------------------------
# artifacts: scores.zarr, keep.csv, atomicity
# ---------------------------------------------------------------------------------------------
def test_scores_round_trip(tmp_path):
    from store.artifacts import read_scores, write_scores

    arrays = {"td_dyun": np.linspace(0, 1, 50), "wdu": np.arange(50, dtype=np.float32),
              "forgetting": np.full(50, np.inf)}
    write_scores(tmp_path / "scores.zarr", arrays, {"directions": {"td_dyun": "higher = keep"},
                                                     "store": {"path": "x", "fingerprint": "f"},
                                                     "alpha": np.float64(0.5)})
    back, attrs = read_scores(tmp_path / "scores.zarr")
    assert list(back) == list(arrays)
    for name in arrays:
        np.testing.assert_array_equal(back[name], arrays[name])
        assert back[name].dtype == arrays[name].dtype
    assert attrs["num_samples"] == 50 and attrs["alpha"] == 0.5 and attrs["store"]["fingerprint"] == "f"


def test_write_scores_refuses_mismatched_lengths(tmp_path):
    from store.artifacts import write_scores

    with pytest.raises(ValueError, match="'b'"):
        write_scores(tmp_path / "s.zarr", {"a": np.zeros(5), "b": np.zeros(4)}, {})
    assert not (tmp_path / "s.zarr").exists()


def test_write_scores_is_atomic(tmp_path, monkeypatch):
    from store import artifacts

    target = tmp_path / "scores.zarr"
    artifacts.write_scores(target, {"a": np.zeros(10)}, {"version": "old"})
    real = artifacts._write_array
    calls = []

    def failing(group, name, values):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted mid-write
        real(group, name, values)

    monkeypatch.setattr(artifacts, "_write_array", failing)
    with pytest.raises(KeyboardInterrupt):
        artifacts.write_scores(target, {"a": np.ones(10), "b": np.ones(10)}, {"version": "new"})
    back, attrs = artifacts.read_scores(target)  # the old group, whole
    assert attrs["version"] == "old" and list(back) == ["a"] and not back["a"].any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.zarr"]  # no temporary left
    # and with no previous output, nothing appears
    with pytest.raises(KeyboardInterrupt):
        calls.clear()
        artifacts.write_scores(tmp_path / "fresh.zarr", {"a": np.ones(3), "b": np.ones(3)}, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.zarr"]


def test_keep_csv_round_trip(tmp_path):
    from store.artifacts import KEEP_HEADER, read_keep_csv, write_keep_csv

    ids = np.array([0, 3, 4, 10, 99], dtype=np.int64)
    weights = np.array([0.25, 1.0, 1 / 3, 4.0, 0.1 + 0.2])
    score = np.array([0.1, np.inf, -2.5, 1e-30, 7.0])
    path = write_keep_csv(tmp_path / "keep.csv", ids, weights, score)
    assert path.read_text().splitlines()[0] == KEEP_HEADER
    got_ids, got_w, got_s = read_keep_csv(path)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_w, weights)  # exact: repr round-trips
    np.testing.assert_array_equal(got_s, score)
    assert got_ids.dtype == np.int64


@pytest.mark.parametrize("content, line, field, value", [
    ("id,weight,score\n0,1,1\n", 1, "header", "'id,weight,score'"),
    ("sample_id,weight,score\n0,1,1\n2,1,1\n1,1,1\n", 4, "sample_id", "1"),
    ("sample_id,weight,score\n0,1,1\n0,1,1\n", 3, "sample_id", "0"),
    ("sample_id,weight,score\n-1,1,1\n", 2, "sample_id", "-1"),
    ("sample_id,weight,score\nx,1,1\n", 2, "sample_id", "'x'"),
    ("sample_id,weight,score\n0,0,1\n", 2, "weight", "'0'"),
    ("sample_id,weight,score\n0,-1.5,1\n", 2, "weight", "'-1.5'"),
    ("sample_id,weight,score\n0,inf,1\n", 2, "weight", "'inf'"),
    ("sample_id,weight,score\n0,nan,1\n", 2, "weight", "'nan'"),
    ("sample_id,weight,score\n0,1,abc\n", 2, "score", "'abc'"),
    ("sample_id,weight,score\n0,1,1\n1,1\n", 3, "3 fields", "'1,1'"),
])
def test_keep_csv_validation_names_file_line_field_value(tmp_path, content, line, field, value):
    from store.artifacts import KeepListError, read_keep_csv

    path = tmp_path / "keep.csv"
    path.write_text(content)
    with pytest.raises(KeepListError) as info:
        read_keep_csv(path)
    message = str(info.value)
    assert str(path) in message and f"line {line}" in message and field in message and value in message


def test_keep_csv_refuses_bad_input_and_is_atomic(tmp_path, monkeypatch):
    from store import artifacts

    target = tmp_path / "keep.csv"
    with pytest.raises(ValueError, match="weight"):
        artifacts.write_keep_csv(target, np.array([1, 2]), np.array([1.0, 0.0]), np.zeros(2))
    with pytest.raises(ValueError, match="ascending"):
        artifacts.write_keep_csv(target, np.array([2, 1]), np.ones(2), np.zeros(2))
    assert not target.exists()
    artifacts.write_keep_csv(target, np.array([1, 2]), np.ones(2), np.zeros(2))
    old = target.read_text()

    def interrupted(ids, weights, scores):
        yield "1,1.0,0.0\n"
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "_keep_lines", interrupted)
    with pytest.raises(KeyboardInterrupt):
        artifacts.write_keep_csv(target, np.array([1, 2, 3]), np.ones(3), np.zeros(3))
    assert target.read_text() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]
