"""``tddyun score`` end to end: CliRunner on a tmp dir, errors, rescoring, a real dask cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

pytest.importorskip("pipeline.scores")
pytest.importorskip("pipeline.select")
pytest.importorskip("pipeline.weights")

from stages.score import score  # noqa: E402
from store.artifacts import read_json, read_keep_csv, read_scores  # noqa: E402

N, C, E = 240, 4, 10


def _params(tmp_path: Path, store: Path, **score_section) -> Path:
    out = tmp_path / "out"
    params = {
        "data": {"name": "synthetic", "synthetic_samples": N, "synthetic_classes": C},
        "score": {
            "methods": {"td_dyun": {"trajectory": "all", "wdu": {"window": 4}, "tsdd": {"window": 4}},
                        "el2n": {}},
            "select_by": "td_dyun", "prune_rate": 0.5, "block_mb": 64 * E * C * 4 / 2**20,
            **score_section,
        },
        "paths": {"store": str(store), "scores": str(out / "scores.zarr"), "keep": str(out / "keep.csv"),
                  "score_summary": str(out / "score_summary.json")},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture
def setup(make_store, tmp_path):
    store, logits, labels, _ = make_store(n=N, classes=C, epochs=E, chunk=32)
    return _params(tmp_path, store), store, logits, labels


def _invoke(*args: str):
    return CliRunner().invoke(score, list(args), catch_exceptions=False)


def test_score_cli_end_to_end(setup, tmp_path):
    from pipeline.scores import score_arrays

    params, store, logits, labels = setup
    result = _invoke("--params", str(params))
    assert result.exit_code == 0, result.output
    assert "kept 120/240" in result.output
    out = tmp_path / "out"
    arrays, attrs = read_scores(out / "scores.zarr")
    assert {"td_dyun", "wdu", "tsdd", "el2n"} <= set(arrays)
    whole = score_arrays(logits, labels, {"td_dyun": {"trajectory": "all", "wdu": {"window": 4},
                                                      "tsdd": {"window": 4}}, "el2n": {}}, prune_rate=0.5)
    for name in whole:
        np.testing.assert_allclose(arrays[name], whole[name], rtol=2e-5, atol=1e-6)
    assert attrs["store"]["path"] == str(store) and attrs["store"]["fingerprint"]
    assert set(attrs["directions"]) >= {"td_dyun", "wdu", "tsdd", "el2n"}
    assert attrs["config"]["score"]["prune_rate"] == 0.5

    ids, weights, kept_scores = read_keep_csv(out / "keep.csv")
    assert ids.size == 120 and np.all(np.diff(ids) > 0)
    np.testing.assert_allclose(kept_scores, arrays["td_dyun"][ids])
    assert abs(weights.mean() - 1) < 1e-6

    summary = read_json(out / "score_summary.json")
    assert summary["n_keep"] == 120 and summary["n_total"] == N and summary["prune_rate"] == 0.5
    assert summary["select_by"] == "td_dyun" and summary["selection"] == "top"
    assert sum(summary["kept_per_class"].values()) == 120
    assert summary["epochs_read"] == E and summary["block_samples"] == 64
    assert summary["weight_min"] <= summary["weight_mean"] <= summary["weight_max"]
    assert summary["read_throughput_mb_s"] > 0 and summary["scheduler"].startswith("threads")
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_rescore_with_set_changes_n_keep(setup, tmp_path):
    params, *_ = setup
    assert _invoke("--params", str(params)).exit_code == 0
    first = read_json(tmp_path / "out" / "score_summary.json")
    result = _invoke("--params", str(params), "--set", "score.prune_rate=0.7")
    assert result.exit_code == 0, result.output
    second = read_json(tmp_path / "out" / "score_summary.json")
    assert first["n_keep"] == 120 and second["n_keep"] == N - int(np.floor(0.7 * N)) == 72
    assert read_keep_csv(tmp_path / "out" / "keep.csv")[0].size == 72
    third = _invoke("--params", str(params), "--set", "score.prune_rate=null", "--set", "score.keep_fraction=0.25")
    assert third.exit_code == 0, third.output
    assert read_json(tmp_path / "out" / "score_summary.json")["n_keep"] == 60


def _error(result) -> str:
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    return lines[-1]


@pytest.mark.parametrize("overrides, needles", [
    (["score.prune_rate=1.5"], ["score.prune_rate", "1.5", "[0, 1)"]),
    (["score.select_by=dyun"], ["score.select_by", "'dyun'", "td_dyun", "el2n"]),
    (["score.keep_fraction=0.5"], ["score.keep_fraction", "0.5", "prune_rate"]),
    (["score.block_mb=0"], ["score.block_mb", "0"]),
])
def test_config_errors_are_one_line(setup, overrides, needles):
    params, *_ = setup
    args = ["--params", str(params)]
    for o in overrides:
        args += ["--set", o]
    message = _error(_invoke(*args))
    assert str(params) in message
    for needle in needles:
        assert needle in message, message


def test_score_parameter_out_of_range(setup):
    params, *_ = setup
    message = _error(_invoke("--params", str(params), "--set", "score.methods={el2n: {trajectory: 99}}",
                             "--set", "score.select_by=el2n"))
    assert "99" in message and "trajectory" in message and str(params) in message


def test_missing_store(setup, tmp_path):
    params, *_ = setup
    missing = tmp_path / "nope.zarr"
    message = _error(_invoke("--params", str(params), "--set", f"paths.store={missing}"))
    assert str(missing) in message


def test_too_few_complete_epochs(make_store, tmp_path):
    store, *_ = make_store(n=N, classes=C, epochs=E, complete=3, chunk=32)
    params = _params(tmp_path, store, methods={"el2n": {"trajectory": 8}}, select_by="el2n")
    message = _error(_invoke("--params", str(params)))
    assert str(store) in message and "8" in message and "3" in message


def test_nan_logits(make_store, tmp_path):
    def poison(z):
        z = z.copy()
        z[2, [3, 200], 0] = np.nan
        return z

    store, *_ = make_store(n=N, classes=C, epochs=E, chunk=32, mutate=poison)
    message = _error(_invoke("--params", str(_params(tmp_path, store))))
    assert str(store) in message and "epoch 2" in message and "2 samples" in message
    assert not (tmp_path / "out").exists()  # nothing written


def test_data_mismatch(setup):
    params, store, *_ = setup
    message = _error(_invoke("--params", str(params), "--set", "data.seed=5"))
    assert str(store) in message and "data.seed = 5" in message and "0 in the store" in message


def test_labels_mismatch(make_store, tmp_path, monkeypatch):
    """The data module's labels differ from the store's: refused, both fingerprints named."""
    import types

    from store.logits import labels_fingerprint

    store, _, labels, _ = make_store(n=N, classes=C, epochs=E, chunk=32)
    other = np.roll(labels, 1)
    fake = types.ModuleType("pipeline.data")
    fake.load_train_labels = lambda cfg: other
    monkeypatch.setitem(sys.modules, "pipeline.data", fake)
    message = _error(_invoke("--params", str(_params(tmp_path, store))))
    assert labels_fingerprint(other) in message and labels_fingerprint(labels) in message
    assert str(store) in message and "fingerprint" in message


def test_interrupted_run_leaves_old_outputs(setup, tmp_path, monkeypatch):
    params, *_ = setup
    assert _invoke("--params", str(params)).exit_code == 0
    out = tmp_path / "out"
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in out.iterdir()}
    keep_before = (out / "keep.csv").read_text()

    from store import artifacts

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "_keep_lines", interrupted)
    result = CliRunner().invoke(score, ["--params", str(params), "--set", "score.prune_rate=0.7"])
    assert result.exit_code == 1 and "Aborted" in result.output  # click's answer to Ctrl-C
    assert sorted(p.name for p in out.iterdir()) == sorted(before)
    assert (out / "keep.csv").read_text() == keep_before
    assert read_json(out / "score_summary.json")["n_keep"] == 120
    assert read_scores(out / "scores.zarr")[1]["prune_rate"] == 0.5  # not a mixed set either


def test_scheduler_options_are_exclusive(setup, tmp_path):
    params, *_ = setup
    result = CliRunner().invoke(score, ["--params", str(params), "--workers", "1", "--scheduler", "tcp://x:1"])
    assert result.exit_code == 2 and "at most one" in result.output
    result = CliRunner().invoke(score, ["--params", str(params), "--workers", "0"])
    assert result.exit_code == 2 and "--workers = 0" in result.output


# ---------------------------------------------------------------------------------------------
# A real dask.distributed cluster
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def dask_cluster(tmp_path):
    """A scheduler and one worker as subprocesses (loopback); always terminated."""
    bindir = Path(sys.executable).parent
    dask_bin = bindir / "dask"
    if not dask_bin.exists():
        pytest.skip(f"{dask_bin} not found")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                          os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    scheduler_file = tmp_path / "scheduler.json"
    procs = []
    try:
        procs.append(subprocess.Popen(
            [str(dask_bin), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.1)
        procs.append(subprocess.Popen(
            [str(dask_bin), "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
             "--nthreads", "1", "--no-dashboard", "--local-directory", str(tmp_path / "dask-worker")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        yield scheduler_file
    finally:
        for proc in reversed(procs):  # the worker first, then the scheduler, one at a time
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_distributed_run_matches_threads(setup, tmp_path, dask_cluster):
    params, *_ = setup
    assert _invoke("--params", str(params)).exit_code == 0
    threaded, _ = read_scores(tmp_path / "out" / "scores.zarr")
    threaded_keep = (tmp_path / "out" / "keep.csv").read_text()
    result = _invoke("--params", str(params), "--scheduler-file", str(dask_cluster), "--progress")
    assert result.exit_code == 0, result.output
    distributed_scores, _ = read_scores(tmp_path / "out" / "scores.zarr")
    for name, values in threaded.items():
        np.testing.assert_array_equal(distributed_scores[name], values)
    assert (tmp_path / "out" / "keep.csv").read_text() == threaded_keep
    assert read_json(tmp_path / "out" / "score_summary.json")["scheduler"].startswith("distributed(tcp://127.0.0.1")


@pytest.mark.slow
def test_local_cluster_workers(setup, tmp_path):
    params, *_ = setup
    assert _invoke("--params", str(params)).exit_code == 0
    threaded, _ = read_scores(tmp_path / "out" / "scores.zarr")
    result = _invoke("--params", str(params), "--workers", "2")
    assert result.exit_code == 0, result.output
    local, _ = read_scores(tmp_path / "out" / "scores.zarr")
    for name, values in threaded.items():
        np.testing.assert_array_equal(local[name], values)
    assert json.loads((tmp_path / "out" / "score_summary.json").read_text())["scheduler"].startswith("distributed")
