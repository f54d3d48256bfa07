"""The native one-pass kernel equals the eager torch path, and its absence falls back cleanly."""
import numpy as np
import pytest

from pipeline import native
from pipeline.scores import SCORES, ScoreParamError, compute_block, resolve_kernel, resolve_methods

needs_native = pytest.mark.skipif(not native.available(), reason="no C compiler for the native kernel")


def _logits(T, n, C, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    z = np.cumsum(rng.standard_normal((T, n, C), dtype=np.float32) * scale, axis=0)
    return z, rng.integers(0, C, n)


def _all_methods(T):
    w = min(4, T)
    methods = {name: {"trajectory": "all"} for name in SCORES if name not in ("wdu", "tsdd", "random")}
    methods["dyun"] = {"window": min(4, T - 1), "trajectory": "all"}
    methods["tdds"] = {"window": max(3, w), "trajectory": "all"}
    methods["td_dyun"] = {"trajectory": "all", "wdu": {"window": w}, "tsdd": {"window": w}}
    return resolve_methods(methods, epochs=T, prune_rate=0.5)


@needs_native
@pytest.mark.parametrize("T,n,C,scale", [(12, 300, 7, 1.0), (5, 40, 100, 3.0), (4, 1, 2, 0.5), (6, 64, 10, 8.0),
                                         (8, 50, 30, 60.0),  # 60: gaps of hundreds, below the exp clamp
                                         (4, 7, 1000, 2.0)])  # C >= 512: tiles of one sample
def test_native_equals_eager_for_every_score(T, n, C, scale):
    z, y = _logits(T, n, C, seed=T * n, scale=scale)
    resolved = _all_methods(T)
    eager = compute_block(z, y, resolved, kernel="eager")
    fast = compute_block(z, y, resolved, kernel="native")
    assert eager.keys() == fast.keys()
    for name in eager:
        np.testing.assert_allclose(fast[name], eager[name], rtol=2e-5, atol=2e-6, err_msg=name)


@needs_native
def test_loading_the_kernel_keeps_subnormals():
    """-ffast-math at link time would add crtfastmath.o, which sets flush-to-zero process-wide."""
    native.epoch_statistics(*_logits(3, 2, 3), 1e-8)
    tiny = np.float32(1e-38) / np.float32(100)  # a subnormal float32, 0 under flush-to-zero
    assert tiny > 0 and np.float64(1e-308) / 1e10 > 0


@needs_native
def test_native_statistics_on_hand_values():
    # two epochs, one sample, three classes: uniform, then all mass on class 0 (up to exp(-20))
    z = np.array([[[0.0, 0.0, 0.0]], [[20.0, 0.0, 0.0]]], dtype=np.float32)
    gold, margin, ent, el2n, kl, akl = native.epoch_statistics(z, np.array([0]), 1e-8)
    assert gold[0, 0] == pytest.approx(1 / 3, rel=1e-6) and gold[1, 0] == pytest.approx(1.0, abs=1e-7)
    assert margin[:, 0].tolist() == [0.0, 20.0]  # a tie gives margin 0 exactly
    assert ent[0, 0] == pytest.approx(np.log(3), rel=1e-6)
    assert el2n[0, 0] == pytest.approx(np.sqrt((2 / 3) ** 2 + 2 / 9), rel=1e-6)
    assert el2n[1, 0] == pytest.approx(np.sqrt(2) * np.exp(-20), rel=1e-3)  # no cancellation near g = 1
    p1 = np.exp(np.float32(20.0)) / (np.exp(np.float32(20.0)) + 2)
    assert kl[0, 0] == pytest.approx(p1 * np.log((p1 + 1e-8) / (1 / 3 + 1e-8)), rel=1e-5)
    assert akl[0, 0] >= kl[0, 0]
    for name, fast, exact in zip(("gold", "margin", "ent", "el2n", "kl", "akl"), (gold, margin, ent, el2n, kl, akl),
                                 native.reference_statistics(z, np.array([0]), 1e-8)):
        np.testing.assert_allclose(fast, exact, rtol=1e-5, atol=1e-7, err_msg=name)


@needs_native
def test_self_check_passes_the_kernel_and_catches_a_wrong_one():
    assert native.self_check(native.epoch_statistics) == ""

    def off_by(factor, which):
        def statistics(z, y, eps):
            out = list(native.epoch_statistics(z, y, eps))
            out[which] = out[which] * np.float32(factor)
            return tuple(out)
        return statistics

    assert native.self_check(off_by(1 + 1e-6, 0)) == ""  # float32 rounding passes
    assert native.self_check(off_by(1 + 1e-4, 0)).startswith("gold of shape (3, 70)")  # 100 ulp does not
    assert native.self_check(off_by(1.001, 4)).startswith("kl of shape (2, 70)")
    assert native.self_check(lambda z, y, eps: native.epoch_statistics(z[:2], y, eps)).startswith(
        "gold has shape (2, 70), expected (3, 70)")


@needs_native
def test_a_kernel_failing_its_check_is_not_used(monkeypatch):
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "self_check", lambda statistics: "gold is 0.1 off")
    with pytest.warns(RuntimeWarning, match="native kernel not used.*gold is 0.1 off"):
        assert not native.available()
    assert "failed its check against float64 numpy: gold is 0.1 off" in native.unavailable_reason()
    assert resolve_kernel("auto", device="cpu") == "eager"
    with pytest.raises(ScoreParamError, match=r"score.kernel = 'native'.*not usable here.*gold is 0.1 off"):
        resolve_kernel("native", device="cpu")
    with pytest.raises(RuntimeError, match="not available on this machine.*gold is 0.1 off"):
        native.epoch_statistics(*_logits(3, 2, 3), 1e-8)
    z, y = _logits(6, 30, 5)  # compute_block asked for native on such a machine scores eagerly
    fast, eager = compute_block(z, y, _all_methods(6), kernel="native"), compute_block(z, y, _all_methods(6))
    assert all(np.array_equal(fast[k], eager[k]) for k in eager)
    monkeypatch.setattr(native, "_LIB", None)  # the next test loads the real one again


