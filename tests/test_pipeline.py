"""The whole pipeline: `tddyun run`, a resumable sweep, and `dvc repro` skipping what did not change."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from pipeline.config import config_from_dict, config_to_dict
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

_TINY = {
    "data": {"name": "synthetic", "synthetic_samples": 240, "synthetic_test_samples": 96, "synthetic_classes": 4},
    "model": {"name": "mlp", "width": 4},
    "train": {"epochs": 6, "batch_size": 32, "lr": 0.05, "num_threads": 1},
    "score": {"methods": {"td_dyun": {"wdu": {"window": 3}, "tsdd": {"window": 3}}, "dyun": {"window": 3},
                          "random": {}},
              "select_by": "td_dyun", "prune_rate": 0.5},
}
# DVC tracks every section and dvc.yaml reads its paths from params.yaml: spell everything out
TINY = config_to_dict(config_from_dict(_TINY))


def write_params(where: Path, params=TINY) -> Path:
    path = where / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_run_prints_full_pruned_and_random(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    result = CliRunner().invoke(main, ["run", "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip().split(" ")[0] for r in rows[1:]] == ["full", "td_dyun", "random"]
    metrics = json.loads((tmp_path / "artifacts" / "retrain_metrics.json").read_text())
    assert metrics["n_keep"] == 120 and metrics["budget"] == "same_epochs"
    assert metrics["full_test_accuracy"] is not None and metrics["speedup_vs_full"] > 0
    assert (tmp_path / "artifacts" / "retrain_history.csv").read_text().startswith("epoch,")


def test_sweep_resumes_and_reruns_only_changed_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    assert CliRunner().invoke(main, ["train", "--no-progress"]).exit_code == 0
    args = ["sweep", "--methods", "td_dyun,random", "--rates", "0.5,0.75", "--seeds", "2"]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    cells = sorted((tmp_path / "artifacts" / "sweep" / "cells").glob("*.json"))
    assert len(cells) == 8
    stamps = {c.name: c.stat().st_mtime_ns for c in cells}
    table = (tmp_path / "artifacts" / "sweep" / "table.csv").read_text().splitlines()
    assert table[0] == "method,prune_rate,mean,std,n" and len(table) == 1 + 4
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0 and second.output.count("skipped") == 2
    assert {c.name: c.stat().st_mtime_ns for c in cells} == stamps
    # a changed td_dyun parameter reruns td_dyun's cells only
    third = CliRunner().invoke(main, args + ["--set", "score.methods.td_dyun.alpha=0.3"])
    assert third.exit_code == 0, third.output
    changed = {c.name for c in cells if c.stat().st_mtime_ns != stamps[c.name]}
    assert changed == {n for n in stamps if n.startswith("td_dyun")}
    assert "| td_dyun |" in third.output and "| random |" in third.output


def test_sweep_on_a_validation_split_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path)
    held = ["--set", "data.validation=48"]
    assert CliRunner().invoke(main, ["train", "--no-progress"] + held).exit_code == 0
    train = json.loads((tmp_path / "artifacts" / "train_metrics.json").read_text())
    assert train["evaluated_on"] == "validation" and train["num_train"] == 240 - 48
    result = CliRunner().invoke(main, ["sweep", "--methods", "random", "--rates", "0.5", "--seeds", "1"] + held)
    assert result.exit_code == 0, result.output
    cell = json.loads(next((tmp_path / "artifacts" / "sweep" / "cells").glob("*.json")).read_text())
    assert cell["evaluated_on"] == "validation" and cell["n_total"] == 192
    table = (tmp_path / "artifacts" / "sweep" / "table.md").read_text()
    assert "validation accuracy" in table and "Validation accuracy (%)" in table and "test" not in table


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    out = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"dvc {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                   capture_output=True)


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pipeline", "stages", "store"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    write_params(repo)
    _git(repo, "init", "-q")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "init")

    first = _dvc(repo, "repro")
    for stage in ("train", "score", "retrain", "report"):
        assert f"Running stage '{stage}'" in first.stdout
    assert _dvc(repo, "status").stdout.strip().startswith("Data and pipelines are up to date")

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["score"]["prune_rate"] = 0.7
    write_params(repo, params)
    second = _dvc(repo, "repro")
    assert "Running stage 'train'" not in second.stdout
    assert "Running stage 'score'" in second.stdout and "Running stage 'retrain'" in second.stdout
    assert json.loads((repo / "artifacts" / "score_summary.json").read_text())["n_keep"] == 72

    # editing scoring code reruns scoring, never training
    with open(repo / "pipeline" / "scores.py", "a") as fh:
        fh.write("\n# an edit\n")
    third = _dvc(repo, "repro")
    assert "Running stage 'train'" not in third.stdout and "Running stage 'score'" in third.stdout

    metrics = _dvc(repo, "metrics", "show").stdout
    assert "final_test_accuracy" in metrics
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "p=0.7")
    exp = _dvc(repo, "exp", "run", "-S", "score.prune_rate=0.3")
    assert "Running stage 'train'" not in exp.stdout and "Running stage 'score'" in exp.stdout
    plots = _dvc(repo, "plots", "show", "-o", str(tmp_path / "plots"))
    assert (tmp_path / "plots" / "index.html").is_file(), plots.stdout
