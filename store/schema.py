"""The logit store's schema in one place: array names, dims, dtypes, chunking, attrs keys.

Zarr v3 group::

    attrs: schema_version, num_samples N, num_classes C, epochs_planned E, epochs_complete,
           dataset {name, split, fingerprint}, model, view, config, versions, logits_dtype
    logits  (E, N, C)  float32 (float16 opt-in), fill NaN, chunks (1, n_chunk, C), Zstd(1)
    labels  (N,)       int32
    loss    (E, N)     float32, optional

Only ``epochs_complete`` epochs are valid; the rest are NaN-filled and never read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

LOGITS = "logits"
LABELS = "labels"
LOSS = "loss"

DIMS = {LOGITS: ("epoch", "sample", "class"), LABELS: ("sample",), LOSS: ("epoch", "sample")}
LOGITS_DTYPES = ("float32", "float16")
LABELS_DTYPE = np.dtype("int32")
LOSS_DTYPE = np.dtype("float32")

# About 2 MiB per chunk: stage two reads a block of at least one chunk times T epochs per task,
# so the chunk sets its memory floor (T = 50: 100 MiB). Measured on 20k x 50 x 100 float32
# (2 threads, warm cache): 2 and 4 MiB chunks read at the same speed (13-14 us a sample),
# 1 MiB chunks 30 % slower (zarr's per-chunk overhead).
TARGET_CHUNK_BYTES = 2 * 2**20
ZSTD_LEVEL = 1

VIEWS = ("train", "eval")

# attrs keys
A_SCHEMA_VERSION = "schema_version"
A_NUM_SAMPLES = "num_samples"
A_NUM_CLASSES = "num_classes"
A_EPOCHS_PLANNED = "epochs_planned"
A_EPOCHS_COMPLETE = "epochs_complete"
A_DATASET = "dataset"  # {"name", "split", "fingerprint"}
A_MODEL = "model"
A_VIEW = "view"
A_CONFIG = "config"
A_VERSIONS = "versions"
A_LOGITS_DTYPE = "logits_dtype"

REQUIRED_ATTRS = (
    A_SCHEMA_VERSION, A_NUM_SAMPLES, A_NUM_CLASSES, A_EPOCHS_PLANNED, A_EPOCHS_COMPLETE,
    A_DATASET, A_MODEL, A_VIEW, A_CONFIG, A_VERSIONS, A_LOGITS_DTYPE,
)


class StoreError(ValueError):
    """A store is missing, malformed or does not match; names path, field, expected and found."""

    def __init__(self, path: str | Path, field: str, expected: str, found: Any):
        self.path, self.field, self.expected, self.found = str(path), field, expected, found
        super().__init__(f"{path}: {field}: expected {expected}, found {found!r}")


def samples_per_chunk(num_classes: int, dtype: str | np.dtype, *, num_samples: int) -> int:
    """n_chunk for logits chunks (1, n_chunk, C) of about TARGET_CHUNK_BYTES, capped at N."""
    row_bytes = max(1, num_classes * np.dtype(dtype).itemsize)
    return int(max(1, min(num_samples, TARGET_CHUNK_BYTES // row_bytes)))
