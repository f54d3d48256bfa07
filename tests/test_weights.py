"""Importance weights (docs/scores.md "Importance weights"): hand values, mean 1, clip, class balance."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.select import select
from pipeline.weights import WeightError, importance_weights, resolve_weighting


def test_resolve_weighting():
    assert resolve_weighting("auto", select_by="td_dyun", selection_method="top") == "score"
    assert resolve_weighting("auto", select_by="dyun", selection_method="top") == "none"
    assert resolve_weighting("auto", select_by="el2n", selection_method="stratified") == "inverse_inclusion"
    # stratified takes precedence: inverse inclusion is the correction for that sampling
    assert resolve_weighting("auto", select_by="td_dyun", selection_method="stratified") == "inverse_inclusion"
    assert resolve_weighting("score", select_by="el2n", selection_method="top") == "score"
    assert resolve_weighting("none", select_by="td_dyun", selection_method="top") == "none"
    with pytest.raises(WeightError, match=r"score\.weighting = 'inverse_inclusion'.*stratified"):
        resolve_weighting("inverse_inclusion", select_by="td_dyun", selection_method="top")
    with pytest.raises(WeightError, match=r"score\.weighting = 'big': expected one of auto, none, score"):
        resolve_weighting("big", select_by="td_dyun", selection_method="top")


def test_none_is_all_ones():
    sel = select(np.arange(6.0), np.zeros(6, int), prune_rate=0.5)
    np.testing.assert_array_equal(importance_weights(sel, np.arange(6.0), np.zeros(6, int), scheme="none"),
                                  np.ones(3))


def test_score_weights_by_hand():
    # N = 4, scores (.1, .4, .3, .2): rank01 = (0, 1, 2/3, 1/3); keep 2 -> ids 1, 2.
    # delta = 1/4: w = (1.25, 11/12), mean 13/12 -> (15/13, 11/13); inside [.25, 4], unchanged.
    scores = np.array([0.1, 0.4, 0.3, 0.2])
    sel = select(scores, np.zeros(4, int), prune_rate=0.5, class_balanced=False)
    np.testing.assert_array_equal(sel.keep_ids, [1, 2])
    w = importance_weights(sel, scores, np.zeros(4, int), scheme="score")
    np.testing.assert_allclose(w, [15 / 13, 11 / 13], rtol=1e-12)
    # gamma 2: (1.5625, 121/144) -> / mean
    w = importance_weights(sel, scores, np.zeros(4, int), scheme="score", gamma=2.0)
    a, b = 1.25**2, (11 / 12) ** 2
    np.testing.assert_allclose(w, [a / ((a + b) / 2), b / ((a + b) / 2)], rtol=1e-12)


def test_score_weights_clip_then_renormalise_by_hand():
    # N = 5, scores 0..4, keep all (p = 0): r = (0, .25, .5, .75, 1), delta .2,
    # r + delta = (.2, .45, .7, .95, 1.2); gamma 3 -> (.008, .091125, .343, .857375, 1.728),
    # mean .6055; normalised -> (.0132, .1505, .5665, 1.4160, 2.8538);
    # clip to [.25, 2] -> (.25, .25, .5665, 1.4160, 2); normalised once more.
    scores = np.arange(5.0)
    sel = select(scores, np.zeros(5, int), prune_rate=0.0)
    w = importance_weights(sel, scores, np.zeros(5, int), scheme="score", gamma=3.0, w_min=0.25, w_max=2.0)
    cubes = np.array([0.008, 0.091125, 0.343, 0.857375, 1.728])
    clipped = np.clip(cubes / 0.6055, 0.25, 2.0)
    np.testing.assert_allclose(w, clipped / clipped.mean(), rtol=1e-9)
    assert abs(w.mean() - 1) < 1e-12
    # The clip bounds hold before the last normalisation; the final division by mean(clipped)
    # (= .8965) pushes the top weight to 2.2309 > w_max = 2 - what scores.md's order implies.
    assert w.max() > 2.0
    np.testing.assert_allclose(w.max(), 2.0 / clipped.mean(), rtol=1e-12)
    assert w.max() / w.min() <= 2.0 / 0.25 + 1e-12


def test_inverse_inclusion_by_hand():
    # STRAT from test_select: bins sizes (1, 2, 7), kept (1, 2, 3): w = 1, 1, 1, 7/3 x 3;
    # mean (3 + 7) / 6 = 5/3 -> 3/5 and 7/5.
    strat = np.array([0.0, 0.4, 0.5, 0.65, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9])
    labels = np.zeros(10, int)
    sel = select(strat, labels, prune_rate=0.4, method="stratified", class_balanced=False, bins=3)
    w = importance_weights(sel, strat, labels, scheme="inverse_inclusion")
    expected = np.where(sel.bin_of[sel.keep_ids] == 2, 7 / 5, 3 / 5)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    top = select(strat, labels, prune_rate=0.4)
    with pytest.raises(WeightError, match="stratified"):
        importance_weights(top, strat, labels, scheme="inverse_inclusion")


def test_class_balance_restores_proportions_by_hand():
    # 6 samples of class 0 (scores high), 4 of class 1; top 5 without class balance keeps
    # 4 of class 0 and 1 of class 1. Factors: class 0 (6/10)/(4/5) = .75, class 1 (4/10)/(1/5) = 2;
    # mean (4 * .75 + 2) / 5 = 1 already.
    labels = np.array([0] * 6 + [1] * 4)
    scores = np.array([9, 8, 7, 6, 1, 0, 5, 0.5, 0.2, 0.1])
    sel = select(scores, labels, prune_rate=0.5, class_balanced=False)
    np.testing.assert_array_equal(sel.keep_ids, [0, 1, 2, 3, 6])
    w = importance_weights(sel, scores, labels, scheme="none", class_balance=True)
    np.testing.assert_allclose(w, [0.75, 0.75, 0.75, 0.75, 2.0], rtol=1e-12)
    # weighted class proportions of the kept set = full data's (.6, .4)
    kept = labels[sel.keep_ids]
    np.testing.assert_allclose([w[kept == c].sum() / w.sum() for c in (0, 1)], [0.6, 0.4], rtol=1e-12)


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.one_of(st.floats(-3, 3), st.just(np.inf)), min_size=2, max_size=40),
    p=st.floats(0.0, 0.9),
    scheme=st.sampled_from(["none", "score", "inverse_inclusion"]),
    gamma=st.floats(0.2, 4.0),
    bounds=st.sampled_from([(0.25, 4.0), (0.5, 2.0), (1.0, 1.0), (0.1, 10.0)]),
    class_balance=st.booleans(),
    data=st.data(),
)
def test_weight_properties(scores, p, scheme, gamma, bounds, class_balance, data):
    scores = np.array(scores)
    N = scores.size
    labels = np.array(data.draw(st.lists(st.integers(0, 2), min_size=N, max_size=N)))
    method = "stratified" if scheme == "inverse_inclusion" else "top"
    sel = select(scores, labels, prune_rate=p, method=method, class_balanced=False, bins=5)
    w = importance_weights(sel, scores, labels, scheme=scheme, gamma=gamma, w_min=bounds[0],
                           w_max=bounds[1], class_balance=class_balance)
    assert w.shape == sel.keep_ids.shape and w.dtype == np.float64
    assert np.isfinite(w).all() and (w > 0).all()
    assert abs(w.mean() - 1.0) < 1e-6
    if scheme == "score" and not class_balance:
        assert w.max() / w.min() <= bounds[1] / bounds[0] * (1 + 1e-9)
    kept = labels[sel.keep_ids]
    if class_balance and scheme == "none" and set(kept) == set(labels):
        # restored exactly when every class keeps a sample (a class with none cannot be restored)
        for c in np.unique(kept):
            np.testing.assert_allclose(w[kept == c].sum() / w.sum(), (labels == c).mean(), rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "auto"}, "score.weighting = 'auto': expected one of none, score, inverse_inclusion"),
        ({"scheme": "score", "gamma": 0.0}, "score.weight_gamma = 0.0: expected a number > 0"),
        ({"scheme": "score", "gamma": -1.0}, "score.weight_gamma = -1.0: expected a number > 0"),
        ({"scheme": "score", "w_min": 0.0}, "score.weight_min/weight_max = (0.0, 4.0): expected 0 < weight_min <= 1 <= weight_max"),
        ({"scheme": "score", "w_min": 1.5}, "score.weight_min/weight_max = (1.5, 4.0)"),
        ({"scheme": "score", "w_max": 0.5}, "score.weight_min/weight_max = (0.25, 0.5)"),
    ],
)
def test_out_of_range_is_refused(kwargs, message):
    sel = select(np.arange(6.0), np.zeros(6, int), prune_rate=0.5)
    with pytest.raises(WeightError) as info:
        importance_weights(sel, np.arange(6.0), np.zeros(6, int), **kwargs)
    assert message in str(info.value)
