"""Stage one: the fit loop, logit capture by sample_id, determinism, divergence, resume after kill -9."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.config import ConfigError, load_config
from pipeline.data import augment_batch, balanced_subset, load_data
from pipeline.models import build_model
from pipeline.record import record_training
from pipeline.train import TrainingDiverged, predict_logits
from stages.cli import main
from store.logits import open_logits

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, *extra):
    """A synthetic run writing everything under tmp_path."""
    sets = [
        "data.name=synthetic", "data.synthetic_samples=200", "data.synthetic_test_samples=64",
        "model.name=mlp", "model.width=4", "train.epochs=4", "train.batch_size=32", "train.lr=0.05",
        "train.num_threads=1",
    ]
    sets += [f"paths.{k}={tmp_path / v}" for k, v in {
        "store": "logits.zarr", "train_metrics": "train.json", "train_model": "model.pt",
        "checkpoint": "ckpt.pt"}.items()]
    return load_config(None, sets + list(extra))


def test_stored_row_n_is_sample_n(tmp_path):
    """With a frozen model (lr ~ 0), the logits captured during shuffled training must equal an
    ordered forward pass row for row: the scatter by sample_id put each where it belongs."""
    cfg = tiny(tmp_path, "train.lr=1.0e-12", "train.weight_decay=0", "train.momentum=0", "train.epochs=2")
    record_training(cfg, progress=False, log=lambda _: None)
    store = open_logits(cfg.paths.store)
    assert store.epochs_complete == 2
    data = load_data(cfg.data)
    model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
    model.load_state_dict(torch.load(cfg.paths.train_model))
    expected, _ = predict_logits(model, data.train, torch.device("cpu"), channels_last=False)
    stored = store.read_epochs()
    np.testing.assert_allclose(stored[1], expected.numpy(), rtol=1e-5, atol=1e-5)
    # and the rows really differ, so a wrong permutation could not pass
    assert np.abs(stored[1][1:] - stored[1][:-1]).max() > 1e-2


def test_same_seed_same_logits_and_weights(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    for where in (a, b):
        record_training(tiny(where), progress=False, log=lambda _: None)
    np.testing.assert_array_equal(open_logits(a / "logits.zarr").read_epochs(),
                                  open_logits(b / "logits.zarr").read_epochs())
    wa, wb = torch.load(a / "model.pt"), torch.load(b / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = tmp_path / "c"
    c.mkdir()
    record_training(tiny(c, "train.seed=1"), progress=False, log=lambda _: None)
    assert not np.array_equal(open_logits(a / "logits.zarr").read_epochs(), open_logits(c / "logits.zarr").read_epochs())


def test_eval_view_records_unaugmented_pass(tmp_path):
    cfg = tiny(tmp_path, "train.record=eval", "train.record_loss=true")
    record_training(cfg, progress=False, log=lambda _: None)
    store = open_logits(cfg.paths.store)
    assert store.attrs["view"] == "eval" and store.epochs_complete == 4 and store.has_loss
    data = load_data(cfg.data)
    model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
    model.load_state_dict(torch.load(cfg.paths.train_model))
    expected, _ = predict_logits(model, data.train, torch.device("cpu"), channels_last=False)
    np.testing.assert_allclose(store.read_epochs(3, 4)[0], expected.numpy(), rtol=1e-5, atol=1e-5)


def test_nan_loss_stops_and_epoch_is_not_recorded(tmp_path):
    cfg = tiny(tmp_path, "train.lr=1.0e+12", "train.epochs=6")
    with pytest.raises(TrainingDiverged, match=r"epoch (\d+)") as info:
        record_training(cfg, progress=False, log=lambda _: None)
    import re
    bad_epoch = int(re.search(r"epoch (\d+)", str(info.value)).group(1))
    assert open_logits(cfg.paths.store).epochs_complete == bad_epoch


def test_unknown_names_list_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid names: digits, cifar10"):
        load_data(tiny(tmp_path, "data.name=mnist").data)
    with pytest.raises(ValueError, match="valid names: mlp, small_cnn, resnet18_cifar"):
        cfg = tiny(tmp_path, "model.name=vgg")
        build_model(cfg.model, input_shape=(16,), num_classes=4)


def test_cifar_without_files_says_how_to_get_them(tmp_path):
    cfg = load_config(None, ["data.name=cifar10", f"data.root={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="data.download"):
        load_data(cfg.data)


def test_imagefolder_decodes_once_and_caches(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("TDDYUN_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "img" / split / cls / f"{i}.png")
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'img'}", "data.subset=4"])
    data = load_data(cfg.data)
    assert data.train.x.shape == (4, 3, 12, 12) and data.train.x.dtype == torch.uint8
    assert sorted(data.train.y.tolist()) == [0, 0, 1, 1] and data.train.classes == ("cat", "dog")
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.npz"))) == 2
    again = load_data(cfg.data)
    assert torch.equal(again.train.x, data.train.x)


def test_balanced_subset():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    ids = balanced_subset(labels, 10, seed=0)
    assert len(ids) == 10 and np.all(np.diff(ids) > 0)
    assert np.bincount(labels[ids]).tolist() == [5, 3, 2]
    assert np.array_equal(ids, balanced_subset(labels, 10, seed=0))
    with pytest.raises(ValueError, match=r"data.subset = 101.*\[1, 100\]"):
        balanced_subset(labels, 101, seed=0)


def test_validation_is_held_out_of_the_training_subset_and_replaces_test():
    base = load_config(None, ["data.name=synthetic", "data.synthetic_samples=200", "data.subset=100"]).data
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_samples=200", "data.subset=100",
                             "data.validation=20"]).data
    full, split = load_data(base), load_data(cfg)
    assert (len(split.train), len(split.test)) == (80, 20)
    assert split.info["eval_split"] == "validation" and full.info["eval_split"] == "test"
    # train and validation partition the subset; the test set is not among them
    train_src, val_src = set(split.train.source_index), set(split.test.source_index)
    assert not train_src & val_src and train_src | val_src == set(full.train.source_index)
    assert np.bincount(split.test.y.numpy()).tolist() == [5, 5, 5, 5]  # class-balanced
    # the validation size never reshuffles the subset; the same seed holds out the same samples
    assert set(load_data(cfg).test.source_index) == val_src
    other = load_config(None, ["data.name=synthetic", "data.synthetic_samples=200", "data.subset=100",
                               "data.validation=40"]).data
    assert set(load_data(other).train.source_index) | set(load_data(other).test.source_index) == train_src | val_src


def test_validation_out_of_range_is_refused():
    with pytest.raises(ConfigError, match=r"data.validation.*100.*fewer than data.subset = 100"):
        load_config(None, ["data.subset=100", "data.validation=100"])
    with pytest.raises(ConfigError, match=r"data.validation.*-1"):
        load_config(None, ["data.validation=-1"])
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_samples=50", "data.validation=50"]).data
    with pytest.raises(ValueError, match=r"data.validation = 50: expected an integer in \[1, 49\]"):
        load_data(cfg)


def test_augment_batch_crop_and_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    centre = torch.tensor([[4, 4], [4, 4]])
    same = augment_batch(x, centre, torch.tensor([False, False]))
    assert torch.equal(same, x)
    flipped = augment_batch(x, centre, torch.tensor([True, False]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    shifted = augment_batch(x, torch.tensor([[5, 4], [4, 3]]), torch.tensor([False, False]))
    assert torch.equal(shifted[0, 0, :3], x[0, 0, 1:]) and torch.equal(shifted[0, 0, 3], torch.zeros(4))
    assert torch.equal(shifted[1, 0, :, 1:], x[1, 0, :, :3]) and torch.equal(shifted[1, 0, :, 0], torch.zeros(4))


def test_cli_train_on_digits_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "configs" / "default.yaml").read_text())
    result = CliRunner().invoke(main, ["train", "--set", "train.epochs=3", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "final test accuracy" in result.output
    store = open_logits(tmp_path / "artifacts" / "logits.zarr")
    assert store.epochs_complete == 3 and store.num_samples == 1347 and store.num_classes == 10
    import json
    metrics = json.loads((tmp_path / "artifacts" / "train_metrics.json").read_text())
    assert len(metrics["history"]) == 3 and metrics["final_test_accuracy"] > 0.5
    again = CliRunner().invoke(main, ["train", "--set", "train.epochs=3"])
    assert again.exit_code != 0 and "--overwrite" in again.output
    other = CliRunner().invoke(main, ["train", "--set", "train.epochs=3", "--set", "train.lr=0.01", "--resume"])
    assert other.exit_code != 0 and "train.lr: store has 0.05, config has 0.01" in other.output
    inspect = CliRunner().invoke(main, ["inspect", "artifacts/logits.zarr"])
    assert inspect.exit_code == 0 and "3 of 3" in inspect.output and "zstd" in inspect.output


def _tddyun() -> str:
    exe = Path(sys.executable).with_name("tddyun")
    return str(exe) if exe.exists() else "tddyun"


@pytest.mark.slow
def test_kill_minus_9_then_resume_equals_uninterrupted(tmp_path):
    sets = ["data.name=synthetic", "data.synthetic_samples=6000", "data.synthetic_features=64",
            "model.name=mlp", "model.width=32", "train.epochs=12", "train.batch_size=16", "train.lr=0.02",
            "train.num_threads=1"]

    def args(where):
        out = [_tddyun(), "train", "--no-progress"]
        for s in sets + [f"paths.store={where}/logits.zarr", f"paths.checkpoint={where}/ckpt.pt",
                         f"paths.train_metrics={where}/m.json", f"paths.train_model={where}/model.pt"]:
            out += ["--set", s]
        return out

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(args(whole), check=True, capture_output=True, cwd=tmp_path)
    proc = subprocess.Popen(args(killed), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            time.sleep(0.05)
            try:
                done = open_logits(killed / "logits.zarr").epochs_complete
            except Exception:  # the store is still being created
                continue
            if done >= 3:
                break
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    interrupted_at = open_logits(killed / "logits.zarr").epochs_complete
    assert 3 <= interrupted_at < 12, "the run finished before it could be killed"
    resumed = subprocess.run(args(killed) + ["--resume"], capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
    a, b = open_logits(whole / "logits.zarr"), open_logits(killed / "logits.zarr")
    assert b.epochs_complete == 12
    for e in range(12):
        np.testing.assert_array_equal(a.read_epochs(e, e + 1), b.read_epochs(e, e + 1), err_msg=f"epoch {e}")
