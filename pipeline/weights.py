"""Keep-list + scores -> per-sample importance weights for stage three (docs/scores.md).

Weights have mean exactly 1 over the kept set (to float64 rounding), so the learning rate means
what it means without weights. Stage three's loss is ``mean_i(w_i * CE_i)`` per batch.

- ``none``: all 1.
- ``score``: ``r = rank01(selecting score)`` over all N, ``w = (r + 1/N)^gamma``, normalise to
  mean 1, clip to ``[w_min, w_max]``, normalise to mean 1 once more. The bounds hold *before*
  that last normalisation: the final weights are the clipped ones divided by their mean, so they
  may lie slightly outside ``[w_min, w_max]`` (by the factor ``1 / mean(clipped)``); their
  ratio max/min stays within ``w_max / w_min``.
- ``inverse_inclusion`` (for ``stratified``): ``w = size(stratum) / kept(stratum)``, normalised.
- ``class_balance``: multiply by ``(N_c / N) / (n_keep_c / n_keep)`` before the last
  normalisation (restores the full data's class proportions exactly for ``none`` and
  ``inverse_inclusion`` within a class-balanced selection; for ``score`` it rescales each class).

``auto`` (``resolve_weighting``): ``inverse_inclusion`` when the selection is stratified (the
correction that belongs to that sampling, whatever the score), else ``score`` when selecting by
``td_dyun``, else ``none``.
"""
from __future__ import annotations

import numpy as np

from pipeline.scores import ScoreParamError, rank01
from pipeline.select import Selection

__all__ = ["WeightError", "SCHEMES", "resolve_weighting", "importance_weights"]

SCHEMES = ("none", "score", "inverse_inclusion")


class WeightError(ScoreParamError):
    """A weighting parameter is invalid; the message names ``score.<param>``, value and range."""


def _error(param: str, value, expected: str) -> WeightError:
    return WeightError(f"score.{param} = {value!r}: expected {expected}")


def resolve_weighting(scheme: str, *, select_by: str, selection_method: str) -> str:
    """``auto`` -> ``inverse_inclusion`` (stratified selection) / ``score`` (select_by td_dyun) /
    ``none``; an explicit scheme is returned as is (``inverse_inclusion`` needs stratified)."""
    if scheme not in ("auto",) + SCHEMES:
        raise _error("weighting", scheme, f"one of auto, {', '.join(SCHEMES)}")
    if scheme == "auto":
        if selection_method == "stratified":
            return "inverse_inclusion"
        return "score" if select_by == "td_dyun" else "none"
    if scheme == "inverse_inclusion" and selection_method != "stratified":
        raise _error("weighting", scheme,
                     f"score.selection = 'stratified' for inverse_inclusion (found {selection_method!r}); "
                     f"or one of auto, none, score")
    return scheme


def importance_weights(selection: Selection, scores: np.ndarray, labels: np.ndarray, *, scheme: str,
                       gamma: float = 1.0, w_min: float = 0.25, w_max: float = 4.0,
                       class_balance: bool = False) -> np.ndarray:
    """Weights of the kept samples: (n_keep,) float64 aligned with ``selection.keep_ids``, mean 1.

    scores: (N,) the selecting score (higher = keep); labels: (N,) int. ``scheme`` is one of
    none, score, inverse_inclusion (resolve ``auto`` first with ``resolve_weighting``). See the
    module docstring for the formulas and for the clip bounds after the last normalisation.
    """
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    keep = np.asarray(selection.keep_ids, dtype=np.int64)
    N = scores.shape[0] if scores.ndim == 1 else -1
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise WeightError(f"scores, labels: expected two (N,) arrays, found {scores.shape}, {labels.shape}")
    if keep.size == 0 or keep.min() < 0 or keep.max() >= N:
        raise WeightError(f"selection.keep_ids: expected 1 or more ids in [0, {N}), found {keep.size} ids")
    if scheme not in SCHEMES:
        raise _error("weighting", scheme, f"one of {', '.join(SCHEMES)} (resolve 'auto' first)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer)) \
            or not np.isfinite(gamma) or gamma <= 0:
        raise _error("weight_gamma", gamma, "a number > 0")
    if not (0 < w_min <= 1.0 <= w_max) or not np.isfinite(w_max):
        raise _error("weight_min/weight_max", (w_min, w_max), "0 < weight_min <= 1 <= weight_max")

    if scheme == "none":
        w = np.ones(keep.size, dtype=np.float64)
    elif scheme == "score":
        r = rank01(scores)[keep]  # rank of the selecting score over all N, in [0, 1]
        w = (r + 1.0 / N) ** float(gamma)
        w = w / w.mean()
        w = np.clip(w, w_min, w_max)
    else:  # inverse_inclusion
        if selection.bin_of is None or selection.bin_sizes is None:
            raise _error("weighting", scheme, f"a stratified selection (found {selection.method!r})")
        stratum = np.asarray(selection.bin_of)[keep]
        if (stratum < 0).any():
            raise WeightError("selection.bin_of: a kept sample is marked hard-pruned (-1)")
        sizes = np.asarray(selection.bin_sizes, dtype=np.float64)
        kept = np.bincount(stratum, minlength=sizes.size).astype(np.float64)
        w = sizes[stratum] / kept[stratum]

    if class_balance:
        classes, full = np.unique(labels, return_counts=True)
        kept_counts = np.array([(labels[keep] == c).sum() for c in classes], dtype=np.float64)
        n_keep = float(keep.size)
        with np.errstate(divide="ignore", invalid="ignore"):
            factor = (full / N) / (kept_counts / n_keep)  # inf only for classes with no kept sample
        w = w * factor[np.searchsorted(classes, labels[keep])]
    return w / w.mean()
