"""Scores -> keep-list: ``top``, class-balanced ``top``, and ``stratified`` (coverage-centric).

docs/scores.md, "Selection". Scores follow the project convention: higher = more worth keeping.

Choices beyond the text of scores.md (stated again in ``select``'s docstring):

- ``n_prune = floor(p * N)`` is computed exactly on the decimal value of p (``repr``), so that
  p = 0.29, N = 100 prunes 29 (binary floating point would give 28.999... -> 28).
- Largest-remainder quotas: among equal remainders the lower class id gets the extra sample.
  Then every class with samples but a quota of 0 gets 1, taken from the class with the largest
  quota (ties: the lower class id). ``n_keep`` smaller than the number of classes is an error
  when ``class_balanced`` is true (no class may be emptied).
- ``stratified`` with ``class_balanced``: the per-class quotas first, then coverage-centric
  selection inside each class (its own hard prune, its own score range and bins). Strata are
  numbered ``class_index * bins + bin`` (class_index = position of the class in ascending
  label order), so ``bin_of``/``bin_sizes`` have ``K * bins`` strata. Without class balance
  there is one set of ``bins`` strata over all samples.
- Equal-width bins span the finite scores of the pool after the hard prune; a +inf score (as
  ``forgetting`` gives never-learned samples) goes into the top bin, -inf into the bottom bin;
  the maximum goes into the top bin; all-equal scores fall into bin 0. NaN is refused.
- Bin filling: bins in ascending size (ties: lower bin index first); each takes
  ``min(size, floor(remaining budget / remaining bins))``; empty bins count as bins (they take
  0). This always spends the whole budget.
- Hard prune drops ``floor(hard_prune * pool)`` samples, the highest scores first (ties: lower
  sample id first, the order of ``top``). If it leaves fewer samples than the budget, error.
- Draws within a bin: ``numpy.random.default_rng(seed).choice(members, take, replace=False)``,
  members in ascending id, strata visited in a fixed order (class, then fill order): the same
  seed gives the same keep-list.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from pipeline.scores import ScoreParamError

__all__ = ["Selection", "SelectionError", "select", "class_quotas", "n_keep_of", "METHODS"]

METHODS = ("top", "stratified")


class SelectionError(ScoreParamError):
    """A selection parameter is invalid; the message names ``score.<param>``, value and range."""


def _error(param: str, value, expected: str) -> SelectionError:
    return SelectionError(f"score.{param} = {value!r}: expected {expected}")


@dataclass(frozen=True)
class Selection:
    keep_ids: np.ndarray  # (n_keep,) int64, ascending sample ids
    keep_scores: np.ndarray  # (n_keep,) the selecting score of each kept id
    prune_rate: float
    method: str
    class_balanced: bool
    quotas: dict[int, int]  # kept per class (every class present in the labels)
    bin_of: np.ndarray | None  # stratified: (N,) stratum per sample, -1 = hard-pruned; else None
    bin_sizes: np.ndarray | None  # stratified: (strata,) samples per stratum after the hard prune


def _floor_frac(rate: float, n: int) -> int:
    """floor(rate * n) on the decimal value of ``rate`` (exact)."""
    return math.floor(Fraction(repr(float(rate))) * n)


def n_keep_of(prune_rate: float, num_samples: int) -> int:
    """``N - floor(p * N)``, exactly."""
    return num_samples - _floor_frac(prune_rate, num_samples)


def class_quotas(labels: np.ndarray, n_keep: int) -> dict[int, int]:
    """Per-class quotas proportional to the class sizes, by largest remainder, summing to n_keep.

    Ties among equal remainders: lower class id first. Then no class with samples is left at 0:
    it takes one from the class with the largest quota (ties: lower class id). Requires
    ``n_keep >= number of classes`` (checked by ``select``).
    """
    classes, sizes = np.unique(labels, return_counts=True)
    N = int(sizes.sum())
    base = [n_keep * int(s) // N for s in sizes]
    rem = [n_keep * int(s) % N for s in sizes]
    extra = n_keep - sum(base)
    for i in sorted(range(len(classes)), key=lambda i: (-rem[i], i))[:extra]:
        base[i] += 1
    for i in range(len(classes)):
        if base[i] == 0:
            donor = max(range(len(classes)), key=lambda j: (base[j], -j))
            assert base[donor] >= 2, "n_keep >= number of classes guarantees a donor"
            base[donor] -= 1
            base[i] = 1
    assert sum(base) == n_keep and all(0 < q <= s for q, s in zip(base, sizes))
    return {int(c): int(q) for c, q in zip(classes, base)}


def _top(ids: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """The k highest scores of ``ids`` (ties to the lower id)."""
    order = np.lexsort((ids, -scores[ids]))
    return ids[order[:k]]


def _equal_width_bins(s: np.ndarray, bins: int) -> np.ndarray:
    """Bin index in [0, bins) of each score: equal width over the finite range, +inf top bin."""
    finite = np.isfinite(s)
    idx = np.zeros(s.shape[0], dtype=np.int64)
    if finite.any():
        lo, hi = float(s[finite].min()), float(s[finite].max())
        if hi > lo:
            pos = (s[finite].astype(np.float64) - lo) / (hi - lo) * bins
            idx[finite] = np.clip(np.floor(pos), 0, bins - 1).astype(np.int64)
    idx[s == np.inf] = bins - 1
    idx[s == -np.inf] = 0
    return idx


def _ccs(ids: np.ndarray, scores: np.ndarray, budget: int, *, hard_prune: float, bins: int,
         rng: np.random.Generator, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coverage-centric selection inside one pool of sample ids (ascending).

    Returns (kept ids, stratum of each pool sample with -1 for hard-pruned, (bins,) sizes).
    """
    n_hard = _floor_frac(hard_prune, ids.size)
    dropped = _top(ids, scores, n_hard)
    rest = np.setdiff1d(ids, dropped, assume_unique=True)  # ascending
    if rest.size < budget:
        raise _error(
            "hard_prune", hard_prune,
            f"a fraction that leaves at least the budget: it drops {n_hard} of the {ids.size} "
            f"samples{where}, leaving {rest.size} < {budget} to keep (lower score.hard_prune or "
            f"raise score.prune_rate)",
        )
    local = _equal_width_bins(scores[rest], bins)  # (len(rest),)
    sizes = np.bincount(local, minlength=bins)
    stratum = np.full(ids.size, -1, dtype=np.int64)
    stratum[np.searchsorted(ids, rest)] = local
    kept = []
    remaining = budget
    for j, b in enumerate(np.argsort(sizes, kind="stable")):  # smallest bin first
        take = min(int(sizes[b]), remaining // (bins - j))
        if take:
            members = rest[local == b]
            kept.append(rng.choice(members, size=take, replace=False))
        remaining -= take
    assert remaining == 0, "the fill always spends the budget"
    out = np.sort(np.concatenate(kept)) if kept else np.zeros(0, dtype=np.int64)
    return out.astype(np.int64), stratum, sizes


def select(scores: np.ndarray, labels: np.ndarray, *, prune_rate: float, method: str = "top",
           class_balanced: bool = True, hard_prune: float = 0.0, bins: int = 50,
           seed: int = 0) -> Selection:
    """Choose which samples to keep. scores (N,) (higher = keep), labels (N,) int -> Selection.

    ``n_prune = floor(p * N)`` (exact on p's decimal value), ``n_keep = N - n_prune``,
    p in [0, 1); ``n_keep = 0`` is an error.

    - ``top``: the n_keep highest scores; ties go to the lower sample id (stable).
    - ``class_balanced``: per-class quotas by largest remainder (equal remainders: lower class
      id first), each class >= 1 while it has samples (n_keep below the number of classes is an
      error), then the method inside each class.
    - ``stratified`` (CCS): drop the ``hard_prune`` fraction of highest scores, split the
      finite score range into ``bins`` equal-width bins (+inf -> top bin), fill the budget
      smallest bin first, each taking ``min(size, floor(remaining / bins left))``, uniform
      draws within a bin from ``default_rng(seed)``. With ``class_balanced`` this runs inside
      each class on its quota (strata ``class_index * bins + bin``).

    keep_ids ascend; keep_scores are ``scores[keep_ids]``. Errors (``SelectionError``, a
    ``ValueError``) name ``score.<param>``, the value and the range.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.ndim != 1:
        raise SelectionError(f"scores: expected shape (N,), found {scores.shape}")
    if labels.shape != scores.shape:
        raise SelectionError(f"labels: expected shape {scores.shape} like the scores, found {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise SelectionError(f"labels: expected integers, found {labels.dtype}")
    if np.isnan(scores).any():
        raise SelectionError(f"scores: {int(np.isnan(scores).sum())} NaN values; expected numbers")
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(prune_rate) < 1.0:
        raise _error("prune_rate", prune_rate, "a number in [0, 1)")
    if method not in METHODS:
        raise _error("selection", method, f"one of {', '.join(METHODS)}")
    if not isinstance(class_balanced, (bool, np.bool_)):
        raise _error("class_balanced", class_balanced, "true or false")
    if isinstance(hard_prune, bool) or not isinstance(hard_prune, (int, float, np.floating, np.integer)) \
            or not 0.0 <= float(hard_prune) < 1.0:
        raise _error("hard_prune", hard_prune, "a number in [0, 1)")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise _error("bins", bins, "an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise _error("seed", seed, "an integer >= 0")

    N = scores.shape[0]
    n_keep = n_keep_of(prune_rate, N)
    if n_keep == 0:
        raise _error("prune_rate", prune_rate, f"a rate that keeps at least one sample (n_keep = 0 of N = {N})")
    classes = np.unique(labels)
    ids = np.arange(N, dtype=np.int64)
    rng = np.random.default_rng(int(seed))

    if class_balanced:
        if n_keep < classes.size:
            raise _error(
                "prune_rate", prune_rate,
                f"a rate that keeps at least one sample per class: n_keep = {n_keep} of N = {N} "
                f"is fewer than the {classes.size} classes (p < {(N - classes.size + 1) / N:.6g}), "
                f"or score.class_balanced = false",
            )
        quotas = class_quotas(labels, n_keep)
        pools = [(c, ids[labels == c], quotas[int(c)]) for c in classes]
    else:
        pools = [(None, ids, n_keep)]

    kept_parts = []
    bin_of = bin_sizes = None
    if method == "top":
        for _, pool, budget in pools:
            kept_parts.append(_top(pool, scores, budget))
    else:
        bin_of = np.full(N, -1, dtype=np.int64)
        size_parts = []
        for k, (c, pool, budget) in enumerate(pools):
            where = "" if c is None else f" of class {int(c)}"
            kept, stratum, sizes = _ccs(pool, scores, budget, hard_prune=float(hard_prune),
                                        bins=int(bins), rng=rng, where=where)
            kept_parts.append(kept)
            bin_of[pool] = np.where(stratum >= 0, stratum + k * int(bins), -1)
            size_parts.append(sizes)
        bin_sizes = np.concatenate(size_parts).astype(np.int64)

    keep_ids = np.sort(np.concatenate(kept_parts)).astype(np.int64)
    assert keep_ids.size == n_keep and np.unique(keep_ids).size == n_keep
    kept_labels = labels[keep_ids]
    counts = {int(c): int((kept_labels == c).sum()) for c in classes}
    return Selection(
        keep_ids=keep_ids,
        keep_scores=scores[keep_ids],
        prune_rate=float(prune_rate),
        method=method,
        class_balanced=bool(class_balanced),
        quotas=counts,
        bin_of=bin_of,
        bin_sizes=bin_sizes,
    )