@needs_native
def test_native_refuses_labels_it_would_index_out_of_range():
    z, _ = _logits(3, 4, 5)
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 4\], found \[0, 5\]"):
        native.epoch_statistics(z, np.array([0, 1, 5, 2]), 1e-8)
    with pytest.raises(ValueError, match=r"labels: expected shape \(4,\)"):
        native.epoch_statistics(z, np.array([0, 1]), 1e-8)


@needs_native
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_native_kernel_counts_nonfinite_rows(bad):
    z, y = _logits(5, 30, 100)  # C = 100: the check must cover the rows' vector part and their tail
    z[0, 0, 0] = z[2, 3, 97] = z[2, 29, 99] = z[4, 29, 50] = bad
    z[2, 3, 5] = bad  # a second bad logit in a row already counted
    with pytest.raises(native.NonFiniteLogits, match="4 rows") as info:
        native.epoch_statistics(z, y, 1e-8)
    assert info.value.rows == 4
    with pytest.raises(native.NonFiniteLogits):
        compute_block(z, y, _all_methods(5), kernel="native", nonfinite="raise")
    z[~np.isfinite(z)] = 3e38  # near the largest float32: finite, so scored
    gold, margin = native.epoch_statistics(z, y, 1e-8)[:2]
    assert np.isfinite(gold).all()


@needs_native
def test_native_block_with_minus_inf_goes_eager():
    z, y = _logits(6, 20, 5)
    z[2, 3, 1] = -np.inf
    resolved = _all_methods(6)
    eager = compute_block(z, y, resolved, kernel="eager")
    fast = compute_block(z, y, resolved, kernel="native")
    for name in eager:
        np.testing.assert_array_equal(fast[name], eager[name], err_msg=name)


def test_resolve_kernel_names_and_devices():
    assert resolve_kernel("eager", device="cpu") == "eager"
    assert resolve_kernel("auto", device="cuda") == "eager"
    assert resolve_kernel("auto", device="cpu") == ("native" if native.available() else "eager")
    with pytest.raises(ScoreParamError, match=r"score.kernel.*'fast'.*auto, eager, native"):
        resolve_kernel("fast", device="cpu")
    with pytest.raises(ScoreParamError, match=r"score.kernel.*native.*CPU only"):
        resolve_kernel("native", device="cuda")
    with pytest.raises(ScoreParamError, match="score.kernel"):
        compute_block(*_logits(3, 4, 3), _all_methods(3), kernel="auto")


def test_no_compiler_falls_back_to_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("TDDYUN_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_LIB", None)
    assert not native.available()
    assert resolve_kernel("auto", device="cpu") == "eager"
    with pytest.raises(ScoreParamError, match=r"score.kernel.*no working C compiler"):
        resolve_kernel("native", device="cpu")
    monkeypatch.setattr(native, "_LIB", None)  # the next test loads the real one again


@needs_native
def test_kernel_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TDDYUN_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_LIB", None)
    assert native.available()
    path = native.kernel_path()
    assert path.parent == tmp_path / "kernels" and path.is_file()
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind
    monkeypatch.setattr(native, "_LIB", None)
    stamp = path.stat().st_mtime_ns
    assert native.available() and path.stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_native
def test_extra_compile_flags_build_their_own_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("TDDYUN_CACHE", str(tmp_path))
    default = native.kernel_path()
    monkeypatch.setenv(native.CFLAGS_ENV, "-funroll-loops")
    monkeypatch.setattr(native, "_LIB", None)
    assert native.kernel_path() != default
    assert native.available() and native.kernel_path().is_file() and not default.exists()
    monkeypatch.setenv(native.CFLAGS_ENV, "-fno-such-option-here")
    monkeypatch.setattr(native, "_LIB", None)
    assert not native.available()
    assert "C compiler failed" in native.unavailable_reason() and "-fno-such-option-here" in native.unavailable_reason()
    monkeypatch.setattr(native, "_LIB", None)  # the next test loads the real one again


@pytest.mark.parametrize("kernel", ["eager", "native"])
def test_scoring_leaves_subnormals_on(kernel):
    """compute_block flushes subnormals while it scores (both kernels) and restores IEEE after."""
    import torch

    if kernel == "native" and not native.available():
        pytest.skip("no C compiler for the native kernel")
    z, y = _logits(5, 20, 6, scale=60.0)  # gaps of hundreds: probabilities far below 1e-38
    out = compute_block(z, y, _all_methods(5), kernel=kernel)
    assert all(np.isfinite(v).all() for name, v in out.items() if name != "forgetting")  # forgetting: inf if never learned
    assert np.float32(1e-38) / np.float32(100) > 0
    assert (torch.tensor([1e-38]) / 100).item() > 0
