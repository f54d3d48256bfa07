"""The one training loop, shared by stage one (full data, logit capture) and stage three (kept
samples, per-sample weights).

SGD with Nesterov momentum or AdamW, a per-iteration cosine schedule (optional linear warm-up),
weight decay, label smoothing, random crop + flip for images, channels-last on CPU and bf16
autocast on CUDA. Every epoch: test accuracy, a checkpoint, and (stage one) the epoch's logits
handed to an ``EpochSink``. With the same seed on CPU two runs give identical logits and weights,
and a run resumed from a checkpoint continues exactly as if it had never stopped, because each
epoch's shuffling and augmentation depend only on (seed, epoch).
"""
from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data import ArrayDataset, epoch_batches, epoch_generator, to_device_batch

__all__ = ["fit", "FitResult", "EpochSink", "LogitRecorder", "TrainingDiverged", "resolve_device",
           "seed_everything", "evaluate", "predict_logits", "weighted_mean"]

EVAL_BATCH = 1024  # samples per batch for evaluation passes (no gradients, so larger)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the epoch that produced it is never recorded."""


class EpochSink(Protocol):
    """Receives one epoch of logits in dataset order; ``after`` runs once they are durable."""

    view: str  # "train" (logits of the training forward pass) or "eval" (extra eval-mode pass)

    def end_epoch(self, epoch: int, logits: np.ndarray, loss: np.ndarray | None,
                  after: Callable[[], None]) -> None: ...


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, Any]]  # one dict per epoch: loss, train/test accuracy, seconds, lr
    seconds: float  # wall time of the epochs run in this call (resumed epochs excluded)
    start_epoch: int  # the first epoch this call ran (> 0 after a resume)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device = {name!r}: CUDA is not available on this machine; use cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class LogitRecorder:
    """Scatters each batch's logits (and per-sample loss) by sample_id into an epoch buffer on the
    training device: no extra forward pass, no host sync per batch."""

    def __init__(self, num_samples: int, num_classes: int, device: torch.device, *, record_loss: bool):
        self.logits = torch.full((num_samples, num_classes), float("nan"), device=device)  # (N, C)
        self.loss = torch.full((num_samples,), float("nan"), device=device) if record_loss else None  # (N,)

    def capture(self, ids: torch.Tensor, logits: torch.Tensor, loss: torch.Tensor) -> None:
        self.logits.index_copy_(0, ids, logits.detach().float())
        if self.loss is not None:
            self.loss.index_copy_(0, ids, loss.detach().float())

    def take(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The epoch's (N, C) logits and (N,) loss as fresh numpy arrays; the buffer is reset to NaN."""
        logits = self.logits.cpu().numpy().copy()
        loss = self.loss.cpu().numpy().copy() if self.loss is not None else None
        self.logits.fill_(float("nan"))
        if self.loss is not None:
            self.loss.fill_(float("nan"))
        return logits, loss


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def predict_logits(model: nn.Module, data: ArrayDataset, device: torch.device, *, channels_last: bool,
                   with_loss: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eval-mode logits (N, C) of unaugmented ``data`` in dataset order, and optionally CE loss (N,)."""
    model.eval()
    chunks, losses = [], []
    for ids in epoch_batches(data, batch_size=EVAL_BATCH, shuffle=False):
        x, y, _ = to_device_batch(data, ids, device, augment=False, generator=None, channels_last=channels_last)
        with _autocast(device):
            out = model(x).float()
        chunks.append(out)
        if with_loss:
            losses.append(F.cross_entropy(out, y, reduction="none"))
    return torch.cat(chunks), (torch.cat(losses) if with_loss else None)


def evaluate(model: nn.Module, data: ArrayDataset, device: torch.device, *, channels_last: bool) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) of ``model`` on ``data``."""
    logits, loss = predict_logits(model, data, device, channels_last=channels_last, with_loss=True)
    correct = (logits.argmax(1).cpu() == data.y).float().mean().item()
    return correct, loss.mean().item()


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Stage three's loss ``mean_i(w_i * CE_i)`` over a batch: per_sample (B,), weights (B,) or None.

    Divided by B, not by the sum of the batch's weights: with weights of mean 1 over the kept set
    the learning rate means what it means without weights, and a weight of 2 counts a sample twice.
    """
    if weights is None:
        return per_sample.mean()
    return (per_sample * weights).mean()


def _lr_factor(step: int, *, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at iteration ``step``: linear warm-up, then cosine to 0 (or flat)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def _save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def fit(
    model: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset | None,
    cfg: TrainConfig,
    *,
    augment: bool,
    epochs: int | None = None,
    sample_weights: np.ndarray | None = None,
    sink: EpochSink | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_meta: dict[str, Any] | None = None,
    resume: bool = False,
    progress: bool | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> FitResult:
    """Train ``model`` on ``train`` for ``epochs`` (default cfg.epochs) and return its history.

    sample_weights: (N,) per-sample loss weights aligned with ``train``; the loss is
    ``mean_i(w_i * CE_i)`` over each batch. sink: receives each epoch's logits (N, C) in dataset
    order (stage one). checkpoint: saved every epoch (after the sink has made the epoch durable);
    with ``resume`` training continues from it, refusing one whose ``checkpoint_meta`` differs.
    """
    device = resolve_device(cfg.device)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    epochs = cfg.epochs if epochs is None else epochs
    n = len(train)
    channels_last = train.kind == "images" and device.type == "cpu"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, cfg)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, total=total_steps, warmup=warmup, schedule=cfg.schedule))
    weights = None
    if sample_weights is not None:
        sample_weights = np.asarray(sample_weights, dtype=np.float32)
        if sample_weights.shape != (n,) or not np.all(np.isfinite(sample_weights)) or sample_weights.min() < 0:
            raise ValueError(f"sample_weights: expected {n} finite non-negative weights, found shape "
                             f"{sample_weights.shape}")
        weights = torch.from_numpy(sample_weights).to(device)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if resume and checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        if checkpoint_meta is not None and state.get("meta") != checkpoint_meta:
            raise ValueError(f"{checkpoint}: meta: expected the checkpoint of this run's config, found another "
                             f"(saved {state.get('meta')!r}); start again with --overwrite")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        start_epoch = state["epoch"] + 1
        log(f"resumed from {checkpoint} after epoch {state['epoch']}")

    recorder = None
    if sink is not None and sink.view == "train":
        recorder = LogitRecorder(n, train.num_classes, device, record_loss=True)
    show_bar = _show_progress(progress)
    started = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        t0 = time.perf_counter()
        model.train()
        generator = epoch_generator(cfg.seed, epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        batches = epoch_batches(train, batch_size=cfg.batch_size, shuffle=True, generator=generator)
        bar = None
        if show_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr)
        for ids in batches:
            x, y, sid = to_device_batch(train, ids, device, augment=augment, generator=generator,
                                        channels_last=channels_last)
            with _autocast(device):
                logits = model(x)
            per_sample = F.cross_entropy(logits.float(), y, reduction="none", label_smoothing=cfg.label_smoothing)
            loss = weighted_mean(per_sample, weights[sid] if weights is not None else None)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if recorder is not None:  # logits of the forward pass before this step's update
                recorder.capture(sid, logits, per_sample)
            loss_sum += per_sample.detach().sum()
            correct += (logits.detach().argmax(1) == y).sum()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        train_loss = loss_sum.item() / n
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"epoch {epoch}: training loss is {train_loss}; the epoch is not recorded "
                                   f"(lower train.lr = {cfg.lr} or check the data)")
        train_seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "loss": train_loss, "train_accuracy": correct.item() / n,
                  "lr": optimizer.param_groups[0]["lr"]}
        last = epoch == epochs - 1
        if test is not None and (last or (cfg.test_every and (epoch + 1) % cfg.test_every == 0)):
            record["test_accuracy"], record["test_loss"] = evaluate(model, test, device, channels_last=channels_last)
        record["train_seconds"] = train_seconds
        record["epoch_seconds"] = time.perf_counter() - t0
        history.append(record)

        save = _checkpoint_saver(checkpoint, epoch, model, optimizer, scheduler, history, checkpoint_meta)
        if sink is not None:
            if recorder is not None:
                epoch_logits, epoch_loss = recorder.take()
            else:  # view "eval": an extra eval-mode pass over the unaugmented training set
                out, out_loss = predict_logits(model, train, device, channels_last=channels_last, with_loss=True)
                epoch_logits, epoch_loss = out.cpu().numpy(), out_loss.cpu().numpy()
            sink.end_epoch(epoch, epoch_logits, epoch_loss, after=save)
        else:
            save()
        test_text = f" test_acc {record['test_accuracy']:.4f}" if "test_accuracy" in record else ""
        log(f"epoch {epoch + 1}/{epochs} loss {train_loss:.4f} train_acc {record['train_accuracy']:.4f}"
            f"{test_text} {record['epoch_seconds']:.1f}s")
    return FitResult(model=model, history=history, seconds=time.perf_counter() - started, start_epoch=start_epoch)


def _checkpoint_saver(path, epoch, model, optimizer, scheduler, history, meta) -> Callable[[], None]:
    """Snapshot the state now (training goes on and changes it); write it when called."""
    if path is None:
        return lambda: None
    state = {
        "epoch": epoch,
        "model": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "history": copy.deepcopy(history),
        "meta": meta,
    }
    return lambda: _save_atomic(state, path)
