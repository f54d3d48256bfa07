"""Small artifacts between stages (metrics JSON, keep-lists, score arrays), each written whole.

Every writer goes through ``atomic_path``: the content is written to a temporary name beside
the target and renamed over it only when complete, so an interrupted run leaves the old file
(or nothing), never half a file.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = [
    "atomic_path", "write_json", "read_json", "write_scores", "read_scores", "write_keep_csv",
    "read_keep_csv", "KEEP_HEADER", "KeepListError",
]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            _remove(old)
        else:
            os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")
    return Path(path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _json_clean(data: Any) -> Any:
    """``data`` as plain JSON types (numpy scalars/arrays, paths, tuples converted)."""
    return json.loads(json.dumps(data, default=_jsonable))


# ---------------------------------------------------------------------------------------------
# scores.zarr: one (N,) array per score, in dataset order
# ---------------------------------------------------------------------------------------------
def _write_array(group: Any, name: str, values: np.ndarray) -> None:
    """One score array into the (temporary) group; a separate function so tests can fail it."""
    from zarr.codecs import ZstdCodec

    array = group.create_array(
        name, shape=values.shape, chunks=(max(1, min(values.shape[0], 2**20)),), dtype=values.dtype,
        compressors=[ZstdCodec(level=1)], dimension_names=("sample",),
    )
    array[:] = values


def write_scores(path: str | Path, arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> Path:
    """Write every score as a (N,) array of a Zarr v3 group at ``path``, atomically.

    arrays: name -> (N,) numbers in dataset order (one per score: td_dyun, wdu, tsdd, ...), all
    the same N; float16 is widened to float32. attrs: JSON-able metadata (resolved config,
    each score's direction, the store's fingerprint and path); ``num_samples`` and ``scores``
    (the array names) are added. An existing group is replaced only once the new one is whole.
    """
    import zarr

    path = Path(path)
    if not arrays:
        raise ValueError(f"{path}: no score arrays to write")
    sizes = {name: np.shape(values) for name, values in arrays.items()}
    n = next(iter(sizes.values()))
    for name, shape in sizes.items():
        if len(shape) != 1 or shape != n:
            raise ValueError(f"{path}: score {name!r} has shape {shape}; expected {n} like the others, 1-d")
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"{path}: score name {name!r}: expected a plain array name")
    meta = _json_clean({**dict(attrs), "num_samples": int(n[0]), "scores": list(arrays)})
    with atomic_path(path) as tmp:
        group = zarr.open_group(str(tmp), mode="w")
        for name, values in arrays.items():
            values = np.asarray(values)
            if values.dtype == np.float16:
                values = values.astype(np.float32)
            _write_array(group, name, values)
        group.attrs.update(meta)
    return path


def read_scores(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a scores group: (name -> (N,) array, attrs)."""
    import zarr

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no scores group (run `tddyun score` first)")
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    names = attrs.get("scores") or sorted(k for k, _ in group.arrays())
    return {name: np.asarray(group[name][:]) for name in names}, attrs


# ---------------------------------------------------------------------------------------------
# keep.csv: sample_id,weight,score, ascending ids
# ---------------------------------------------------------------------------------------------
KEEP_HEADER = "sample_id,weight,score"


class KeepListError(ValueError):
    """A keep-list file is malformed; the message names the file, line, field and value."""


def _keep_lines(ids: np.ndarray, weights: np.ndarray, scores: np.ndarray) -> Iterator[str]:
    # repr of a Python float round-trips exactly (and writes inf/nan readably)
    for i, w, s in zip(ids.tolist(), weights.tolist(), scores.tolist()):
        yield f"{i},{w!r},{s!r}\n"


