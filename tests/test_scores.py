"""Scores (docs/scores.md): hand-computed values, properties, presets, ranges, blocked == whole.

Expected values are worked out by hand from the definitions: the arithmetic is in the comments
and written out with ``math`` in the expectations, never produced by the implementation.
Logits are ``log(probabilities)`` so that ``softmax`` gives back the chosen probabilities.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pipeline import scores as S
from pipeline.scores import ScoreParamError

SQ2 = math.sqrt(2.0)


def logits_from_probs(probs: list[list[list[float]]]) -> np.ndarray:
    """probs[e][n] = a distribution over C classes -> logits log(P), (T, n, C) float32."""
    return np.log(np.asarray(probs, dtype=np.float64)).astype(np.float32)


# Two samples, C = 2, T = 4. Sample 0 has label 0 with g = 0.5, 0.7, 0.9, 0.6;
# sample 1 has label 1 with g = 0.2, 0.2, 0.8, 0.8.
G0 = [0.5, 0.7, 0.9, 0.6]
G1 = [0.2, 0.2, 0.8, 0.8]
Z_G = logits_from_probs([[[a, 1 - a], [1 - b, b]] for a, b in zip(G0, G1)])
Y_G = np.array([0, 1])


def run(methods, logits=Z_G, labels=Y_G, **kw):
    return S.score_arrays(logits, labels, methods, **kw)


def H2(p):  # entropy of (p, 1-p)
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


# ---------------------------------------------------------------------------------------------
# Hand-computed values
# ---------------------------------------------------------------------------------------------
def test_gold_prob_from_log_probabilities():
    b = S.BlockTensors(Z_G, Y_G)
    np.testing.assert_allclose(b.gold_prob.numpy(), np.array([G0, G1]).T, atol=1e-6)


def test_dyun_by_hand():
    # window J = 2: std(ddof=1) of two values a, b is |a - b| / sqrt(2).
    # sample 0 windows: (.5,.7) (.7,.9) (.9,.6) -> .2/√2, .2/√2, .3/√2
    # sample 1 windows: (.2,.2) (.2,.8) (.8,.8) -> 0, .6/√2, 0
    # include_last false: W = T - J = 2 -> the first two windows only.
    out = run({"dyun": {"window": 2}})["dyun"]
    np.testing.assert_allclose(out, [(0.2 / SQ2 + 0.2 / SQ2) / 2, (0 + 0.6 / SQ2) / 2], atol=1e-6)
    # include_last true: W = 3.
    out = run({"dyun": {"window": 2, "include_last": True}})["dyun"]
    np.testing.assert_allclose(out, [(0.2 + 0.2 + 0.3) / SQ2 / 3, 0.6 / SQ2 / 3], atol=1e-6)
    # window 3, include_last false: W = 1, window (.5,.7,.9): mean .7, var (.04+0+.04)/2 = .04
    # -> std .2; sample 1 (.2,.2,.8): mean .4, var (.04+.04+.16)/2 = .12 -> sqrt(.12).
    out = run({"dyun": {"window": 3}})["dyun"]
    np.testing.assert_allclose(out, [0.2, math.sqrt(0.12)], atol=1e-6)


def test_wdu_by_hand():
    # J = 2, T = 4 -> W = 3, recency .5 -> omega = (.25, .5, 1), sum 1.75, difficulty 1.
    # sample 0: U = (.2, .2, .3)/√2, m = (.6, .8, .75), 1-m = (.4, .2, .25)
    #   (.25*.2/√2*.4 + .5*.2/√2*.2 + 1*.3/√2*.25) / 1.75
    # sample 1: U = (0, .6/√2, 0), m = (.2, .5, .8) -> .5*.6/√2*.5 / 1.75
    out = run({"wdu": {"window": 2, "recency": 0.5, "difficulty": 1.0}})["wdu"]
    e0 = (0.25 * 0.2 / SQ2 * 0.4 + 0.5 * 0.2 / SQ2 * 0.2 + 1 * 0.3 / SQ2 * 0.25) / 1.75
    e1 = 0.5 * 0.6 / SQ2 * 0.5 / 1.75
    np.testing.assert_allclose(out, [e0, e1], atol=1e-6)
    # difficulty 2 squares (1 - m).
    out = run({"wdu": {"window": 2, "recency": 0.5, "difficulty": 2.0}})["wdu"]
    e0 = (0.25 * 0.2 / SQ2 * 0.16 + 0.5 * 0.2 / SQ2 * 0.04 + 1 * 0.3 / SQ2 * 0.0625) / 1.75
    np.testing.assert_allclose(out[0], e0, atol=1e-6)
    # window 10 > T = 4 is clamped to J = 4, W = 1: sample 0 mean .675,
    # deviations -.175 .025 .225 -.075, squares sum .0875, var .0875/3, times (1 - .675).
    out = run({"wdu": {"window": 10}})["wdu"]
    np.testing.assert_allclose(out[0], math.sqrt(0.0875 / 3) * 0.325, atol=1e-6)


def test_gold_prob_baselines_by_hand():
    out = run({k: {} for k in ("variability", "confidence", "loss", "el2n", "entropy")})
    # variability (ddof 0): sample 0 sum of squared deviations .0875 over 4; sample 1 devs ±.3.
    np.testing.assert_allclose(out["variability"], [math.sqrt(0.0875 / 4), 0.3], atol=1e-6)
    # confidence = -mean g: -(.5+.7+.9+.6)/4 = -.675, -(.2+.2+.8+.8)/4 = -.5
    np.testing.assert_allclose(out["confidence"], [-0.675, -0.5], atol=1e-6)
    # loss = mean -log(g + 1e-8)
    l0 = -sum(math.log(g + 1e-8) for g in G0) / 4
    l1 = -sum(math.log(g + 1e-8) for g in G1) / 4
    np.testing.assert_allclose(out["loss"], [l0, l1], rtol=1e-6)
    # el2n with C = 2: ||(g, 1-g) - (1, 0)|| = sqrt(2) (1 - g); mean(1-g) = .325 and .5.
    # el2n's default trajectory 10 is clamped to E = 4.
    np.testing.assert_allclose(out["el2n"], [SQ2 * 0.325, SQ2 * 0.5], atol=1e-6)
    # entropy: mean of H(g) with H(p) = -(p ln p + (1-p) ln(1-p)).
    np.testing.assert_allclose(
        out["entropy"], [sum(map(H2, G0)) / 4, sum(map(H2, G1)) / 4], atol=1e-6
    )
    # trajectory 2 uses epochs 0, 1 only: confidence -(.5+.7)/2, -(.2+.2)/2.
    out = run({"confidence": {"trajectory": 2}})
    np.testing.assert_allclose(out["confidence"], [-0.6, -0.2], atol=1e-6)


def test_aum_by_hand():
    # C = 3, T = 3, one sample of label 0: margins Z_y - max_{c≠y} Z_c:
    # (2,1,0): 2-1 = 1; (0,3,1): 0-3 = -3; (1,1,1): 1-1 = 0 -> mean -2/3 -> aum = +2/3.
    # second sample, label 2: (0,0,5): 5-0 = 5; (4,0,1): 1-4 = -3; (0,2,2): 2-2 = 0 -> -2/3.
    Z = np.array([[[2, 1, 0], [0, 0, 5]], [[0, 3, 1], [4, 0, 1]], [[1, 1, 1], [0, 2, 2]]], np.float32)
    out = run({"aum": {}}, logits=Z, labels=np.array([0, 2]))
    np.testing.assert_allclose(out["aum"], [2 / 3, -2 / 3], atol=1e-6)
    np.testing.assert_allclose(S.aum(torch.tensor(Z), torch.tensor([0, 2])).numpy(), [2 / 3, -2 / 3], atol=1e-6)


def test_forgetting_by_hand():
    # correct sequences over T = 4 (label 0, C = 2; logit of class 0 is ±1):
    # s0: T F T F -> forgotten at t=0 and t=2 -> 2
    # s1: F T T T -> 0;  s2: F F F F -> never correct -> +inf;  s3: T T T F -> 1
    seq = ["TFTF", "FTTT", "FFFF", "TTTF"]
    Z = np.array([[[1.0, -1.0] if s[e] == "T" else [-1.0, 1.0] for s in seq] for e in range(4)],
                 np.float32)
    y = np.zeros(4, dtype=np.int64)
    np.testing.assert_array_equal(run({"forgetting": {}}, Z, y)["forgetting"], [2, 0, np.inf, 1])
    # trajectory 3: TFT -> 1, FTT -> 0, FFF -> inf, TTT -> 0
    np.testing.assert_array_equal(
        run({"forgetting": {"trajectory": 3}}, Z, y)["forgetting"], [1, 0, np.inf, 0]
    )


# Sample for tdds: C = 2, P(class 0) over T = 4 epochs = .5, .8, .8, .5.
#   d0 = KL((.8,.2) || (.5,.5)) = .8 ln(.8/.5) + .2 ln(.2/.5)
#   d1 = 0 (same distribution)
#   d2 = KL((.5,.5) || (.8,.2)) = .5 ln(.5/.8) + .5 ln(.5/.2)
# abs_kl takes |term| per class before the sum.
# Window K = 3: windows k = 0, 1 of K-1 = 2 terms: (d0, d1), (d1, d2).
# For two terms a, b: l2 = |a-b|/√2, std = sqrt(((a-b)/2)^2 * 2 / 2) = |a-b|/2.
# Weights beta (1-beta)^(T-K-k): k = 0 -> beta (1-beta), k = 1 -> beta.
TDDS_P = [0.5, 0.8, 0.8, 0.5]
Z_TDDS = logits_from_probs([[[p, 1 - p], [0.5, 0.5]] for p in TDDS_P])  # sample 1 is constant
Y_TDDS = np.array([0, 1])
KL_D0 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
KL_D2 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
ABS_D0 = abs(0.8 * math.log(0.8 / 0.5)) + abs(0.2 * math.log(0.2 / 0.5))
ABS_D2 = abs(0.5 * math.log(0.5 / 0.8)) + abs(0.5 * math.log(0.5 / 0.2))


@pytest.mark.parametrize(
    "divergence, spread, v0, v1",
    [
        ("kl", "l2", KL_D0 / SQ2, KL_D2 / SQ2),
        ("kl", "std", KL_D0 / 2, KL_D2 / 2),
        ("abs_kl", "l2", ABS_D0 / SQ2, ABS_D2 / SQ2),
        ("abs_kl", "std", ABS_D0 / 2, ABS_D2 / 2),
    ],
)
def test_tdds_by_hand(divergence, spread, v0, v1):
    beta = 0.5
    params = {"window": 3, "decay": beta, "divergence": divergence, "spread": spread}
    out = run({"tdds": params}, Z_TDDS, Y_TDDS)["tdds"]
    expected = v0 * beta * (1 - beta) + v1 * beta
    np.testing.assert_allclose(out, [expected, 0.0], atol=1e-6)
    # decay 1: only the last window counts (0 ** positive = 0, 0 ** 0 = 1).
    out = run({"tdds": {**params, "decay": 1.0}}, Z_TDDS, Y_TDDS)["tdds"]
    np.testing.assert_allclose(out, [v1, 0.0], atol=1e-6)


def test_tdds_three_term_window_by_hand():
    # K = 4 = T: one window of (d0, 0, d2), weight beta = .9.
    d = [KL_D0, 0.0, KL_D2]
    m = sum(d) / 3
    ss = sum((x - m) ** 2 for x in d)
    out = run({"tdds": {"window": 4, "decay": 0.9, "divergence": "kl"}}, Z_TDDS, Y_TDDS)["tdds"]
    np.testing.assert_allclose(out[0], 0.9 * math.sqrt(ss), atol=1e-6)
    out = run({"tsdd": {"window": 4, "decay": 0.9}}, Z_TDDS, Y_TDDS)["tsdd"]
    np.testing.assert_allclose(out[0], 0.9 * math.sqrt(ss / 3), atol=1e-6)


def test_rank01_by_hand():
    # ties take the average rank: (0.1, 0.3, 0.3) -> ranks 0, 1.5, 1.5 -> / 2
    np.testing.assert_allclose(S.rank01(np.array([0.1, 0.3, 0.3])), [0.0, 0.75, 0.75])
    np.testing.assert_allclose(S.rank01(np.array([3.0, 1.0, 2.0, np.inf])), [2 / 3, 0, 1 / 3, 1])
    np.testing.assert_array_equal(S.rank01(np.array([7.0])), [1.0])
    np.testing.assert_array_equal(S.rank01(np.array([2.0, 2.0])), [0.5, 0.5])
    with pytest.raises(ValueError, match="NaN"):
        S.rank01(np.array([1.0, np.nan]))


def test_td_dyun_finalize_by_hand():
    # wdu (0.1, 0.3, 0.3) -> ranks (0, .75, .75); tsdd (0.5, 0.2, 0.9) -> (.5, 0, 1)
    # alpha .5 -> (.25, .375, .875); alpha .2 -> .2 wdu + .8 tsdd = (.4, .15, .95)
    block = {"wdu": np.array([0.1, 0.3, 0.3], np.float32), "tsdd": np.array([0.5, 0.2, 0.9], np.float32)}
    for alpha, expected in ((0.5, [0.25, 0.375, 0.875]), (0.2, [0.4, 0.15, 0.95])):
        resolved = S.resolve_methods({"td_dyun": {"alpha": alpha}}, epochs=10, prune_rate=0.5)
        out = S.finalize(block, resolved, num_samples=3, seed=0)
        assert set(out) == {"td_dyun", "wdu", "tsdd"}
        np.testing.assert_allclose(out["td_dyun"], expected)


def test_td_dyun_end_to_end_combines_its_components():
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(8, 6, 3)).astype(np.float32)
    y = rng.integers(0, 3, 6)
    out = run({"td_dyun": {"alpha": 0.3, "trajectory": 6}}, Z, y)
    np.testing.assert_allclose(out["td_dyun"], 0.3 * S.rank01(out["wdu"]) + 0.7 * S.rank01(out["tsdd"]))


def test_random_is_seeded_and_blockwise_independent():
    Z = np.zeros((3, 5, 2), np.float32)
    y = np.zeros(5, np.int64)
    a = run({"random": {}}, Z, y, seed=3)["random"]
    b = run({"random": {}}, Z, y, seed=3)["random"]
    c = run({"random": {}}, Z, y, seed=4)["random"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.shape == (5,) and (a >= 0).all() and (a < 1).all()
    np.testing.assert_array_equal(run({"random": {"seed": 3}}, Z, y, seed=9)["random"], a)


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------
def _random_logits(seed, T=7, n=9, C=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(T, n, C)) * 2).astype(np.float32), rng.integers(0, C, n)


@pytest.mark.parametrize("window", [3, 5, 7, 10])
def test_tsdd_equals_tdds_kl_std(window):
    Z, y = _random_logits(0)
    out = run({"td_dyun": {"trajectory": 7, "tsdd": {"window": window, "decay": 0.7}},
               "tdds": {"trajectory": 7, "window": min(window, 7), "decay": 0.7,
                        "divergence": "kl", "spread": "std"}}, Z, y)
    np.testing.assert_allclose(out["tsdd"], out["tdds"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("window", [2, 3, 6])
def test_wdu_recency1_difficulty0_equals_dyun_include_last(window):
    Z, y = _random_logits(1)
    out = run({"td_dyun": {"trajectory": 6, "wdu": {"window": window, "recency": 1.0, "difficulty": 0.0}},
               "dyun": {"trajectory": 6, "window": window, "include_last": True}}, Z, y)
    np.testing.assert_allclose(out["wdu"], out["dyun"], rtol=1e-6, atol=1e-7)


def test_standalone_components_equal_td_dyun_components():
    Z, y = _random_logits(2)
    out = run({"td_dyun": {"trajectory": 5}, "wdu": {"trajectory": 5}, "tsdd": {"trajectory": 5}}, Z, y)
    ref = run({"td_dyun": {"trajectory": 5}}, Z, y)
    np.testing.assert_array_equal(out["wdu"], ref["wdu"])
    with pytest.raises(ScoreParamError, match=r"score\.methods\.wdu.*td_dyun"):
        S.resolve_methods({"td_dyun": {"trajectory": 5}, "wdu": {"trajectory": 4}}, epochs=7, prune_rate=0.5)


# ---------------------------------------------------------------------------------------------
# Trajectory auto
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "p, T",
    [(0.0, 100), (0.3, 90), (0.5, 70), (0.7, 60), (0.8, 20), (0.9, 10), (1.0, 10),
     # between the points, f is linear: p = .4 -> .40, p = .75 -> .20, p = .15 -> .475
     (0.4, 80), (0.75, 40), (0.15, 95)],
)
def test_auto_trajectory_table_points(p, T):
    # E = 200 (TDDS CIFAR-100: T = 90, 70, 60, 20, 10 at p = .3, .5, .7, .8, .9)
    assert S.auto_trajectory(200, p) == T


def test_auto_trajectory_rounding_and_floor():
    assert S.auto_trajectory(10, 0.3) == 5  # 10 * .45 = 4.5 -> half up -> 5
    assert S.auto_trajectory(10, 0.9) == 3  # 10 * .05 = .5 -> 1 -> max(3, 1)
    assert S.auto_trajectory(30, 0.5) == 11  # 30 * .35 = 10.5 exactly -> 11
    r = S.resolve_methods({"td_dyun": {}}, epochs=200, prune_rate=0.7)
    assert r["td_dyun"]["trajectory"] == 60
    assert S.epochs_needed(r) == 60
    with pytest.raises(ScoreParamError, match=r"T = 3.*E = 2"):
        S.resolve_methods({"td_dyun": {}}, epochs=2, prune_rate=0.5)


def test_resolve_defaults():
    r = S.resolve_methods({k: None for k in S.SCORES if k not in ("wdu", "tsdd")}, epochs=30,
                          prune_rate=0.5)
    assert r["dyun"] == {"trajectory": 30, "window": 10, "include_last": False}
    assert r["tdds"] == {"trajectory": 30, "window": 10, "decay": 0.9, "divergence": "abs_kl", "spread": "l2"}
    assert r["td_dyun"] == {"alpha": 0.5, "trajectory": 11,
                            "wdu": {"window": 10, "recency": 1.0, "difficulty": 1.0},
                            "tsdd": {"window": 10, "decay": 0.9}}
    assert r["el2n"] == {"trajectory": 10}
    assert r["random"] == {"seed": None}
    assert S.resolve_methods({"el2n": {}}, epochs=4, prune_rate=0.5)["el2n"] == {"trajectory": 4}
    assert S.epochs_needed(r) == 30
    assert S.epochs_needed(S.resolve_methods({"random": {}}, epochs=3, prune_rate=0.5)) == 1
    for name, spec in S.SCORES.items():
        assert spec.direction.startswith("higher = ")
        assert spec.outputs[0] == name
        assert spec.blockwise == (name != "random")


# ---------------------------------------------------------------------------------------------
# Ranges: each parameter outside its range is refused naming field, value and range
# ---------------------------------------------------------------------------------------------
BAD = [
    ({"dyun": {"window": 1}}, "score.methods.dyun.window = 1", ">= 2"),
    ({"dyun": {"window": 2.5}}, "score.methods.dyun.window = 2.5", ">= 2"),
    ({"dyun": {"window": 20}}, "score.methods.dyun.window = 20", "T = 20"),
    ({"dyun": {"trajectory": 12, "window": 12}}, "score.methods.dyun.window = 12", "T = 12"),
    ({"dyun": {"include_last": "yes"}}, "score.methods.dyun.include_last = 'yes'", "true or false"),
    ({"dyun": {"trajectory": 21}}, "score.methods.dyun.trajectory = 21", "E = 20"),
    ({"dyun": {"trajectory": 0}}, "score.methods.dyun.trajectory = 0", ">= 1"),
    ({"dyun": {"trajectory": "auto"}}, "score.methods.dyun.trajectory = 'auto'", "'all'"),
    ({"tdds": {"window": 2}}, "score.methods.tdds.window = 2", "3 <= window <= T = 20"),
    ({"tdds": {"trajectory": 5, "window": 6}}, "score.methods.tdds.window = 6", "3 <= window <= T = 5"),
    ({"tdds": {"decay": 0.0}}, "score.methods.tdds.decay = 0.0", "(0, 1]"),
    ({"tdds": {"decay": 1.5}}, "score.methods.tdds.decay = 1.5", "(0, 1]"),
    ({"tdds": {"divergence": "js"}}, "score.methods.tdds.divergence = 'js'", "abs_kl, kl"),
    ({"tdds": {"spread": "var"}}, "score.methods.tdds.spread = 'var'", "l2, std"),
    ({"tdds": {"trajectory": 30}}, "score.methods.tdds.trajectory = 30", "E = 20"),
    ({"td_dyun": {"alpha": 1.5}}, "score.methods.td_dyun.alpha = 1.5", "[0, 1]"),
    ({"td_dyun": {"alpha": -0.1}}, "score.methods.td_dyun.alpha = -0.1", "[0, 1]"),
    ({"td_dyun": {"trajectory": 2}}, "score.methods.td_dyun.trajectory = 2", ">= 3"),
    ({"td_dyun": {"trajectory": 25}}, "score.methods.td_dyun.trajectory = 25", "E = 20"),
    ({"td_dyun": {"trajectory": "some"}}, "score.methods.td_dyun.trajectory = 'some'", "'auto'"),
    ({"td_dyun": {"wdu": {"window": 1}}}, "score.methods.td_dyun.wdu.window = 1", ">= 2"),
    ({"td_dyun": {"wdu": {"recency": 0}}}, "score.methods.td_dyun.wdu.recency = 0", "(0, 1]"),
    ({"td_dyun": {"wdu": {"recency": 1.1}}}, "score.methods.td_dyun.wdu.recency = 1.1", "(0, 1]"),
    ({"td_dyun": {"wdu": {"difficulty": -1}}}, "score.methods.td_dyun.wdu.difficulty = -1", ">= 0"),
    ({"td_dyun": {"tsdd": {"window": 2}}}, "score.methods.td_dyun.tsdd.window = 2", ">= 3"),
    ({"td_dyun": {"tsdd": {"decay": 0}}}, "score.methods.td_dyun.tsdd.decay = 0", "(0, 1]"),
    ({"td_dyun": {"tsdd": {"decay": 2}}}, "score.methods.td_dyun.tsdd.decay = 2", "(0, 1]"),
    ({"wdu": {"trajectory": 1}}, "score.methods.wdu.trajectory = 1", ">= 2"),
    ({"tsdd": {"trajectory": 2}}, "score.methods.tsdd.trajectory = 2", ">= 3"),
    ({"el2n": {"trajectory": 21}}, "score.methods.el2n.trajectory = 21", "E = 20"),
    ({"forgetting": {"trajectory": -1}}, "score.methods.forgetting.trajectory = -1", ">= 1"),
    ({"aum": {"trajectory": 1.5}}, "score.methods.aum.trajectory = 1.5", ">= 1"),
    ({"variability": {"trajectory": 99}}, "score.methods.variability.trajectory = 99", "E = 20"),
    ({"confidence": {"trajectory": 0}}, "score.methods.confidence.trajectory = 0", ">= 1"),
    ({"entropy": {"trajectory": "x"}}, "score.methods.entropy.trajectory = 'x'", "'all'"),
    ({"loss": {"trajectory": 21}}, "score.methods.loss.trajectory = 21", "E = 20"),
    ({"random": {"seed": -1}}, "score.methods.random.seed = -1", ">= 0"),
    ({"dyun": {"widow": 3}}, "score.methods.dyun: unknown parameter 'widow'", "include_last, trajectory, window"),
    ({"td_dyun": {"wdu": {"lam": 3}}}, "score.methods.td_dyun.wdu: unknown parameter 'lam'",
     "difficulty, recency, window"),
    ({"bogus": {}}, "score.methods.bogus: unknown score 'bogus'", "td_dyun, wdu, tsdd, dyun, tdds"),
]


@pytest.mark.parametrize("methods, field_and_value, expected_range", BAD)
def test_out_of_range_parameters_are_refused(methods, field_and_value, expected_range):
    with pytest.raises(ScoreParamError) as info:
        S.resolve_methods(methods, epochs=20, prune_rate=0.5)
    message = str(info.value)
    assert field_and_value in message
    assert expected_range in message


def test_trajectory_over_epochs_names_both_numbers():
    with pytest.raises(ScoreParamError, match=r"T = 21.*E = 20"):
        S.resolve_methods({"aum": {"trajectory": 21}}, epochs=20, prune_rate=0.5)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_prune_rate_range(p):
    with pytest.raises(ScoreParamError, match=rf"score.prune_rate = {p}.*\[0, 1\)"):
        S.resolve_methods({"td_dyun": {}}, epochs=20, prune_rate=p)


def test_compute_block_needs_enough_epochs():
    r = S.resolve_methods({"dyun": {}}, epochs=20, prune_rate=0.5)
    with pytest.raises(ValueError, match="T = 20"):
        S.compute_block(np.zeros((5, 3, 2), np.float32), np.zeros(3, int), r)


# ---------------------------------------------------------------------------------------------
# Properties for every score
# ---------------------------------------------------------------------------------------------
ALL_METHODS = {
    "td_dyun": {"trajectory": 4, "wdu": {"window": 3, "recency": 0.8}, "tsdd": {"window": 3}},
    "dyun": {"window": 2},
    "tdds": {"window": 3},
    "el2n": {}, "forgetting": {}, "aum": {}, "variability": {}, "confidence": {},
    "entropy": {}, "loss": {}, "random": {},
}
ALL_OUTPUTS = {o for name in ALL_METHODS for o in S.SCORES[name].outputs}

# Logits are multiples of 1/4 in [-8, 8] and the shifts integers: every sum is exact in float32,
# so a shift cannot break an argmax tie by rounding.
logit_arrays = st.tuples(st.integers(4, 6), st.integers(1, 6), st.integers(2, 4)).flatmap(
    lambda s: hnp.arrays(np.float32, s, elements=st.integers(-32, 32).map(lambda v: v / 4.0))
)


@settings(max_examples=40, deadline=None)
@given(Z=logit_arrays, data=st.data())
def test_properties_every_score(Z, data):
    T, n, C = Z.shape
    y = np.array(data.draw(st.lists(st.integers(0, C - 1), min_size=n, max_size=n)))
    out = run(ALL_METHODS, Z, y)
    assert set(out) == ALL_OUTPUTS
    for key, v in out.items():
        assert v.shape == (n,), key
        if key == "forgetting":
            assert not np.isnan(v).any() and np.isfinite(v[np.isfinite(v)]).all()
            assert (v[~np.isfinite(v)] == np.inf).all()
        else:
            assert np.isfinite(v).all(), key
    # Permuting the samples moves the scores with them ('random' is seeded by position, not by
    # content, so it stays with the position).
    perm = np.array(data.draw(st.permutations(range(n))))
    out_p = run(ALL_METHODS, Z[:, perm], y[perm])
    for key in ALL_OUTPUTS - {"random", "td_dyun"}:
        np.testing.assert_allclose(out_p[key], out[key][perm], rtol=1e-5, atol=1e-6, err_msg=key)
    if all(np.array_equal(out_p[k], out[k][perm]) for k in ("wdu", "tsdd")):
        np.testing.assert_allclose(out_p["td_dyun"], out["td_dyun"][perm], atol=1e-12)
    # A constant added to all logits of a sample (per epoch) leaves every score unchanged
    # (P is shift-invariant; so are the margin and the argmax).
    shift = np.array(data.draw(st.lists(st.integers(-50, 50), min_size=T * n, max_size=T * n)),
                     np.float32).reshape(T, n, 1)
    out_s = run(ALL_METHODS, Z + shift, y)
    for key in ALL_OUTPUTS:
        np.testing.assert_allclose(out_s[key], out[key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_half_precision_input_is_computed_in_float32():
    Z, y = _random_logits(3, T=6, n=5, C=3)
    Z16 = Z.astype(np.float16)
    a = run({"tdds": {"window": 4}, "loss": {}}, Z16, y)
    b = run({"tdds": {"window": 4}, "loss": {}}, Z16.astype(np.float32), y)
    for k in a:
        assert a[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])


def test_torch_input_and_pure_functions_agree():
    Z, y = _random_logits(4, T=6, n=5, C=3)
    out = run({"dyun": {"window": 3}, "el2n": {}}, torch.from_numpy(Z), torch.from_numpy(y))
    P = torch.softmax(torch.from_numpy(Z), -1)
    g = P.gather(-1, torch.from_numpy(y)[None, :, None].expand(6, -1, 1)).squeeze(-1)
    np.testing.assert_allclose(out["dyun"], S.dyun(g, window=3).numpy(), rtol=1e-6)
    np.testing.assert_allclose(out["el2n"], S.el2n(P, torch.from_numpy(y)).numpy(), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Blocked == whole (pure layer)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cuts", [[5], [1, 2], [3, 6, 9], list(range(1, 11))])
def test_blocked_equals_whole(cuts):
    Z, y = _random_logits(5, T=8, n=11, C=3)
    methods = dict(ALL_METHODS, td_dyun={"trajectory": 6})
    whole = S.score_arrays(Z, y, methods, prune_rate=0.3, seed=7)
    resolved = S.resolve_methods(methods, epochs=8, prune_rate=0.3)
    parts = [S.compute_block(Z[:, a:b], y[a:b], resolved)
             for a, b in zip([0] + cuts, cuts + [11])]
    blocked = S.finalize({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, resolved,
                         num_samples=11, seed=7)
    assert set(blocked) == set(whole)
    for k in whole:
        np.testing.assert_allclose(blocked[k], whole[k], rtol=1e-6, atol=1e-7, err_msg=k)
