"""The logit store on disk: ``LogitWriter`` appends whole epochs; ``open_logits`` reads them lazily.

Writes happen one epoch at a time, from a buffer already in dataset order, one write per chunk;
``epochs_complete`` is raised only after the epoch's data is on disk, so a reader (or a resumed
run) never sees a half-written epoch. No torch here: numpy in, numpy/dask out.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from . import schema as S
from .schema import StoreError

__all__ = ["LogitWriter", "LogitStore", "open_logits", "labels_fingerprint", "create_logit_store"]


def labels_fingerprint(labels: np.ndarray) -> str:
    """sha256 of the int32 labels in dataset order: identifies a data set (and its order)."""
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int32).tobytes()).hexdigest()


def _fresh_tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def create_logit_store(
    path: str | Path,
    *,
    labels: np.ndarray,
    num_classes: int,
    epochs: int,
    dataset: dict[str, Any],
    model: str,
    view: str,
    config: dict[str, Any],
    versions: dict[str, Any],
    logits_dtype: str = "float32",
    record_loss: bool = False,
    overwrite: bool = False,
) -> Path:
    """Create an empty store (NaN-filled, ``epochs_complete = 0``) under a temporary name, then rename.

    labels: (N,) int; the store holds (epochs, N, num_classes) logits. An existing ``path`` is
    refused unless ``overwrite``; with it, the old store is replaced only once the new one is whole.
    """
    path = Path(path)
    if logits_dtype not in S.LOGITS_DTYPES:
        raise StoreError(path, "logits_dtype", " or ".join(S.LOGITS_DTYPES), logits_dtype)
    if view not in S.VIEWS:
        raise StoreError(path, "view", " or ".join(S.VIEWS), view)
    if path.exists() and not overwrite:
        raise StoreError(path, "path", "no existing store (pass --overwrite or --resume)", "a store")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise StoreError(path, S.LABELS, "a non-empty 1-d array", labels.shape)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise StoreError(path, S.LABELS, f"values in [0, {num_classes})", (int(labels.min()), int(labels.max())))
    n = int(labels.size)
    n_chunk = S.samples_per_chunk(num_classes, logits_dtype, num_samples=n)
    tmp = _fresh_tmp(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(tmp), mode="w")
    compressors = [ZstdCodec(level=S.ZSTD_LEVEL)]
    group.create_array(
        S.LOGITS, shape=(epochs, n, num_classes), chunks=(1, n_chunk, num_classes),
        dtype=logits_dtype, fill_value=np.nan, compressors=compressors,
        dimension_names=S.DIMS[S.LOGITS],
    )
    labels_array = group.create_array(
        S.LABELS, shape=(n,), chunks=(n,), dtype=S.LABELS_DTYPE, compressors=compressors,
        dimension_names=S.DIMS[S.LABELS],
    )
    labels_array[:] = labels.astype(S.LABELS_DTYPE)
    if record_loss:
        group.create_array(
            S.LOSS, shape=(epochs, n), chunks=(1, max(n_chunk, min(n, 2**20))), dtype=S.LOSS_DTYPE,
            fill_value=np.nan, compressors=compressors, dimension_names=S.DIMS[S.LOSS],
        )
    group.attrs.update({
        S.A_SCHEMA_VERSION: S.SCHEMA_VERSION,
        S.A_NUM_SAMPLES: n,
        S.A_NUM_CLASSES: int(num_classes),
        S.A_EPOCHS_PLANNED: int(epochs),
        S.A_EPOCHS_COMPLETE: 0,
        S.A_DATASET: {**dataset, "fingerprint": labels_fingerprint(labels)},
        S.A_MODEL: model,
        S.A_VIEW: view,
        S.A_CONFIG: config,
        S.A_VERSIONS: versions,
        S.A_LOGITS_DTYPE: logits_dtype,
    })
    if path.exists():  # overwrite: swap only now that the new store is whole
        old = _fresh_tmp(path.with_name(path.name + ".old"))
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


@dataclass(frozen=True)
class LogitStore:
    """An opened store: metadata plus lazy access to the complete epochs."""

    path: Path
    attrs: dict[str, Any]
    labels: np.ndarray  # (N,) int32

    @property
    def num_samples(self) -> int:
        return int(self.attrs[S.A_NUM_SAMPLES])

    @property
    def num_classes(self) -> int:
        return int(self.attrs[S.A_NUM_CLASSES])

    @property
    def epochs_planned(self) -> int:
        return int(self.attrs[S.A_EPOCHS_PLANNED])

    @property
    def epochs_complete(self) -> int:
        return int(self.attrs[S.A_EPOCHS_COMPLETE])

    @property
    def fingerprint(self) -> str:
        return str(self.attrs[S.A_DATASET]["fingerprint"])

    @property
    def has_loss(self) -> bool:
        return S.LOSS in self.group()

    def group(self) -> zarr.Group:
        return zarr.open_group(str(self.path), mode="r")

    def logits_array(self) -> zarr.Array:
        """The whole (E_planned, N, C) zarr array; only ``[:epochs_complete]`` is valid."""
        return self.group()[S.LOGITS]

    def read_epochs(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Logits of complete epochs ``start..stop-1`` in memory: (stop-start, N, C)."""
        stop = self.epochs_complete if stop is None else stop
        if not 0 <= start <= stop <= self.epochs_complete:
            raise StoreError(self.path, "epochs", f"a range within the {self.epochs_complete} complete epochs",
                             (start, stop))
        return self.logits_array()[start:stop]

    def to_dask(self, *, block: int, epochs: int | None = None):
        """Lazy (T, N, C) dask array of the first ``epochs`` complete epochs, chunks (T, block, C).

        Each chunk holds every epoch and every class of ``block`` samples, as stage two needs.
        """
        import dask.array as da

        t = self.epochs_complete if epochs is None else epochs
        if not 1 <= t <= self.epochs_complete:
            raise StoreError(self.path, S.A_EPOCHS_COMPLETE, f"at least {t} complete epochs",
                             self.epochs_complete)
        if block < 1:
            raise StoreError(self.path, "block", "at least one sample per block", block)
        # Chunked (t, block, C) from the start: the first epoch-chunk is exactly the t epochs
        # wanted, so each task reads its samples' t epochs itself (no rechunk, no extra copies).
        full = da.from_zarr(self.logits_array(), chunks=(t, block, self.num_classes))
        return full[:t]


