"""Per-sample scores from the training dynamics: pure functions, one per score, and a registry.

The contract is docs/scores.md; every formula there is implemented here as written. Notation:
T epochs (the trajectory, epochs ``0..T-1``), n samples of a block (N over the whole data set),
C classes. ``P = softmax(Z)``, ``g = P[..., y]`` (gold-class probability),
``correct = argmax(Z) == y``.

Convention: **higher = more worth keeping**. A score whose natural reading is the other way
(``aum``, ``confidence``) is negated inside its function, and its docstring says so.

The math is written in torch so that the same code runs on CPU or on a CUDA device. All
arithmetic is in float32 (float16/bfloat16 inputs are upcast first; float64 inputs of the pure
functions stay float64). ``compute_block`` always works in float32.

Layers:

- pure functions on tensors: ``dyun``, ``wdu``, ``tdds``, ``tsdd``, ``el2n``, ``forgetting``,
  ``aum``, ``variability``, ``confidence``, ``entropy``, ``loss``, ``random_score``, and
  ``td_dyun_combine`` / ``rank01`` on numpy (the rank needs all N samples);
- ``SCORES``: the registry, name -> ``ScoreSpec``;
- ``resolve_methods`` (defaults, trajectory ``all``/``auto``, ranges), ``compute_block`` (every
  block-local output of a block of samples, with softmax etc. computed once), ``finalize``
  (the global outputs: ``td_dyun``'s ranks and ``random``), and ``score_arrays`` (all three in
  memory).

Deviations and choices beyond the text of scores.md (also stated where they are implemented):

- ``wdu`` and ``tsdd`` are also registered as methods of their own (default trajectory ``all``)
  so that a user can select by either component; when requested next to ``td_dyun`` they must
  resolve to the same parameters as ``td_dyun``'s components (they write the same output).
- ``el2n``'s default trajectory 10 is clamped to E; an explicit trajectory > E is an error, as for
  every other score.
- ``auto``'s ``round`` is round-half-up on the exact decimal values (Python's ``round`` would
  send 4.5 to 4).
- ``random`` takes an optional ``seed`` parameter; left out (null), it uses the seed given to
  ``finalize`` (``score.seed``).
- Values below float32's normal range are not resolved in ``compute_block``: subnormals are
  flushed to zero while it scores (``subnormals_flushed``), and the native kernel takes the
  probability of a class 80 or more below the top logit as exp(-80)/s. Scores move by less
  than 1e-28; both keep confident logits off slow paths (4x and 11x slower before).
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from . import native

__all__ = [
    "EPS",
    "ScoreParamError",
    "ScoreSpec",
    "SCORES",
    "resolve_methods",
    "epochs_needed",
    "compute_block",
    "finalize",
    "score_arrays",
    "rank01",
    "auto_trajectory",
    "BlockTensors",
    "dyun",
    "wdu",
    "divergence_series",
    "tdds",
    "tsdd",
    "td_dyun_combine",
    "el2n",
    "forgetting",
    "aum",
    "variability",
    "confidence",
    "entropy",
    "loss",
    "random_score",
]

EPS = 1e-8  # the epsilon of tdds's log(P + eps) and of loss's -log(g + eps)

DIVERGENCES = ("abs_kl", "kl")
SPREADS = ("l2", "std")


class ScoreParamError(ValueError):
    """A score parameter is invalid; the message names the field path, the value and the range."""


def _error(path: str, value: Any, expected: str) -> ScoreParamError:
    return ScoreParamError(f"{path} = {value!r}: expected {expected}")


# ---------------------------------------------------------------------------------------------
# Pure score functions (torch tensors in, (n,) tensor out)
# ---------------------------------------------------------------------------------------------
def _wide(x: torch.Tensor) -> torch.Tensor:
    """Never compute in half precision: upcast float16/bfloat16 to float32."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def _window_moments(x: torch.Tensor, J: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the windows ``x[k:k+J]``, k = 0..W-1, of x (T, n): the sum of squared deviations
    from the window's mean, and that mean; two (W, n) tensors. Two passes (mean, then the
    squared deviations), each a sum of J shifted (W, n) slices of x: no (W, n, J) temporary,
    whose fresh pages cost more than the arithmetic (an unfolded view's strided reduction
    measured 2-3x slower inside a block task). Agrees with ``Tensor.std`` to float32 rounding."""
    mean = x[0:W].clone()
    for j in range(1, J):
        mean += x[j:j + W]
    mean /= J
    ss, dev = torch.zeros_like(mean), torch.empty_like(mean)
    for j in range(J):
        torch.sub(x[j:j + W], mean, out=dev)
        ss.addcmul_(dev, dev)
    return ss, mean


def _window_std_mean(g: torch.Tensor, J: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample std (ddof=1) and mean of g (T, n) over the windows ``k..k+J-1``, k = 0..W-1:
    two (W, n) tensors."""
    ss, m = _window_moments(g, J, W)
    return ss.div_(J - 1).sqrt_(), m


def dyun(gold_prob: torch.Tensor, *, window: int, include_last: bool = False) -> torch.Tensor:
    """Dynamic Uncertainty (He et al.). ``gold_prob`` g: (T, n) -> (n,), higher = keep (uncertain).

    Windows ``k = 0..W-1`` cover epochs ``k..k+J-1`` (J = ``window`` >= 2);
    ``W = T - J`` (official code: no window ends at the last epoch) or ``T - J + 1`` when
    ``include_last``. ``dyun = mean_k std(g[window k], ddof=1)``. Not multiplied by 10.
    """
    g = _wide(gold_prob)
    T = g.shape[0]
    if window < 2:
        raise _error("dyun.window", window, "an integer >= 2")
    W = T - window + (1 if include_last else 0)
    if W < 1:
        raise ScoreParamError(
            f"dyun.window = {window}: W = {W} < 1 windows for trajectory T = {T} and window "
            f"J = {window} (include_last = {include_last})"
        )
    U, _ = _window_std_mean(g, window, W)  # (W, n)
    return U.mean(dim=0)  # (n,)


