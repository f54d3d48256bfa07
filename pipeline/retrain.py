"""Stage three: retrain from scratch on the kept samples with the weighted loss mean_i(w_i * CE_i)."""
from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from store.artifacts import atomic_path, read_json
from store.logits import labels_fingerprint

from .config import Config, config_to_dict
from .data import DataSplits, eval_split_of, load_data
from .models import build_model
from .provenance import versions
from .train import fit, seed_everything

__all__ = ["check_keep_list", "retrain_epochs", "retrain_on", "RetrainError", "retrain_from_keep_list", "speedup"]


class RetrainError(ValueError):
    """A keep-list that cannot be used with the configured data set."""


def check_keep_list(path: str | Path, ids: np.ndarray, weights: np.ndarray, *, num_samples: int,
                    expected_fingerprint: str, made_from: str | None) -> None:
    """Refuse a keep-list naming a sample id outside [0, N) or made from another store.

    made_from: the store fingerprint the keep-list was scored from (None when unknown).
    """
    if ids.size == 0:
        raise RetrainError(f"{path}: sample_id: expected at least one kept sample, found none")
    if ids.max() >= num_samples or ids.min() < 0:
        bad = int(ids[(ids >= num_samples) | (ids < 0)][0])
        raise RetrainError(f"{path}: sample_id = {bad}: expected an id in [0, {num_samples}) "
                           f"(the configured training set has {num_samples} samples)")
    if made_from is not None and made_from != expected_fingerprint:
        raise RetrainError(f"{path}: store fingerprint = {made_from[:16]}...: expected "
                           f"{expected_fingerprint[:16]}... (the configured data set); the keep-list was "
                           f"made from another store: rescore with `tddyun score`")
    if weights.shape != ids.shape:
        raise RetrainError(f"{path}: weight: expected one weight per kept sample")


def retrain_epochs(budget: str, *, epochs: int, num_samples: int, n_keep: int, batch_size: int) -> int:
    """Epochs of stage three. same_epochs: as stage one (fewer steps, as the TDDS/DyUn authors);
    same_steps: as many optimizer steps as stage one (as the CCS authors)."""
    if budget == "same_epochs":
        return epochs
    full_steps = epochs * math.ceil(num_samples / batch_size)
    return max(1, round(full_steps / math.ceil(n_keep / batch_size)))


def retrain_on(
    cfg: Config, data: DataSplits, keep_ids: np.ndarray, weights: np.ndarray | None, *,
    seed: int | None = None, progress: bool | None = None, log: Callable[[str], None] | None = None,
    model_path: str | Path | None = None,
) -> dict[str, Any]:
    """Train a fresh model on ``data.train`` restricted to ``keep_ids`` (ascending) with per-sample
    ``weights`` (aligned with keep_ids; None = all 1). Returns the retrain metrics."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    n = len(data.train)
    kept = data.train.take(keep_ids)
    epochs = retrain_epochs(cfg.retrain.budget, epochs=cfg.train.epochs, num_samples=n,
                            n_keep=len(keep_ids), batch_size=cfg.train.batch_size)
    seed = cfg.retrain.seed if seed is None else seed
    seed_everything(seed)
    model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
    train_cfg = dataclasses.replace(cfg.train, seed=seed)
    result = fit(model, kept, data.test, train_cfg, augment=cfg.data.augment, epochs=epochs,
                 sample_weights=weights, progress=progress, log=log)
    if model_path is not None:
        with atomic_path(model_path) as tmp:
            torch.save(result.model.state_dict(), tmp)
    test = [h["test_accuracy"] for h in result.history if "test_accuracy" in h]
    return {
        "final_test_accuracy": test[-1],  # the one reported (on the validation split if evaluated_on says so)
        "evaluated_on": eval_split_of(cfg.data),
        "best_test_accuracy": max(test),
        "kept_fraction": len(keep_ids) / n,
        "n_keep": int(len(keep_ids)),
        "n_total": n,
        "budget": cfg.retrain.budget,
        "epochs": epochs,
        "seed": seed,
        "weighted": weights is not None and not np.allclose(weights, 1.0),
        "train_seconds": sum(h["epoch_seconds"] for h in result.history),
        "history": result.history,
    }


def speedup(retrain_metrics: dict[str, Any], train_metrics_path: str | Path) -> float | None:
    """Stage one's training seconds over stage three's (None when stage one's metrics are absent)."""
    path = Path(train_metrics_path)
    if not path.is_file():
        return None
    full = read_json(path)["train_seconds"]
    return full / retrain_metrics["train_seconds"] if retrain_metrics["train_seconds"] > 0 else None


def retrain_from_keep_list(cfg: Config, *, progress: bool | None = None,
                           log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Stage three as the CLI runs it: read paths.keep, retrain, write the model and metrics."""
    from store.artifacts import read_keep_csv, write_history_csv, write_json

    paths = cfg.paths
    ids, weights, _ = read_keep_csv(paths.keep)
    data = load_data(cfg.data)
    made_from = None
    if Path(paths.score_summary).is_file():
        made_from = read_json(paths.score_summary).get("store", {}).get("fingerprint")
    check_keep_list(paths.keep, ids, weights, num_samples=len(data.train),
                    expected_fingerprint=labels_fingerprint(data.train.y.numpy()), made_from=made_from)
    metrics = retrain_on(cfg, data, ids, weights, progress=progress, log=log, model_path=paths.retrain_model)
    metrics["speedup_vs_full"] = speedup(metrics, paths.train_metrics)
    if Path(paths.train_metrics).is_file():
        full = read_json(paths.train_metrics)
        metrics["full_test_accuracy"] = full.get("final_test_accuracy")
        metrics["full_train_seconds"] = full.get("train_seconds")
    if Path(paths.score_summary).is_file():
        summary = read_json(paths.score_summary)
        metrics["select_by"] = summary.get("select_by")
        metrics["prune_rate"] = summary.get("prune_rate")
        metrics["weighting"] = summary.get("weighting")
    metrics["config"] = config_to_dict(cfg)
    metrics["versions"] = versions()
    write_json(paths.retrain_metrics, metrics)
    write_history_csv(paths.retrain_history, metrics["history"])
    return metrics