def open_logits(path: str | Path) -> LogitStore:
    """Open a store for reading and check its schema; errors name the path and the field."""
    path = Path(path)
    if not path.exists():
        raise StoreError(path, "path", "an existing logit store (run `tddyun train` first)", "nothing")
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError, KeyError) as exc:  # not a zarr group
        raise StoreError(path, "zarr.json", "a Zarr v3 group", f"unreadable ({exc})") from exc
    attrs = dict(group.attrs)
    for key in S.REQUIRED_ATTRS:
        if key not in attrs:
            raise StoreError(path, f"attrs.{key}", "present", "missing")
    if attrs[S.A_SCHEMA_VERSION] != S.SCHEMA_VERSION:
        raise StoreError(path, f"attrs.{S.A_SCHEMA_VERSION}", str(S.SCHEMA_VERSION), attrs[S.A_SCHEMA_VERSION])
    for name in (S.LOGITS, S.LABELS):
        if name not in group:
            raise StoreError(path, name, "an array", "missing")
    n, c, e = attrs[S.A_NUM_SAMPLES], attrs[S.A_NUM_CLASSES], attrs[S.A_EPOCHS_PLANNED]
    logits = group[S.LOGITS]
    if tuple(logits.shape) != (e, n, c):
        raise StoreError(path, S.LOGITS + ".shape", str((e, n, c)), tuple(logits.shape))
    if str(logits.dtype) not in S.LOGITS_DTYPES:
        raise StoreError(path, S.LOGITS + ".dtype", " or ".join(S.LOGITS_DTYPES), str(logits.dtype))
    labels = np.asarray(group[S.LABELS][:])
    if labels.shape != (n,):
        raise StoreError(path, S.LABELS + ".shape", str((n,)), labels.shape)
    if not 0 <= attrs[S.A_EPOCHS_COMPLETE] <= e:
        raise StoreError(path, f"attrs.{S.A_EPOCHS_COMPLETE}", f"in [0, {e}]", attrs[S.A_EPOCHS_COMPLETE])
    found = labels_fingerprint(labels)
    if found != attrs[S.A_DATASET].get("fingerprint"):
        raise StoreError(path, "attrs.dataset.fingerprint", f"sha256 of labels = {found}",
                         attrs[S.A_DATASET].get("fingerprint"))
    return LogitStore(path=path, attrs=attrs, labels=labels)


class LogitWriter:
    """Appends whole epochs to a store, each in a background thread, in order.

    ``write_epoch(e, logits)`` returns at once; the data goes to disk while the caller trains the
    next epoch, and ``epochs_complete`` becomes ``e + 1`` only once it is there. ``after`` (optional)
    runs in the same thread after the epoch is committed: the trainer saves its checkpoint there,
    so a checkpoint never runs ahead of the store. ``flush()`` waits and re-raises any write error.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._group = zarr.open_group(str(self.path), mode="r+")
        self._logits = self._group[S.LOGITS]
        self._loss = self._group[S.LOSS] if S.LOSS in self._group else None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="logit-writer")
        self._pending: list[concurrent.futures.Future] = []

    @property
    def epochs_complete(self) -> int:
        return int(self._group.attrs[S.A_EPOCHS_COMPLETE])

    def write_epoch(
        self, epoch: int, logits: np.ndarray, loss: np.ndarray | None = None,
        *, after: Callable[[], None] | None = None,
    ) -> None:
        """Queue epoch ``epoch``: logits (N, C) and optional loss (N,), both in dataset order."""
        e_planned, n, c = self._logits.shape
        if not 0 <= epoch < e_planned:
            raise StoreError(self.path, "epoch", f"in [0, {e_planned})", epoch)
        if logits.shape != (n, c):
            raise StoreError(self.path, S.LOGITS, f"an epoch of shape {(n, c)}", logits.shape)
        self._raise_finished_errors()
        self._pending.append(self._pool.submit(self._write, epoch, logits, loss, after))

    def _write(self, epoch: int, logits: np.ndarray, loss: np.ndarray | None, after) -> None:
        self._logits[epoch] = logits.astype(self._logits.dtype, copy=False)
        if loss is not None and self._loss is not None:
            self._loss[epoch] = loss.astype(S.LOSS_DTYPE, copy=False)
        # Only ever grows: a resumed run may rewrite an epoch that was already complete.
        done = max(self.epochs_complete, epoch + 1)
        self._group.attrs[S.A_EPOCHS_COMPLETE] = done
        if after is not None:
            after()

    def _raise_finished_errors(self) -> None:
        still = []
        for future in self._pending:
            if future.done():
                future.result()  # re-raises a write error in the caller's thread
            else:
                still.append(future)
        self._pending = still

    def flush(self) -> None:
        """Wait until every queued epoch is on disk; re-raise the first write error."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "LogitWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