def wdu(
    gold_prob: torch.Tensor, *, window: int, recency: float = 1.0, difficulty: float = 1.0
) -> torch.Tensor:
    """Weighted dynamic uncertainty (TD-DyUn's first component). g: (T, n) -> (n,), higher = keep.

    ``J = min(window, T)``, ``W = T - J + 1`` windows (every full window), ``U_k = std(ddof=1)``
    and ``m_k = mean`` of g in window k, ``w_k = recency^(W-1-k)``;
    ``wdu = sum_k w_k U_k (1 - m_k)^difficulty / sum_k w_k``. Needs T >= 2.
    With recency 1 and difficulty 0 it equals ``dyun(include_last=True)``.
    """
    g = _wide(gold_prob)
    T = g.shape[0]
    if T < 2:
        raise _error("wdu.trajectory", T, "T >= 2 epochs")
    J = min(window, T)
    if J < 2:
        raise _error("wdu.window", window, "an integer >= 2")
    W = T - J + 1
    U, m = _window_std_mean(g, J, W)  # (W, n) each
    exponents = torch.arange(W - 1, -1, -1, dtype=torch.float64)  # W-1-k
    omega = (float(recency) ** exponents).to(device=g.device, dtype=g.dtype)  # (W,)
    hard = (1.0 - m).clamp_min(0.0) ** float(difficulty)  # (W, n); 0**0 = 1
    return (omega[:, None] * U * hard).sum(dim=0) / omega.sum()


def _log_plus(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``log(x + eps)`` as a new tensor. On the CPU through numpy's ufuncs, whose vectorised
    float32 log is about 2.5x faster than torch's here (0.64 against 1.67 ns an element, E=50,
    C=100 slices; bench/score_throughput.py); elsewhere (CUDA) in torch."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        out = np.add(x.detach().numpy(), np.float32(eps))
        return torch.from_numpy(np.log(out, out=out))
    return (x + eps).log_()


def _divergence_terms(prob: torch.Tensor, eps: float) -> torch.Tensor:
    """``P[t+1] * (log(P[t+1]+eps) - log(P[t]+eps))``: P (T, n, C) -> a new (T-1, n, C) tensor.

    Two temporaries of the input's size, the rest in place: log(P+eps) once, its epoch-to-epoch
    difference, then multiplied by P[t+1] in place (bit-identical to the out-of-place formula).
    """
    logp = _log_plus(prob, eps)  # (T, n, C): log(P + eps)
    term = logp[1:] - logp[:-1]  # (T-1, n, C)
    del logp
    return term.mul_(prob[1:])


def _divergence_sums(term: torch.Tensor, kinds) -> dict[str, torch.Tensor]:
    """The depth-one series of every divergence in ``kinds`` from one ``_divergence_terms``:
    ``kl`` sums the terms over C, ``abs_kl`` their absolute values (taken in place, after ``kl``)."""
    out = {}
    if "kl" in kinds:
        out["kl"] = term.sum(dim=-1)
    if "abs_kl" in kinds:
        out["abs_kl"] = term.abs_().sum(dim=-1)
    return out


def divergence_series(prob: torch.Tensor, *, divergence: str = "abs_kl", eps: float = EPS) -> torch.Tensor:
    """Depth one of TDDS: P (T, n, C) -> d (T-1, n), the divergence of epoch t+1 from epoch t.

    ``kl``: ``sum_c P[t+1] (log(P[t+1]+eps) - log(P[t]+eps))``; ``abs_kl`` (official TDDS code)
    takes the absolute value of each term before the sum.
    """
    if divergence not in DIVERGENCES:
        raise _error("tdds.divergence", divergence, f"one of {', '.join(DIVERGENCES)}")
    return _divergence_sums(_divergence_terms(_wide(prob), eps), (divergence,))[divergence]


def tdds(
    prob: torch.Tensor,
    *,
    window: int = 10,
    decay: float = 0.9,
    divergence: str = "abs_kl",
    spread: str = "l2",
    eps: float = EPS,
) -> torch.Tensor:
    """Temporal Dual-Depth Scoring (Zhang et al.). P: (T, n, C) -> (n,), higher = keep (unstable).

    d = ``divergence_series`` (T-1, n). Windows ``k = 0..T-K`` hold the K-1 terms
    ``d[k..k+K-2]`` with mean m: ``l2``: ``V_k = sqrt(sum (d-m)^2)``; ``std``:
    ``V_k = sqrt(sum (d-m)^2 / (K-1))``. ``tdds = sum_k V_k * decay * (1-decay)^(T-K-k)``
    (the last window weighs ``decay``). Requires ``3 <= window <= T`` and ``0 < decay <= 1``.
    """
    p = _wide(prob)
    _check_tdds(p.shape[0], window, decay, spread)  # before the (T, n, C) work
    return _depth_two(divergence_series(p, divergence=divergence, eps=eps), window=window, decay=decay,
                      spread=spread)


def _check_tdds(T: int, K: int, decay: float, spread: str) -> None:
    if K < 3 or K > T:
        raise ScoreParamError(
            f"tdds.window = {K}: expected an integer with 3 <= window <= T = {T} (trajectory)"
        )
    if not 0.0 < decay <= 1.0:
        raise _error("tdds.decay", decay, "a number in (0, 1]")
    if spread not in SPREADS:
        raise _error("tdds.spread", spread, f"one of {', '.join(SPREADS)}")


def _depth_two(d: torch.Tensor, *, window: int, decay: float, spread: str) -> torch.Tensor:
    """TDDS's depth two and EMA: the depth-one series d (T-1, n) -> (n,) (see ``tdds``)."""
    T = d.shape[0] + 1
    K = window
    _check_tdds(T, K, decay, spread)
    ss, _ = _window_moments(d, K - 1, T - K + 1)  # (T-K+1, n): windows of K-1 divergences
    if spread == "std":
        ss /= K - 1
    V = ss.sqrt_()
    k = torch.arange(T - K + 1, dtype=torch.float64)
    weights = decay * (1.0 - decay) ** (T - K - k)  # (T-K+1,); 0**0 = 1 when decay = 1
    return (V * weights.to(device=V.device, dtype=V.dtype)[:, None]).sum(dim=0)


def tsdd(prob: torch.Tensor, *, window: int = 10, decay: float = 0.9, eps: float = EPS) -> torch.Tensor:
    """Temporally smoothed dual-depth instability (TD-DyUn's second component). P: (T, n, C) -> (n,).

    Exactly ``tdds(divergence="kl", spread="std")`` with the window clamped to ``min(window, T)``.
    Needs T >= 3 and window >= 3. Higher = keep.
    """
    T = prob.shape[0]
    if T < 3:
        raise _error("tsdd.trajectory", T, "T >= 3 epochs")
    return tdds(prob, window=min(window, T), decay=decay, divergence="kl", spread="std", eps=eps)


