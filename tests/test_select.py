"""Selection (docs/scores.md "Selection"): counts, ties, quotas, classes never emptied, stratified."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from pipeline.select import Selection, SelectionError, class_quotas, n_keep_of, select


@pytest.mark.parametrize(
    "p, N, keep",
    [(0.0, 10, 10), (0.5, 10, 5), (0.55, 10, 5), (0.9, 10, 1), (0.99, 10, 1), (0.3, 7, 5),
     (0.29, 100, 71),  # 0.29 * 100 is 28.999... in binary; the decimal value prunes 29
     (0.7, 10, 3), (0.1, 1, 1)],
)
def test_counts(p, N, keep):
    # n_prune = floor(p N), n_keep = N - n_prune; e.g. p .3, N 7: floor(2.1) = 2 -> 5
    assert n_keep_of(p, N) == keep
    sel = select(np.arange(N, dtype=float), np.zeros(N, int), prune_rate=p)
    assert sel.keep_ids.size == keep
    assert sel.keep_ids.dtype == np.int64


def test_top_keeps_highest_ascending_ids_with_scores():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    sel = select(scores, np.zeros(5, int), prune_rate=0.4, class_balanced=False)
    # n_keep = 5 - floor(2.0) = 3: the scores .9 (id 1), .7 (id 3), .5 (id 2)
    np.testing.assert_array_equal(sel.keep_ids, [1, 2, 3])
    np.testing.assert_array_equal(sel.keep_scores, [0.9, 0.5, 0.7])
    assert sel.method == "top" and sel.bin_of is None and sel.bin_sizes is None
    assert sel.quotas == {0: 3}


def test_ties_go_to_lower_id():
    scores = np.array([1.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    sel = select(scores, np.zeros(6, int), prune_rate=0.5, class_balanced=False)
    # keep 3: both 2.0s (ids 1, 4), then the lowest id among the 1.0s: id 0
    np.testing.assert_array_equal(sel.keep_ids, [0, 1, 4])
    sel = select(np.zeros(6), np.zeros(6, int), prune_rate=0.5, class_balanced=False)
    np.testing.assert_array_equal(sel.keep_ids, [0, 1, 2])


def test_inf_scores_rank_highest():
    scores = np.array([1.0, np.inf, 3.0, np.inf])
    sel = select(scores, np.zeros(4, int), prune_rate=0.5, class_balanced=False)
    np.testing.assert_array_equal(sel.keep_ids, [1, 3])


def test_largest_remainder_quotas_by_hand():
    # sizes 5, 3, 2 (N = 10), n_keep = 5: exact 2.5, 1.5, 1.0 -> floors 2, 1, 1 (sum 4);
    # remainders .5, .5, 0 -> the one extra goes to the lower class id among equal remainders: 0
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    assert class_quotas(labels, 5) == {0: 3, 1: 1, 2: 1}
    # sizes 6, 3, 1, n_keep 7: exact 4.2, 2.1, .7 -> floors 4, 2, 0; remainders .2, .1, .7 -> class 2
    labels = np.array([0] * 6 + [1] * 3 + [2])
    assert class_quotas(labels, 7) == {0: 4, 1: 2, 2: 1}


def test_class_never_emptied():
    # sizes 8, 1, 1, n_keep = 3: exact 2.4, .3, .3 -> floors 2, 0, 0; remainders .4 .3 .3 -> class 0
    # -> (3, 0, 0); classes 1 and 2 each take one from the largest quota (class 0) -> (1, 1, 1)
    labels = np.array([0] * 8 + [1, 2])
    assert class_quotas(labels, 3) == {0: 1, 1: 1, 2: 1}
    scores = np.array([9, 8, 7, 6, 5, 4, 3, 2, 0, 1], dtype=float)  # classes 1, 2 score lowest
    sel = select(scores, labels, prune_rate=0.7)
    np.testing.assert_array_equal(sel.keep_ids, [0, 8, 9])
    assert sel.quotas == {0: 1, 1: 1, 2: 1}
    # not class-balanced: pure top, classes 1 and 2 are dropped
    sel = select(scores, labels, prune_rate=0.7, class_balanced=False)
    np.testing.assert_array_equal(sel.keep_ids, [0, 1, 2])
    assert sel.quotas == {0: 3, 1: 0, 2: 0}


def test_fewer_keeps_than_classes_is_an_error():
    labels = np.array([0] * 8 + [1, 2])
    with pytest.raises(SelectionError, match=r"score\.prune_rate = 0\.8.*n_keep = 2.*3 classes"):
        select(np.arange(10.0), labels, prune_rate=0.8)


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    p=st.floats(0.0, 0.95),
    data=st.data(),
)
def test_quota_properties(labels, p, data):
    labels = np.array(labels)
    N = labels.size
    n_keep = n_keep_of(p, N)
    classes, sizes = np.unique(labels, return_counts=True)
    if n_keep < classes.size:
        with pytest.raises(SelectionError):
            select(np.zeros(N), labels, prune_rate=p)
        return
    scores = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=N, max_size=N)))
    q = class_quotas(labels, n_keep)
    assert sum(q.values()) == n_keep
    for c, s in zip(classes, sizes):
        assert 1 <= q[int(c)] <= s
    if all(n_keep * s >= N for s in sizes):  # every exact share >= 1: no class needed a fix
        for c, s in zip(classes, sizes):
            # largest remainder: within one of the exact proportional share
            assert abs(q[int(c)] - n_keep * s / N) < 1
    sel = select(scores, labels, prune_rate=p)
    assert sel.keep_ids.size == n_keep
    assert sel.quotas == q
    assert np.all(np.diff(sel.keep_ids) > 0)
    # top within each class: every kept sample of class c beats (or ties with a higher id) every
    # dropped one of the same class
    kept = np.zeros(N, bool)
    kept[sel.keep_ids] = True
    for c in classes:
        k = np.flatnonzero(kept & (labels == c))
        d = np.flatnonzero(~kept & (labels == c))
        if k.size and d.size:
            worst = k[np.lexsort((-k, scores[k]))[0]]  # lowest score, highest id among ties
            best_dropped = d[np.lexsort((d, -scores[d]))[0]]
            assert (scores[worst], -worst) > (scores[best_dropped], -best_dropped)


# ---------------------------------------------------------------------------------------------
# Stratified (coverage-centric)
# ---------------------------------------------------------------------------------------------
# 10 samples in 3 equal-width bins over [0, .9] (width .3): bin 0 holds 0.0, bin 1 holds .4 .5,
# bin 2 holds .65 .7 .75 .8 .85 .88 .9 (the maximum goes to the top bin).
STRAT = np.array([0.0, 0.4, 0.5, 0.65, 0.7, 0.75, 0.8, 0.85, 0.88, 0.9])


def test_stratified_budget_by_hand():
    # n_keep = 10 - floor(.4 * 10) = 6; sizes (1, 2, 7), smallest first:
    # bin 0 takes min(1, 6 // 3 = 2) = 1 (left 5); bin 1 min(2, 5 // 2 = 2) = 2 (left 3);
    # bin 2 min(7, 3 // 1) = 3.
    sel = select(STRAT, np.zeros(10, int), prune_rate=0.4, method="stratified", class_balanced=False,
                 bins=3, seed=0)
    np.testing.assert_array_equal(sel.bin_of, [0, 1, 1, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(sel.bin_sizes, [1, 2, 7])
    assert sel.keep_ids.size == 6
    per_bin = np.bincount(sel.bin_of[sel.keep_ids], minlength=3)
    np.testing.assert_array_equal(per_bin, [1, 2, 3])
    np.testing.assert_array_equal(sel.keep_scores, STRAT[sel.keep_ids])
    # same seed -> same keep-list; the draw within bin 2 depends on the seed
    again = select(STRAT, np.zeros(10, int), prune_rate=0.4, method="stratified", class_balanced=False,
                   bins=3, seed=0)
    np.testing.assert_array_equal(again.keep_ids, sel.keep_ids)
    draws = {tuple(select(STRAT, np.zeros(10, int), prune_rate=0.4, method="stratified",
                          class_balanced=False, bins=3, seed=s).keep_ids) for s in range(20)}
    assert len(draws) > 1


def test_stratified_hard_prune_and_inf_into_top_bin():
    scores = STRAT.copy()
    scores[3] = np.inf  # forgetting-style never-learned sample
    # hard_prune .2 drops floor(2.0) = 2 highest: the inf (id 3) and .9 (id 9).
    # Left: 0, .4, .5, .7, .75, .8, .85, .88 -> finite range [0, .88], width .88/3:
    # bin 0 [0, .293): 0; bin 1 [.293, .587): .4 .5; bin 2: the other five.
    sel = select(scores, np.zeros(10, int), prune_rate=0.5, method="stratified", class_balanced=False,
                 bins=3, hard_prune=0.2)
    np.testing.assert_array_equal(sel.bin_of, [0, 1, 1, -1, 2, 2, 2, 2, 2, -1])
    assert 3 not in sel.keep_ids and 9 not in sel.keep_ids
    # budget 5: bin 0 min(1, 5 // 3) = 1; bin 1 min(2, 4 // 2) = 2; bin 2 min(5, 2) = 2
    np.testing.assert_array_equal(np.bincount(sel.bin_of[sel.keep_ids], minlength=3), [1, 2, 2])
    # without hard prune the inf goes into the top bin of the finite range [0, .9]
    sel = select(scores, np.zeros(10, int), prune_rate=0.5, method="stratified", class_balanced=False,
                 bins=3)
    assert sel.bin_of[3] == 2


def test_stratified_hard_prune_leaving_too_few_is_an_error():
    with pytest.raises(SelectionError, match=r"score\.hard_prune = 0\.5.*leaving 5 < 9"):
        select(STRAT, np.zeros(10, int), prune_rate=0.1, method="stratified", class_balanced=False,
               hard_prune=0.5)


def test_stratified_class_balanced_runs_ccs_inside_each_class():
    labels = np.array([0, 1] * 10)
    scores = np.linspace(0, 1, 20)
    sel = select(scores, labels, prune_rate=0.5, method="stratified", bins=4, seed=1)
    assert sel.quotas == {0: 5, 1: 5}
    assert sel.bin_sizes.shape == (8,)  # 2 classes x 4 bins
    assert sel.bin_sizes[:4].sum() == 10 and sel.bin_sizes[4:].sum() == 10
    assert set(sel.bin_of[labels == 0]) <= set(range(4))
    assert set(sel.bin_of[labels == 1]) <= set(range(4, 8))


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.one_of(st.floats(-3, 3), st.just(np.inf)), min_size=1, max_size=50),
    p=st.floats(0.0, 0.95),
    hard=st.sampled_from([0.0, 0.05, 0.1]),
    bins=st.integers(1, 8),
    balanced=st.booleans(),
    seed=st.integers(0, 5),
    data=st.data(),
)
def test_stratified_properties(scores, p, hard, bins, balanced, seed, data):
    scores = np.array(scores)
    N = scores.size
    labels = np.array(data.draw(st.lists(st.integers(0, 2), min_size=N, max_size=N)))
    try:
        sel = select(scores, labels, prune_rate=p, method="stratified", class_balanced=balanced,
                     hard_prune=hard, bins=bins, seed=seed)
    except SelectionError as exc:
        assert "hard_prune" in str(exc) or "class" in str(exc)
        return
    assert sel.keep_ids.size == n_keep_of(p, N)  # the budget is spent exactly
    assert np.all(np.diff(sel.keep_ids) > 0)
    assert (sel.bin_of[sel.keep_ids] >= 0).all()  # hard-pruned samples are never kept
    kept_per = np.bincount(sel.bin_of[sel.keep_ids], minlength=sel.bin_sizes.size)
    assert (kept_per <= sel.bin_sizes).all()
    assert sel.bin_sizes.sum() == (sel.bin_of >= 0).sum()
    assert (sel.bin_of[np.isinf(scores)] % bins == bins - 1)[sel.bin_of[np.isinf(scores)] >= 0].all()
    again = select(scores, labels, prune_rate=p, method="stratified", class_balanced=balanced,
                   hard_prune=hard, bins=bins, seed=seed)
    np.testing.assert_array_equal(again.keep_ids, sel.keep_ids)


# ---------------------------------------------------------------------------------------------
# Ranges
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prune_rate": 1.0}, "score.prune_rate = 1.0: expected a number in [0, 1)"),
        ({"prune_rate": -0.1}, "score.prune_rate = -0.1: expected a number in [0, 1)"),
        ({"prune_rate": 0.5, "method": "bottom"}, "score.selection = 'bottom': expected one of top, stratified"),
        ({"prune_rate": 0.5, "hard_prune": 1.0}, "score.hard_prune = 1.0: expected a number in [0, 1)"),
        ({"prune_rate": 0.5, "hard_prune": -0.5}, "score.hard_prune = -0.5: expected a number in [0, 1)"),
        ({"prune_rate": 0.5, "bins": 0}, "score.bins = 0: expected an integer >= 1"),
        ({"prune_rate": 0.5, "seed": -1}, "score.seed = -1: expected an integer >= 0"),
        ({"prune_rate": 0.5, "class_balanced": "yes"}, "score.class_balanced = 'yes': expected true or false"),
    ],
)
def test_out_of_range_is_refused(kwargs, message):
    with pytest.raises(SelectionError) as info:
        select(np.arange(10.0), np.zeros(10, int), **kwargs)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_empty_and_nan_refused():
    with pytest.raises(SelectionError, match="n_keep = 0"):
        select(np.zeros(0), np.zeros(0, int), prune_rate=0.5)
    with pytest.raises(SelectionError, match="NaN"):
        select(np.array([1.0, np.nan]), np.zeros(2, int), prune_rate=0.5)


def test_selection_is_frozen():
    sel = select(np.arange(4.0), np.zeros(4, int), prune_rate=0.5)
    assert isinstance(sel, Selection)
    with pytest.raises(AttributeError):
        sel.method = "x"  # type: ignore[misc]
