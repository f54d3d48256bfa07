"""Scores -> keep-list: selection by one score, then importance weights (kept apart from scoring)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ScoreConfig
from .select import Selection, select
from .weights import importance_weights, resolve_weighting

__all__ = ["KeepList", "make_keep_list"]


@dataclass(frozen=True)
class KeepList:
    ids: np.ndarray  # (n_keep,) int64 ascending sample ids
    weights: np.ndarray  # (n_keep,) float64, mean 1
    scores: np.ndarray  # (n_keep,) the selecting score of each kept sample
    weighting: str  # the resolved scheme: none | score | inverse_inclusion
    selection: Selection


def make_keep_list(scores: np.ndarray, labels: np.ndarray, score_cfg: ScoreConfig, *, select_by: str,
                   prune_rate: float) -> KeepList:
    """Select by ``scores`` (N,) (higher = keep) at ``prune_rate`` with score_cfg's selection and
    weighting options; ``select_by`` names the score (it decides what ``weighting: auto`` means)."""
    sc = score_cfg
    selection = select(scores, labels, prune_rate=prune_rate, method=sc.selection, class_balanced=sc.class_balanced,
                       hard_prune=sc.hard_prune, bins=sc.bins, seed=sc.seed)
    scheme = resolve_weighting(sc.weighting, select_by=select_by, selection_method=sc.selection)
    weights = importance_weights(selection, scores, labels, scheme=scheme, gamma=sc.weight_gamma,
                                 w_min=sc.weight_min, w_max=sc.weight_max, class_balance=sc.class_balance)
    return KeepList(ids=np.asarray(selection.keep_ids, dtype=np.int64), weights=np.asarray(weights, np.float64),
                    scores=np.asarray(selection.keep_scores), weighting=scheme, selection=selection)