def el2n(prob: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N: mean over epochs of ``||P[e,n] - onehot(y[n])||_2``. P (T, n, C), y (n,) -> (n,).

    Higher = keep (large error = hard).
    """
    p = _wide(prob)
    onehot = torch.nn.functional.one_hot(labels.long(), p.shape[-1]).to(p.dtype)  # (n, C)
    return torch.linalg.vector_norm(p - onehot[None], dim=-1).mean(dim=0)


def _el2n_in_place(prob: torch.Tensor, labels: torch.Tensor, gold_prob: torch.Tensor) -> torch.Tensor:
    """``el2n`` without the (T, n, C) difference: the gold entries of ``prob`` (T, n, C) are set
    to ``g - 1`` in place (the other entries of P - onehot are P itself), the norm taken, and
    ``g`` written back. ``gold_prob`` must be ``prob``'s own gold entries; the norm sees the same
    values as ``el2n``'s, so the result is the same."""
    idx = labels[None, :, None].expand(prob.shape[0], -1, 1)  # (T, n, 1)
    gold = gold_prob[..., None]
    prob.scatter_(-1, idx, gold - 1.0)
    try:
        return torch.linalg.vector_norm(prob, dim=-1).mean(dim=0)
    finally:
        prob.scatter_(-1, idx, gold)  # P restored exactly


def forgetting(correct: torch.Tensor) -> torch.Tensor:
    """Forgetting events: number of t in 0..T-2 with correct[t] and not correct[t+1].

    correct: (T, n) bool -> (n,) float32; a sample never correct in 0..T-1 gets +inf (the only
    non-finite score). Higher = keep (forgotten often, or never learned).
    """
    c = correct.bool()
    events = (c[:-1] & ~c[1:]).sum(dim=0).to(torch.float32)  # (n,)
    never = ~c.any(dim=0)
    return torch.where(never, torch.full_like(events, math.inf), events)


def _margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Z[e,n,y] - max_{c != y} Z[e,n,c]: (T, n, C), (n,) -> (T, n)."""
    z = _wide(logits)
    idx = labels.long()[None, :, None].expand(z.shape[0], -1, 1)  # (T, n, 1)
    gold = z.gather(-1, idx).squeeze(-1)  # (T, n)
    other = z.scatter(-1, idx, -math.inf).amax(dim=-1)  # (T, n)
    return gold - other


def aum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Area under the margin, **negated**: ``-(1/T) sum_e (Z[e,n,y] - max_{c!=y} Z[e,n,c])``.

    logits (T, n, C), labels (n,) -> (n,). Higher = keep (low margin = hard). Needs C >= 2.
    """
    return -_margin(logits, labels).mean(dim=0)


def _aum_from_margin(margin: torch.Tensor) -> torch.Tensor:
    return -margin.mean(dim=0)


def variability(gold_prob: torch.Tensor) -> torch.Tensor:
    """Dataset Cartography variability: ``std(g[0..T-1], ddof=0)``. g (T, n) -> (n,), higher = keep.

    Two passes (mean, then squared deviations) over contiguous rows: ``Tensor.std(dim=0)``
    measured 15x slower on (50, 5242) and agrees to float32 rounding."""
    g = _wide(gold_prob)
    dev = g - g.mean(dim=0)
    return dev.mul_(dev).mean(dim=0).sqrt_()


def confidence(gold_prob: torch.Tensor) -> torch.Tensor:
    """Mean gold probability, **negated**: ``-(1/T) sum_e g``. g (T, n) -> (n,).

    Higher = keep (low confidence = hard).
    """
    return -_wide(gold_prob).mean(dim=0)


def entropy(prob: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Mean predictive entropy ``(1/T) sum_e H(P[e,n])``. P, log P (T, n, C) -> (n,), higher = keep."""
    p, lp = _wide(prob), _wide(log_prob)
    plogp = p * lp
    total = plogp.sum(dim=-1)  # (T, n)
    if not bool(torch.isfinite(total).all()):
        # 0 log 0 = 0: only a -inf logit gives P = 0 with log P = -inf (0 * -inf = NaN), so the
        # masked sum (several times slower) runs only then; elsewhere P = 0 has a finite log P
        # and adds 0, exactly as the mask would
        total = torch.where(p > 0, plogp, torch.zeros_like(p)).sum(dim=-1)
    return -total.mean(dim=0)


def loss(gold_prob: torch.Tensor, *, eps: float = EPS) -> torch.Tensor:
    """Mean cross-entropy ``(1/T) sum_e -log(g + eps)``. g (T, n) -> (n,), higher = keep (hard)."""
    return -torch.log(_wide(gold_prob) + eps).mean(dim=0)


def random_score(num_samples: int, *, seed: int) -> np.ndarray:
    """Uniform [0, 1) per sample from ``numpy.random.default_rng(seed)``: (N,) float64.

    Drawn over all N at once in dataset order, so same seed -> same scores whatever the blocks.
    Carries no information (the baseline); its 'direction' is arbitrary.
    """
    return np.random.default_rng(seed).random(num_samples)


def rank01(x: np.ndarray) -> np.ndarray:
    """Rank mapped to [0, 1]: average rank of ties (0-based), divided by N-1; N == 1 gives 1.

    x (N,) -> (N,) float64. +inf values rank highest (and tie with each other); NaN is refused.
    """
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"rank01: expected a 1-d array, found shape {x.shape}")
    n = x.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    if np.isnan(x).any():
        raise ValueError("rank01: the scores contain NaN")
    if n == 1:
        return np.ones(1, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    cuts = np.flatnonzero(xs[1:] != xs[:-1]) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [n]))  # exclusive
    average = (starts + ends - 1) / 2.0  # 0-based average rank of each tie group
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks / (n - 1)


def td_dyun_combine(wdu_scores: np.ndarray, tsdd_scores: np.ndarray, *, alpha: float) -> np.ndarray:
    """``td_dyun = alpha * rank01(wdu) + (1-alpha) * rank01(tsdd)``: (N,), (N,) -> (N,) in [0, 1].

    Higher = keep. Needs all N samples (ranks are global).
    """
    return alpha * rank01(wdu_scores) + (1.0 - alpha) * rank01(tsdd_scores)


# ---------------------------------------------------------------------------------------------
# Trajectory auto
# ---------------------------------------------------------------------------------------------
_AUTO_TABLE = [(Fraction(p), Fraction(f)) for p, f in (
    ("0", "0.5"), ("0.3", "0.45"), ("0.5", "0.35"), ("0.7", "0.30"), ("0.8", "0.10"),
    ("0.9", "0.05"), ("1", "0.05"),
)]


def auto_trajectory(epochs: int, prune_rate: float) -> int:
    """``T = max(3, round(E * f(p)))``, f linear between the table points of scores.md.

    Exact rational arithmetic on the decimal value of p (``repr``), rounding half up, so that
    e.g. E = 200, p = 0.3 gives exactly 90. May exceed E when E < 3 (then resolve refuses it).
    """
    if not 0.0 <= prune_rate <= 1.0:
        raise _error("score.prune_rate", prune_rate, "a number in [0, 1]")
    p = Fraction(repr(float(prune_rate)))
    for (p0, f0), (p1, f1) in zip(_AUTO_TABLE[:-1], _AUTO_TABLE[1:]):
        if p0 <= p <= p1:
            f = f0 + (f1 - f0) * (p - p0) / (p1 - p0)
            break
    else:  # pragma: no cover - p is in [0, 1]
        raise AssertionError(p)
    return max(3, math.floor(epochs * f + Fraction(1, 2)))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScoreSpec:
    name: str
    defaults: dict  # the scores.md defaults, as written in a params file
    direction: str  # one line: 'higher = ...'
    outputs: tuple[str, ...]  # the arrays this method writes
    blockwise: bool  # False: computed in finalize over all N (random)


_TRAJ_ONLY = {"trajectory": "all"}

SCORES: dict[str, ScoreSpec] = {
    "td_dyun": ScoreSpec(
        "td_dyun",
        {"alpha": 0.5, "trajectory": "auto",
         "wdu": {"window": 10, "recency": 1.0, "difficulty": 1.0},
         "tsdd": {"window": 10, "decay": 0.9}},
        "higher = more uncertain (wdu) and more unstable (tsdd), by rank in [0, 1]",
        ("td_dyun", "wdu", "tsdd"),
        True,
    ),
    "wdu": ScoreSpec(
        "wdu", {"trajectory": "all", "window": 10, "recency": 1.0, "difficulty": 1.0},
        "higher = more uncertain gold probability in (recent) windows, weighted by difficulty",
        ("wdu",), True,
    ),
    "tsdd": ScoreSpec(
        "tsdd", {"trajectory": "all", "window": 10, "decay": 0.9},
        "higher = more variable epoch-to-epoch KL divergence (EMA over windows)",
        ("tsdd",), True,
    ),
    "dyun": ScoreSpec(
        "dyun", {"trajectory": "all", "window": 10, "include_last": False},
        "higher = more uncertain gold probability over sliding windows",
        ("dyun",), True,
    ),
    "tdds": ScoreSpec(
        "tdds", {"trajectory": "all", "window": 10, "decay": 0.9, "divergence": "abs_kl", "spread": "l2"},
        "higher = more variable epoch-to-epoch divergence (EMA over windows)",
        ("tdds",), True,
    ),
    "el2n": ScoreSpec("el2n", {"trajectory": 10}, "higher = larger error norm ||P - onehot||",
                      ("el2n",), True),
    "forgetting": ScoreSpec("forgetting", dict(_TRAJ_ONLY),
                            "higher = forgotten more often (+inf = never learned)", ("forgetting",), True),
    "aum": ScoreSpec("aum", dict(_TRAJ_ONLY), "higher = smaller area under the margin (negated AUM)",
                     ("aum",), True),
    "variability": ScoreSpec("variability", dict(_TRAJ_ONLY), "higher = more variable gold probability",
                             ("variability",), True),
    "confidence": ScoreSpec("confidence", dict(_TRAJ_ONLY),
                            "higher = lower mean gold probability (negated confidence)", ("confidence",), True),
    "entropy": ScoreSpec("entropy", dict(_TRAJ_ONLY), "higher = higher mean predictive entropy",
                         ("entropy",), True),
    "loss": ScoreSpec("loss", dict(_TRAJ_ONLY), "higher = higher mean cross-entropy loss", ("loss",), True),
    "random": ScoreSpec("random", {"seed": None}, "higher = nothing (uniform [0, 1) baseline)",
                        ("random",), False),
}


def _spec(name: str) -> ScoreSpec:
    if name not in SCORES:
        raise ScoreParamError(
            f"score.methods.{name}: unknown score {name!r}; valid scores: {', '.join(SCORES)}"
        )
    return SCORES[name]


# ---------------------------------------------------------------------------------------------
# Parameter resolution and validation
# ---------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _check_int(path: str, v: Any, lo: int) -> int:
    if not _is_int(v) or v < lo:
        raise _error(path, v, f"an integer >= {lo}")
    return int(v)


def _check_num(path: str, v: Any, ok, expected: str) -> float:
    if not _is_num(v) or not math.isfinite(float(v)) or not ok(float(v)):
        raise _error(path, v, expected)
    return float(v)


def _check_bool(path: str, v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise _error(path, v, "true or false")
    return bool(v)


def _check_choice(path: str, v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise _error(path, v, f"one of {', '.join(choices)}")
    return v


def _merge(path: str, given: Any, defaults: dict) -> dict:
    """Defaults overlaid with the given parameters; unknown names refused, listing valid ones."""
    if given is None:
        given = {}
    if not isinstance(given, Mapping):
        raise _error(path, given, "a mapping of parameters (or {})")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        key = unknown[0]
        raise ScoreParamError(
            f"{path}: unknown parameter {key!r} (value {given[key]!r}); valid parameters: "
            f"{', '.join(sorted(defaults))}"
        )
    merged = copy.deepcopy(defaults)
    merged.update(copy.deepcopy(dict(given)))
    return merged


def _trajectory(path: str, v: Any, *, epochs: int, prune_rate: float, allow_auto: bool,
                clamp_default: int | None = None, minimum: int = 1) -> int:
    """Resolve a trajectory value to an integer T with minimum <= T <= E."""
    valid = f"an integer >= {minimum}, 'all'" + (" or 'auto'" if allow_auto else "")
    if v == "all" and isinstance(v, str):
        T = epochs
    elif v == "auto" and isinstance(v, str):
        if not allow_auto:
            raise _error(path, v, valid + " ('auto' is for td_dyun only)")
        T = auto_trajectory(epochs, prune_rate)
    elif _is_int(v):
        T = int(v)
        if clamp_default is not None:
            T = min(T, epochs)
    else:
        raise _error(path, v, valid)
    if T > epochs:
        raise ScoreParamError(
            f"{path} = {v!r}: T = {T} is more than the E = {epochs} recorded epochs; "
            f"expected T <= E = {epochs}"
        )
    if T < minimum:
        shown = f"{v!r} (T = {T})" if isinstance(v, str) else repr(v)
        raise ScoreParamError(f"{path} = {shown}: expected T >= {minimum} epochs (E = {epochs})")
    return T


def _resolve_wdu_params(path: str, p: dict, T: int) -> dict:
    window = _check_int(f"{path}.window", p["window"], 2)
    recency = _check_num(f"{path}.recency", p["recency"], lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")
    difficulty = _check_num(f"{path}.difficulty", p["difficulty"], lambda x: x >= 0.0, "a number >= 0")
    return {"window": window, "recency": recency, "difficulty": difficulty}


def _resolve_tsdd_params(path: str, p: dict, T: int) -> dict:
    window = _check_int(f"{path}.window", p["window"], 3)
    decay = _check_num(f"{path}.decay", p["decay"], lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")
    return {"window": window, "decay": decay}


def _resolve_one(name: str, given: Any, *, epochs: int, prune_rate: float) -> dict:
    spec = _spec(name)
    path = f"score.methods.{name}"
    p = _merge(path, given, spec.defaults)
    tpath = f"{path}.trajectory"
    if name == "random":
        seed = p["seed"]
        if seed is not None and (not _is_int(seed) or seed < 0):
            raise _error(f"{path}.seed", seed, "an integer >= 0 or null (= score.seed)")
        return {"seed": None if seed is None else int(seed)}
    if name == "td_dyun":
        alpha = _check_num(f"{path}.alpha", p["alpha"], lambda x: 0.0 <= x <= 1.0, "a number in [0, 1]")
        T = _trajectory(tpath, p["trajectory"], epochs=epochs, prune_rate=prune_rate,
                        allow_auto=True, minimum=3)
        w = _merge(f"{path}.wdu", given.get("wdu") if isinstance(given, Mapping) else None,
                   spec.defaults["wdu"])
        s = _merge(f"{path}.tsdd", given.get("tsdd") if isinstance(given, Mapping) else None,
                   spec.defaults["tsdd"])
        return {"alpha": alpha, "trajectory": T,
                "wdu": _resolve_wdu_params(f"{path}.wdu", w, T),
                "tsdd": _resolve_tsdd_params(f"{path}.tsdd", s, T)}
    if name == "wdu":
        T = _trajectory(tpath, p["trajectory"], epochs=epochs, prune_rate=prune_rate,
                        allow_auto=False, minimum=2)
        return {"trajectory": T, **_resolve_wdu_params(path, p, T)}
    if name == "tsdd":
        T = _trajectory(tpath, p["trajectory"], epochs=epochs, prune_rate=prune_rate,
                        allow_auto=False, minimum=3)
        return {"trajectory": T, **_resolve_tsdd_params(path, p, T)}
    if name == "dyun":
        T = _trajectory(tpath, p["trajectory"], epochs=epochs, prune_rate=prune_rate, allow_auto=False)
        J = _check_int(f"{path}.window", p["window"], 2)
        include_last = _check_bool(f"{path}.include_last", p["include_last"])
        W = T - J + (1 if include_last else 0)
        if W < 1:
            formula = "T - J + 1" if include_last else "T - J"
            raise ScoreParamError(
                f"{path}.window = {J}: W = {formula} = {W} < 1 windows with trajectory T = {T} "
                f"and window J = {J}; expected window <= {T - 1 + (1 if include_last else 0)} "
                f"(and >= 2), or a longer trajectory"
            )
        return {"trajectory": T, "window": J, "include_last": include_last}
    if name == "tdds":
        T = _trajectory(tpath, p["trajectory"], epochs=epochs, prune_rate=prune_rate, allow_auto=False)
        K = p["window"]
        if not _is_int(K) or not 3 <= K <= T:
            raise ScoreParamError(
                f"{path}.window = {K!r}: expected an integer with 3 <= window <= T = {T} "
                f"(trajectory); window 2 makes every score zero"
            )
        decay = _check_num(f"{path}.decay", p["decay"], lambda x: 0.0 < x <= 1.0, "a number in (0, 1]")
        divergence = _check_choice(f"{path}.divergence", p["divergence"], DIVERGENCES)
        spread = _check_choice(f"{path}.spread", p["spread"], SPREADS)
        return {"trajectory": T, "window": int(K), "decay": decay, "divergence": divergence,
                "spread": spread}
    # single-trajectory baselines
    clamp = 10 if (name == "el2n" and "trajectory" not in (given or {})) else None
    T = _trajectory(tpath, p["trajectory"], epochs=epochs, prune_rate=prune_rate,
                    allow_auto=False, clamp_default=clamp)
    return {"trajectory": T}


def resolve_methods(methods: Mapping[str, Mapping | None], *, epochs: int, prune_rate: float) -> dict[str, dict]:
    """Fill the scores.md defaults, resolve trajectories and validate every parameter.

    ``methods``: score name -> parameters (None or {} for the defaults), as in
    ``score.methods``. ``epochs`` E: the recorded (complete) epochs; ``prune_rate`` p in [0, 1)
    (used by ``trajectory: auto``). Trajectory ``all`` -> E, ``auto`` ->
    ``max(3, round(E * f(p)))``; every trajectory becomes an integer <= E. Returns name ->
    resolved parameters (td_dyun nested: ``{alpha, trajectory, wdu: {window, recency,
    difficulty}, tsdd: {window, decay}}``). Errors (``ScoreParamError``) name the field path
    ``score.methods.<name>...``, the value and the range.
    """
    if not _is_int(epochs) or epochs < 1:
        raise _error("epochs", epochs, "an integer >= 1 (recorded epochs)")
    if not _is_num(prune_rate) or not 0.0 <= float(prune_rate) < 1.0:
        raise _error("score.prune_rate", prune_rate, "a number in [0, 1)")
    if not isinstance(methods, Mapping) or not methods:
        raise _error("score.methods", methods, "a mapping with at least one score")
    resolved = {
        str(name): _resolve_one(str(name), given, epochs=int(epochs), prune_rate=float(prune_rate))
        for name, given in methods.items()
    }
    # td_dyun's components and the stand-alone wdu / tsdd write the same output arrays.
    if "td_dyun" in resolved:
        td = resolved["td_dyun"]
        for comp in ("wdu", "tsdd"):
            if comp in resolved:
                mine = {"trajectory": td["trajectory"], **td[comp]}
                if resolved[comp] != mine:
                    raise ScoreParamError(
                        f"score.methods.{comp} = {resolved[comp]!r}: both it and "
                        f"score.methods.td_dyun write the output {comp!r}; expected the same "
                        f"resolved parameters as td_dyun's component ({mine!r})"
                    )
    return resolved


def epochs_needed(resolved: Mapping[str, Mapping]) -> int:
    """How many epochs stage two reads: the largest trajectory over the methods (at least 1)."""
    return max([1] + [int(p["trajectory"]) for p in resolved.values() if "trajectory" in p])


# ---------------------------------------------------------------------------------------------
# Kernels: eager torch ops, or the native one-pass kernel (pipeline/native.py) on the CPU
# ---------------------------------------------------------------------------------------------
KERNELS = ("auto", "eager", "native")


def resolve_kernel(kernel: str, *, device: str) -> str:
    """``auto`` -> ``native`` on the CPU when it compiles and loads here, else ``eager``.
    ``native`` is CPU only; asking for it where it is not available is an error."""
    if kernel not in KERNELS:
        raise _error("score.kernel", kernel, f"one of {', '.join(KERNELS)}")
    on_cpu = str(device) == "cpu"
    if kernel == "auto":
        return "native" if on_cpu and native.available() else "eager"
    if kernel == "native" and not on_cpu:
        raise _error("score.kernel", kernel, f"eager or auto with score.device = {device} (native is CPU only)")
    if kernel == "native" and not native.available():
        raise _error("score.kernel", kernel,
                     f"eager or auto: the native kernel is not usable here ({native.unavailable_reason()})")
    return kernel


# ---------------------------------------------------------------------------------------------
# A block of samples: the shared tensors, computed once
# ---------------------------------------------------------------------------------------------
class BlockTensors:
    """Logits of a block, (T, n, C), and the derived tensors, each computed at most once.

    Every score uses a prefix ``[:T]`` of the epochs, a view of the same tensors.

    ``need_prob``: whether a full softmax will be needed anyway (tdds, tsdd, el2n, entropy); if
    not, ``gold_prob`` is ``exp`` of the gathered log-softmax and the softmax is never formed.
    ``compute_block`` sets it from the requested methods, so which way g is computed depends
    only on the methods, never on the order in which the scores ask for it.
    """

    def __init__(self, logits: Any, labels: Any, *, device: str | torch.device = "cpu",
                 need_prob: bool = True):
        z = torch.as_tensor(logits)
        if z.ndim != 3:
            raise ValueError(f"logits: expected shape (T, n, C), found {tuple(z.shape)}")
        if not (z.is_floating_point()):
            raise ValueError(f"logits: expected a float dtype, found {z.dtype}")
        self.logits = z.to(device=device, dtype=torch.float32).contiguous()  # (T, n, C)
        # a copy of our own (converted, moved or made contiguous) may be used as scratch space
        self._own_logits = self.logits.data_ptr() != z.data_ptr() or self.logits.device != z.device
        y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
        if y.ndim != 1 or y.shape[0] != z.shape[1]:
            raise ValueError(f"labels: expected shape ({z.shape[1]},), found {tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"labels: expected integers, found {y.dtype}")
        self.labels = y.to(device=device, dtype=torch.long)  # (n,)
        C = z.shape[2]
        if y.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= C):
            raise ValueError(
                f"labels: expected values in [0, {C - 1}] (C = {C}), found "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        self.need_prob = bool(need_prob)
        self._divergences: dict[str, torch.Tensor] = {}
        self._divergence_epochs = 0
        self._per_epoch: dict[str, torch.Tensor] = {}  # entropy, el2n (T, n) from the native kernel

    def use_native(self, T: int) -> None:
        """Take g, the margin, both divergences and the per-epoch entropy and el2n of the first T
        epochs from the native one-pass kernel (``pipeline.native``) instead of op by op.
        Float32 logits on the CPU only; raises ``native.NonFiniteLogits`` (changing nothing) if
        any of them is NaN or inf."""
        z = self.logits[:T]
        gold, margin, entropy_t, el2n_t, kl, abs_kl = (
            torch.from_numpy(a) for a in native.epoch_statistics(z.numpy(), self.labels.numpy(), EPS))
        self.logits = z  # every score takes a prefix of these T epochs
        self.__dict__["gold_prob"], self.__dict__["margin"] = gold, margin
        self._divergences, self._divergence_epochs = {"kl": kl, "abs_kl": abs_kl}, T
        self._per_epoch = {"entropy": entropy_t, "el2n": el2n_t}

    def _gold_index(self, T: int) -> torch.Tensor:  # (T, n, 1)
        return self.labels[None, :, None].expand(T, -1, 1)

    @cached_property
    def log_prob(self) -> torch.Tensor:  # (T, n, C)
        return torch.log_softmax(self.logits, dim=-1)

    @cached_property
    def prob(self) -> torch.Tensor:  # (T, n, C)
        return torch.softmax(self.logits, dim=-1)

    @cached_property
    def gold_prob(self) -> torch.Tensor:  # (T, n)
        idx = self._gold_index(self.logits.shape[0])
        if self.need_prob:
            return self.prob.gather(-1, idx).squeeze(-1)
        return self.log_prob.gather(-1, idx).squeeze(-1).exp_()

    @cached_property
    def margin(self) -> torch.Tensor:  # (T, n)
        if not self._own_logits:
            return _margin(self.logits, self.labels)  # never write to the caller's array
        # our own copy: mask the gold entries in place and restore them (exactly, by value)
        # instead of cloning the whole (T, n, C) block; the same values as ``_margin``
        z = self.logits
        idx = self._gold_index(z.shape[0])
        gold = z.gather(-1, idx)  # (T, n, 1)
        z.scatter_(-1, idx, -math.inf)
        try:
            other = z.amax(dim=-1)  # (T, n)
        finally:
            z.scatter_(-1, idx, gold)
        return gold.squeeze(-1) - other

    def entropy(self, T: int) -> torch.Tensor:
        """``entropy(prob[:T], log_prob[:T])``; when the log-softmax is not cached already, from
        P and the logits without one (the same value to float32 rounding)."""
        if "entropy" in self._per_epoch:
            return self._per_epoch["entropy"][:T].mean(dim=0)
        if "log_prob" in self.__dict__:
            return entropy(self.prob[:T], self.log_prob[:T])
        # H = -sum_c P log P with log P = (z - m) - log s, m = max_c z, s = sum_c exp(z - m);
        # the softmax's largest entry is exp(0) / s, so log s = -log max_c P: the entropy
        # needs no second exp pass (a log-softmax), only P * (z - m) summed over C
        p, z = self.prob[:T], self.logits[:T]
        shifted = z - z.amax(dim=-1, keepdim=True)  # (T, n, C), <= 0
        total = shifted.mul_(p).sum(dim=-1) + p.amax(dim=-1).log_()  # (T, n): sum P log P = -H
        if not bool(torch.isfinite(total).all()):  # a -inf logit: the masked sum of ``entropy``
            return entropy(p, torch.log_softmax(z, dim=-1))
        return -total.mean(dim=0)

    @cached_property
    def correct(self) -> torch.Tensor:  # (T, n) bool
        # argmax == y exactly, from the margin (z_y - max_{c != y} z_c), without an argmax
        # pass: margin > 0 iff z_y is the unique maximum; margin < 0 iff another class is
        # larger. A tie (margin 0) or NaN goes to argmax, whose first-index rule decides.
        m = self.margin
        correct = m > 0
        unsure = ~(m != 0)  # margin 0 or NaN
        if bool(unsure.any()):
            rows = self.logits[unsure]  # (k, C)
            gold = self.labels[None, :].expand_as(m)[unsure]
            correct[unsure] = rows.argmax(dim=-1) == gold
        return correct

    def divergences(self, T: int, kinds) -> dict[str, torch.Tensor]:
        """Depth-one series d (T-1, n) of each divergence in ``kinds``, from one product
        ``P[t+1] (log(P[t+1]+eps) - log(P[t]+eps))`` per block. d[t] depends on epochs t and
        t+1 only, so a shorter trajectory takes a prefix of the longest one. Call
        ``plan_divergences`` first so that one pass serves every request."""
        missing = [k for k in kinds if k not in self._divergences]
        if missing or T > self._divergence_epochs:
            self.plan_divergences(T, kinds)
        return {k: self._divergences[k][:T - 1] for k in kinds}

    def plan_divergences(self, T: int, kinds) -> None:
        kinds = set(kinds) | set(self._divergences)
        T = max(T, self._divergence_epochs)
        term = _divergence_terms(self.prob[:T], EPS)
        self._divergences = _divergence_sums(term, kinds)
        self._divergence_epochs = T

    def el2n(self, T: int) -> torch.Tensor:
        if "el2n" in self._per_epoch:
            return self._per_epoch["el2n"][:T].mean(dim=0)
        return _el2n_in_place(self.prob[:T], self.labels, self.gold_prob[:T])


_NEEDS_PROB = ("td_dyun", "tsdd", "tdds", "el2n", "entropy")


def _divergence_plan(resolved: Mapping[str, Mapping]) -> tuple[int, set]:
    """The longest trajectory and the divergences that tdds / tsdd / td_dyun ask for."""
    T, kinds = 0, set()
    for name, p in resolved.items():
        if name in ("td_dyun", "tsdd"):
            T, kinds = max(T, int(p["trajectory"])), kinds | {"kl"}
        elif name == "tdds":
            T, kinds = max(T, int(p["trajectory"])), kinds | {p["divergence"]}
    return T, kinds


def _tsdd_block(b: BlockTensors, T: int, window: int, decay: float) -> torch.Tensor:
    if T < 3:
        raise _error("tsdd.trajectory", T, "T >= 3 epochs")
    d = b.divergences(T, ("kl",))["kl"]
    return _depth_two(d, window=min(window, T), decay=decay, spread="std")


def _block_outputs(name: str, p: Mapping, b: BlockTensors) -> dict[str, torch.Tensor]:
    """The block-local outputs of one method (td_dyun: its two components)."""
    T = p.get("trajectory")
    if name == "td_dyun":
        return {
            "wdu": wdu(b.gold_prob[:T], **p["wdu"]),
            "tsdd": _tsdd_block(b, T, **p["tsdd"]),
        }
    if name == "wdu":
        return {"wdu": wdu(b.gold_prob[:T], window=p["window"], recency=p["recency"],
                           difficulty=p["difficulty"])}
    if name == "tsdd":
        return {"tsdd": _tsdd_block(b, T, window=p["window"], decay=p["decay"])}
    if name == "dyun":
        return {"dyun": dyun(b.gold_prob[:T], window=p["window"], include_last=p["include_last"])}
    if name == "tdds":
        _check_tdds(T, p["window"], p["decay"], p["spread"])
        if p["divergence"] not in DIVERGENCES:
            raise _error("tdds.divergence", p["divergence"], f"one of {', '.join(DIVERGENCES)}")
        d = b.divergences(T, (p["divergence"],))[p["divergence"]]
        return {"tdds": _depth_two(d, window=p["window"], decay=p["decay"], spread=p["spread"])}
    if name == "el2n":
        return {"el2n": b.el2n(T)}
    if name == "forgetting":
        return {"forgetting": forgetting(b.correct[:T])}
    if name == "aum":
        return {"aum": _aum_from_margin(b.margin[:T])}
    if name == "variability":
        return {"variability": variability(b.gold_prob[:T])}
    if name == "confidence":
        return {"confidence": confidence(b.gold_prob[:T])}
    if name == "entropy":
        return {"entropy": b.entropy(T)}
    if name == "loss":
        return {"loss": loss(b.gold_prob[:T])}
    if name == "random":
        return {}
    _spec(name)  # an unknown name raises ScoreParamError listing the valid ones
    raise AssertionError(f"no block computation for registered score {name!r}")


@contextlib.contextmanager
def subnormals_flushed() -> Iterator[None]:
    """Flush subnormal floats to zero in this thread while ``compute_block`` scores a block,
    then restore IEEE behaviour (torch's default; the setting is the thread's MXCSR).
    Confident logits make probabilities near 1e-35, whose squares and products underflow, and
    every underflow costs a microcode assist: the scores after the native kernel ran 4x slower
    on a block of logit gaps in the hundreds (bench/block_task.py --scale 10). Scores move by
    less than 1e-38."""
    if not torch.set_flush_denormal(True):  # not supported on this CPU: nothing was changed
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def native_checks(kernel: str, *, device: str | torch.device, resolved: Mapping[str, Mapping]) -> bool:
    """Whether ``compute_block`` will run the native kernel (which checks every logit for NaN/inf
    itself, so the caller need not): ``kernel`` native, on the CPU, T >= 2, the kernel loaded."""
    return (kernel == "native" and torch.device(device).type == "cpu" and epochs_needed(resolved) >= 2
            and native.available())


def compute_block(logits: Any, labels: Any, resolved: Mapping[str, Mapping], *,
                  device: str | torch.device = "cpu", kernel: str = "eager",
                  nonfinite: str = "eager") -> dict[str, np.ndarray]:
    """Every block-local output of every resolved method for one block of samples.

    logits: (T, n, C) numpy or torch, any float dtype, T >= ``epochs_needed(resolved)`` (extra
    epochs are ignored); labels: (n,) integers in [0, C). Softmax, log-softmax, g, correct and
    the margin are computed once (in float32 on ``device``) and shared. td_dyun contributes
    ``wdu`` and ``tsdd`` (its ranks need all N, see ``finalize``); random contributes nothing.
    Returns name -> (n,) float32 numpy. Refusing NaN/inf logits is the caller's (the native
    kernel finds them on its way: see ``nonfinite``).
    kernel: ``eager`` (torch ops) or ``native`` (``pipeline.native``'s one-pass kernel, CPU only,
    the same values to float32 rounding); resolve
    ``auto`` first with ``resolve_kernel``. nonfinite: what the native kernel does with a block
    holding NaN or inf: ``eager`` scores it with the eager path (where -inf is legal and NaN gives
    NaN), ``raise`` raises ``native.NonFiniteLogits`` (stage two then reports the block).
    """
    need = epochs_needed(resolved)
    block = BlockTensors(logits, labels, device=device,
                         need_prob=any(name in _NEEDS_PROB for name in resolved))
    if block.logits.shape[0] < need:
        raise ValueError(
            f"logits: {block.logits.shape[0]} epochs given, but the resolved methods need "
            f"T = {need} (epochs_needed)"
        )
    if block.logits.shape[2] < 2:
        raise ValueError(f"logits: expected C >= 2 classes, found C = {block.logits.shape[2]}")
    out: dict[str, np.ndarray] = {}
    if kernel not in ("eager", "native"):
        raise _error("score.kernel", kernel, "eager or native (resolve auto first)")
    if nonfinite not in ("eager", "raise"):
        raise ValueError(f"nonfinite = {nonfinite!r}: expected eager or raise")
    with torch.no_grad(), subnormals_flushed():
        div_epochs, div_kinds = _divergence_plan(resolved)
        # a worker without a C compiler (the kernel was resolved on the client) goes eager too
        on_native = native_checks(kernel, device=block.logits.device, resolved=resolved)
        if on_native:
            try:
                block.use_native(need)
            except native.NonFiniteLogits:
                if nonfinite == "raise":
                    raise
                on_native = False
        if not on_native and div_kinds and 3 <= div_epochs <= block.logits.shape[0]:
            block.plan_divergences(div_epochs, div_kinds)  # one pass for tdds and tsdd
        for name, params in resolved.items():
            for key, value in _block_outputs(name, params, block).items():
                out[key] = value.detach().to("cpu", torch.float32).numpy()
    return out


def finalize(block_outputs: Mapping[str, np.ndarray], resolved: Mapping[str, Mapping], *,
             num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """Add the global scores to the concatenated per-sample outputs (all N, dataset order).

    ``td_dyun = alpha * rank01(wdu) + (1-alpha) * rank01(tsdd)`` (float64); ``random`` = seeded
    uniform [0, 1) over all N (float64; the method's own ``seed`` or else ``seed``). Returns
    every output named in each requested ``ScoreSpec.outputs``, each (N,).
    """
    out: dict[str, np.ndarray] = {}
    for name, params in resolved.items():
        spec = _spec(name)
        for key in spec.outputs:
            if key in ("td_dyun", "random"):  # the global outputs, computed below
                continue
            if key not in block_outputs:
                raise ValueError(f"finalize: the block outputs lack {key!r} (needed by {name})")
            arr = np.asarray(block_outputs[key])
            if arr.shape != (num_samples,):
                raise ValueError(
                    f"finalize: output {key!r} has shape {arr.shape}, expected ({num_samples},)"
                )
            out[key] = arr
        if name == "td_dyun":
            out["td_dyun"] = td_dyun_combine(out["wdu"], out["tsdd"], alpha=params["alpha"])
        elif name == "random":
            s = seed if params.get("seed") is None else params["seed"]
            out["random"] = random_score(num_samples, seed=s)
    return out


def score_arrays(logits: Any, labels: Any, methods: Mapping[str, Mapping | None], *,
                 prune_rate: float = 0.5, seed: int = 0,
                 device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """In memory: resolve ``methods`` for E = logits.shape[0], compute on all samples, finalize.

    logits (E, N, C), labels (N,) -> name -> (N,) for every output of every method.
    """
    E = int(logits.shape[0])
    resolved = resolve_methods(methods, epochs=E, prune_rate=prune_rate)
    need = epochs_needed(resolved)
    local = compute_block(logits[:need], labels, resolved, device=device)
    return finalize(local, resolved, num_samples=int(logits.shape[1]), seed=seed)
