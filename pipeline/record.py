"""Stage one: train on the full data and record every epoch's logits in the logit store."""
from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from store.artifacts import atomic_path, write_history_csv, write_json
from store.logits import LogitWriter, create_logit_store, labels_fingerprint, open_logits
from store.schema import StoreError

from .config import Config, config_to_dict
from .data import eval_split_of, load_data
from .models import build_model
from .provenance import versions
from .train import FitResult, fit, seed_everything

__all__ = ["StoreSink", "record_training", "run_identity"]

# train.* keys that do not change the logits, so a resumed run may differ in them
_NOT_IDENTITY = {"device", "num_threads", "test_every"}


def run_identity(cfg: Config) -> dict[str, Any]:
    """The config sections that determine stage one's logits: a store or checkpoint made under
    another identity is refused on resume."""
    train = {k: v for k, v in asdict(cfg.train).items() if k not in _NOT_IDENTITY}
    return {"data": asdict(cfg.data), "model": asdict(cfg.model), "train": train}


class StoreSink:
    """Hands each finished epoch to a LogitWriter (background write, then ``after``)."""

    def __init__(self, writer: LogitWriter, view: str, *, record_loss: bool):
        self.writer, self.view, self.record_loss = writer, view, record_loss

    def end_epoch(self, epoch: int, logits: np.ndarray, loss: np.ndarray | None, after: Callable[[], None]) -> None:
        if not np.all(np.isfinite(logits)):  # a NaN logit would poison every score downstream
            bad = int((~np.isfinite(logits)).any(axis=1).sum())
            raise StoreError(self.writer.path, f"logits[epoch {epoch}]", "finite values",
                             f"NaN or inf for {bad} samples")
        self.writer.write_epoch(epoch, logits, loss if self.record_loss else None, after=after)


def _open_for_resume(cfg: Config, path: Path, labels: np.ndarray) -> None:
    store = open_logits(path)
    if store.fingerprint != labels_fingerprint(labels):
        raise StoreError(path, "attrs.dataset.fingerprint", labels_fingerprint(labels) + " (the configured data)",
                         store.fingerprint)
    saved = store.attrs["config"].get("identity")
    if saved != run_identity(cfg):
        diffs = _diff(saved or {}, run_identity(cfg))
        raise StoreError(path, "attrs.config", "the configuration of this run (use --overwrite to start again)",
                         "; ".join(diffs[:5]) or saved)


def _diff(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(saved) | set(wanted)):
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: store has {a!r}, config has {b!r}")
    return out


def record_training(cfg: Config, *, resume: bool = False, overwrite: bool = False,
                    progress: bool | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train on the full data, writing logits to ``cfg.paths.store``, the model and the metrics JSON.

    Returns the metrics written to ``cfg.paths.train_metrics``.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    paths = cfg.paths
    store_path, checkpoint = Path(paths.store), Path(paths.checkpoint)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite: expected at most one of them")
    data = load_data(cfg.data)
    labels = data.train.y.numpy()
    # Build the model before touching the store: a bad model name must not cost an existing store.
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
    record = cfg.train.record != "none"
    if record:
        if store_path.exists() and resume:
            _open_for_resume(cfg, store_path, labels)
        elif store_path.exists() and not overwrite:
            raise StoreError(store_path, "path", "no existing store: pass --resume to continue it or "
                             "--overwrite to replace it", "an existing store")
        else:
            resume = False
            if checkpoint.exists():
                checkpoint.unlink()
            create_logit_store(
                store_path, labels=labels, num_classes=data.num_classes, epochs=cfg.train.epochs,
                dataset=data.info, model=cfg.model.name, view=cfg.train.record,
                config={**config_to_dict(cfg), "identity": run_identity(cfg)}, versions=versions(),
                logits_dtype=cfg.train.logits_dtype, record_loss=cfg.train.record_loss, overwrite=overwrite,
            )
    elif not resume and checkpoint.exists():
        checkpoint.unlink()

    writer = LogitWriter(store_path) if record else None
    try:
        sink = StoreSink(writer, cfg.train.record, record_loss=cfg.train.record_loss) if writer else None
        result = fit(model, data.train, data.test, cfg.train, augment=cfg.data.augment, sink=sink,
                     checkpoint=checkpoint, checkpoint_meta=run_identity(cfg), resume=resume,
                     progress=progress, log=log)
    finally:
        if writer is not None:
            writer.close()
    with atomic_path(paths.train_model) as tmp:
        torch.save(result.model.state_dict(), tmp)
    metrics = training_metrics(cfg, result, num_train=len(data.train))
    write_json(paths.train_metrics, metrics)
    write_history_csv(paths.train_history, metrics["history"])
    return metrics


def training_metrics(cfg: Config, result: FitResult, *, num_train: int) -> dict[str, Any]:
    """The metrics JSON of a fit: final/best test accuracy (on the validation split when
    ``data.validation`` is set: ``evaluated_on``), per-epoch history, seconds."""
    history = result.history
    test = [h["test_accuracy"] for h in history if "test_accuracy" in h]
    return {
        "final_test_accuracy": test[-1] if test else None,
        "best_test_accuracy": max(test) if test else None,
        "evaluated_on": eval_split_of(cfg.data),
        "epochs": len(history),
        "num_train": num_train,
        # the sum of per-epoch times, so a resumed run reports the time of all its epochs
        "train_seconds": sum(h["epoch_seconds"] for h in history),
        "history": history,
        "config": config_to_dict(cfg),
        "versions": versions(),
    }