def write_keep_csv(path: str | Path, ids: np.ndarray, weights: np.ndarray, scores: np.ndarray) -> Path:
    """Write the keep-list, atomically: header ``sample_id,weight,score``, one row per kept sample.

    ids: (n_keep,) ascending unique sample ids; weights: (n_keep,) finite, > 0; scores:
    (n_keep,) the selecting score of each kept sample (+inf allowed, e.g. ``forgetting``).
    """
    path = Path(path)
    ids = np.asarray(ids)
    weights = np.asarray(weights, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if not (ids.ndim == weights.ndim == scores.ndim == 1 and ids.shape == weights.shape == scores.shape):
        raise ValueError(f"{path}: ids, weights, scores: expected three 1-d arrays of one length, "
                         f"found shapes {ids.shape}, {weights.shape}, {scores.shape}")
    if ids.size == 0:
        raise ValueError(f"{path}: sample_id: expected at least one kept sample, found none")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{path}: sample_id: expected integers, found dtype {ids.dtype}")
    ids = ids.astype(np.int64)
    if ids[0] < 0 or (ids.size > 1 and not np.all(np.diff(ids) > 0)):
        raise ValueError(f"{path}: sample_id: expected ascending unique ids >= 0")
    bad = np.flatnonzero(~(np.isfinite(weights) & (weights > 0)))
    if bad.size:
        raise ValueError(f"{path}: weight of sample_id {ids[bad[0]]} = {weights[bad[0]]!r}: "
                         "expected a finite number > 0")
    if np.isnan(scores).any():
        k = int(np.flatnonzero(np.isnan(scores))[0])
        raise ValueError(f"{path}: score of sample_id {ids[k]} = nan: expected a number")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(KEEP_HEADER + "\n")
            fh.writelines(_keep_lines(ids, weights, scores))
    return path


def read_keep_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate a keep-list: (ids int64 ascending, weights float64 > 0, scores float64).

    Errors (``KeepListError``) name the file, the line, the field and the value.
    """
    import math

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: keep-list not found (run `tddyun score` first)")
    ids: list[int] = []
    weights: list[float] = []
    scores: list[float] = []
    with open(path, newline="") as fh:
        header = fh.readline().rstrip("\r\n")
        if header != KEEP_HEADER:
            raise KeepListError(f"{path}: line 1: header = {header!r}: expected {KEEP_HEADER!r}")
        previous = -1
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                raise KeepListError(f"{path}: line {lineno}: empty line: expected sample_id,weight,score")
            fields = line.split(",")
            if len(fields) != 3:
                raise KeepListError(f"{path}: line {lineno}: {line!r}: expected 3 fields "
                                    f"(sample_id,weight,score), found {len(fields)}")
            sid_text, weight_text, score_text = fields
            try:
                sid = int(sid_text)
            except ValueError:
                raise KeepListError(f"{path}: line {lineno}: sample_id = {sid_text!r}: "
                                    "expected an integer >= 0") from None
            if sid < 0:
                raise KeepListError(f"{path}: line {lineno}: sample_id = {sid}: expected an integer >= 0")
            if sid <= previous:
                raise KeepListError(f"{path}: line {lineno}: sample_id = {sid}: expected ascending "
                                    f"unique ids (previous {previous})")
            try:
                weight = float(weight_text)
            except ValueError:
                raise KeepListError(f"{path}: line {lineno}: weight = {weight_text!r}: "
                                    "expected a finite number > 0") from None
            if not (math.isfinite(weight) and weight > 0):
                raise KeepListError(f"{path}: line {lineno}: weight = {weight_text!r}: "
                                    "expected a finite number > 0")
            try:
                score = float(score_text)
            except ValueError:
                raise KeepListError(f"{path}: line {lineno}: score = {score_text!r}: expected a number") from None
            if math.isnan(score):
                raise KeepListError(f"{path}: line {lineno}: score = {score_text!r}: expected a number, not nan")
            previous = sid
            ids.append(sid)
            weights.append(weight)
            scores.append(score)
    if not ids:
        raise KeepListError(f"{path}: line 2: no rows: expected at least one kept sample")
    return (np.asarray(ids, dtype=np.int64), np.asarray(weights, dtype=np.float64),
            np.asarray(scores, dtype=np.float64))


def write_history_csv(path: str | Path, history: list[Mapping[str, Any]],
                      columns: tuple[str, ...] = ("epoch", "loss", "train_accuracy", "test_accuracy",
                                                  "epoch_seconds")) -> Path:
    """Per-epoch metrics as CSV (what ``dvc plots`` reads), atomically; missing values left empty."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            fh.write(",".join(columns) + "\n")
            for row in history:
                fh.write(",".join("" if row.get(c) is None else repr(row.get(c)) for c in columns) + "\n")
    return Path(path)
