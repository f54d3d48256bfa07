"""A native CPU kernel for stage two's per-epoch statistics, compiled on first use.

Every score of docs/scores.md is made of a few per-(epoch, sample) quantities: the gold-class
probability g, the margin, the entropy, the EL2N norm and the two depth-one divergences. The
eager path (``pipeline.scores.BlockTensors``) computes them as a chain of torch ops, a dozen
passes over the (T, n, C) logits. This kernel computes all of them in one pass over the logits,
a tile of about 512 / C samples at a time, epoch by epoch (the tile's P and log P of the last epoch kept in
L1), with exp and log vectorised by glibc's libmvec, and checks every logit for NaN/inf on the
way. It is C compiled here with the system's C compiler (``cc -O3 -march=native -ffast-math``,
linked without it) into a cache folder keyed by the source, the flags and the CPU, and loaded
with ctypes (which releases the GIL, so dask's threads run it in parallel). Once loaded, it is
checked against float64 numpy (``self_check``). Where no compiler works, or the kernel fails its
check, ``available()`` is False (``unavailable_reason()`` says why) and the eager path is used:
the results are the same to float32 rounding (tests/test_native.py).

Non-finite logits: ``-ffast-math`` assumes none, so the kernel checks the bits instead (an
all-ones exponent) and ``epoch_statistics`` raises ``NonFiniteLogits``; ``compute_block`` then
scores the block eagerly (a -inf logit is legal there) or, in stage two, reports it.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

__all__ = ["available", "unavailable_reason", "epoch_statistics", "reference_statistics", "kernel_path",
           "NonFiniteLogits"]


class NonFiniteLogits(ValueError):
    """The kernel found NaN or inf logits (``rows``: how many sample-epochs hold one)."""

    def __init__(self, rows: int):
        super().__init__(f"logits: {rows} rows (sample-epochs) hold NaN or inf; expected finite values")
        self.rows = rows

# Compiled with -ffast-math (libmvec's vector exp/log need it) but linked without it: a shared
# object linked with -ffast-math carries crtfastmath.o (GCC < 13), whose constructor turns on
# flush-to-zero for the whole process when the library loads (tests/test_native.py checks not).
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
# More compile flags from TDDYUN_NATIVE_CFLAGS (shell words), e.g. "-mprefer-vector-width=512".
# GCC keeps to 256-bit vectors on AVX-512 CPUs unless told, and so does this kernel by default:
# 512-bit code lowers the clock of many Xeons for all the work on that core (torch, zarr's
# decoding), and the one CI run with 512-bit vectors (2026-12-05) failed on one block whose
# scores were about 1e-4 off, which nothing here reproduced. 512 measured 8-13 % faster for the
# kernel alone and 2-10 % for a whole block task in two runs on this machine, and the same end to
# end (E=50, C=100; docs/benchmarks.md).
CFLAGS_ENV = "TDDYUN_NATIVE_CFLAGS"
LINK_FLAGS = ["-shared"]

SOURCE = r"""
#include <math.h>
#include <float.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

#define TILE_ELEMS 512  /* logits per tile: 512 / C samples done together (rows side by side in z) */
#define AHEAD 2  /* prefetch distance in epochs: the rows of one sample are n C floats apart */
#define XS_MIN (-80.0f)  /* the least logit - max logit taken into exp */

typedef uint32_t __attribute__((may_alias)) bits32;  /* a float's bits, read through the same pointer */

/* z (T, n, C) float32, rows contiguous; y (n,) int64 in [0, C).
   Out (T, n): gold = P[y], margin = z[y] - max_{c != y} z[c], ent = H(P), el2n = ||P - onehot||.
   Out (T-1, n): kl[t] = sum_c P[t+1] (log(P[t+1]+eps) - log(P[t]+eps)), akl = the same with |.|.
   Returns how many rows (sample-epochs) hold a NaN or an inf, found from the bits (the code is
   built with -ffast-math, which assumes finite floats); the outputs are then meaningless.
   Returns -1 if the work space cannot be allocated. Values below 1e-34 (exp of a logit 80 under
   the maximum, and subnormals) are not resolved: P is at least exp(-80) / s, subnormals are 0.

   A tile of `tile` samples goes through the epochs in order, holding its P and log(P+eps) of
   this epoch and the last (4 tile C floats, in L1). exp and log run as one loop over the tile's
   tile C values, so libmvec's vector functions run at full width with no per-row remainder;
   the sums over classes run row by row. About 512 logits a tile measured best at C = 10, 100
   and 1000 (8 % faster than 8 samples at C = 100, 16 % at C = 1000). */
int64_t epoch_statistics(const float *z, const int64_t *y, int64_t T, int64_t n, int64_t C, float eps,
                         float *gold, float *margin, float *ent, float *el2n, float *kl, float *akl)
{
    const int64_t tile = C >= TILE_ELEMS ? 1 : (TILE_ELEMS / C > 64 ? 64 : TILE_ELEMS / C);
    const size_t L = (size_t)tile * C;
    float *work = malloc(4 * L * sizeof(float));
    if (!work) return -1;
#if defined(__SSE__)
    /* flush-to-zero and denormals-are-zero during this call only (MXCSR is per thread): a tiny P
       times a tiny difference underflows, and each underflow costs a microcode assist */
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040u);
#endif
    float *XS = work, *P = work + L, *LP = work + 2 * L, *LQ = work + 3 * L;
    const int Ci = (int)C;
    int64_t nonfinite = 0;
    for (int64_t i0 = 0; i0 < n; i0 += tile) {
        const int64_t S = n - i0 < tile ? n - i0 : tile;
        const size_t len = (size_t)S * C;
        for (int64_t t = 0; t < T; t++) {
            const size_t o0 = (size_t)t * n + i0;
            const float *x = z + o0 * C;  /* the tile's S rows of epoch t */
            if (t + AHEAD < T) {          /* a stride the hardware prefetcher does not follow */
                const char *ahead = (const char *)(x + (size_t)AHEAD * n * C);
                for (size_t b = 0; b < len * sizeof(float); b += 64) __builtin_prefetch(ahead + b);
            }
            /* per row: the maximum, the largest other than the gold class, a NaN/inf check, and
               the logits shifted by the maximum (XS, <= 0) */
            for (int64_t k = 0; k < S; k++) {
                const float *row = x + k * C;
                const bits32 *u = (const bits32 *)row;
                const int yi = (int)y[i0 + k];
                float m = -FLT_MAX, other = -FLT_MAX;
                uint32_t exponent = 0;  /* all-ones exponent bits: NaN or inf */
                for (int c = 0; c < Ci; c++) {
                    m = fmaxf(m, row[c]);
                    other = fmaxf(other, c == yi ? -FLT_MAX : row[c]);
                    const uint32_t e = u[c] & 0x7f800000u;
                    exponent = exponent > e ? exponent : e;
                }
                nonfinite += exponent == 0x7f800000u;
                float *xs = XS + k * C;
                /* clamped: libmvec's exp leaves its vector path for inputs below about -87
                   (2-3x slower on a store of confident logits); exp(-80) / s is below 1e-34 */
                for (int c = 0; c < Ci; c++) xs[c] = fmaxf(row[c] - m, XS_MIN);
                margin[o0 + k] = row[yi] - other;
            }
            for (size_t j = 0; j < len; j++) P[j] = expf(XS[j]);
            /* per row: normalise; the gold probability, the entropy H = log s - sum P XS, and
               EL2N (the gold term apart: no cancellation near g = 1) */
            for (int64_t k = 0; k < S; k++) {
                float *p = P + k * C;
                const float *xs = XS + k * C;
                const int yi = (int)y[i0 + k];
                float s = 0.0f;
                for (int c = 0; c < Ci; c++) s += p[c];
                const float inv = 1.0f / s;
                float sh = 0.0f, sq = 0.0f;
                for (int c = 0; c < Ci; c++) {
                    const float pc = p[c] * inv;
                    p[c] = pc;
                    sh += pc * xs[c];
                    sq += c == yi ? 0.0f : pc * pc;
                }
                const float g = p[yi];
                gold[o0 + k] = g;
                ent[o0 + k] = logf(s) - sh;
                el2n[o0 + k] = sqrtf(sq + (g - 1.0f) * (g - 1.0f));
            }
            for (size_t j = 0; j < len; j++) LP[j] = logf(P[j] + eps);
            if (t > 0) {  /* the divergences from the last epoch */
                for (int64_t k = 0; k < S; k++) {
                    const float *p = P + k * C, *lp = LP + k * C, *lq = LQ + k * C;
                    float a = 0.0f, b = 0.0f;
                    for (int c = 0; c < Ci; c++) {
                        const float d = p[c] * (lp[c] - lq[c]);
                        a += d;
                        b += fabsf(d);
                    }
                    kl[o0 - n + k] = a;
                    akl[o0 - n + k] = b;
                }
            }
            float *swap = LP; LP = LQ; LQ = swap;
        }
    }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
    free(work);
    return nonfinite;
}
"""

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None | bool = None  # None: not tried yet; False: not usable here (see _WHY)
_WHY = ""  # why the kernel is not usable here, once _LIB is False

# The loaded kernel is checked once per process against float64 numpy (``reference_statistics``):
# code built with -ffast-math -march=native by whatever compiler and libmvec a machine has could
# otherwise give wrong scores without a sign. Its outputs lie within 5e-6 of the float64 values
# on the check's input here (2026-12-05); 3e-5 leaves room for other CPUs' exp and log.
CHECK_ATOL = 3e-5
CHECK_RTOL = 1e-5


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags (Linux), else the machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [l for l in text.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


def _compile_flags() -> list[str]:
    return FLAGS + shlex.split(os.environ.get(CFLAGS_ENV, ""))


def kernel_path() -> Path:
    """Where the compiled kernel for this source, these flags and this CPU is cached."""
    root = Path(os.environ.get("TDDYUN_CACHE") or Path.home() / ".cache" / "tddyun") / "kernels"
    recipe = repr((_compile_flags(), "-c", LINK_FLAGS, "-lm"))  # how it is built, so a change rebuilds it
    key = hashlib.sha256("\0".join([SOURCE, recipe, _cpu_signature()]).encode()).hexdigest()[:16]
    return root / f"epoch_statistics-{key}.so"


def _compile(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src, obj, out = Path(tmp) / "k.c", Path(tmp) / "k.o", Path(tmp) / "k.so"
        src.write_text(SOURCE)
        subprocess.run([compiler, *_compile_flags(), "-c", str(src), "-o", str(obj)], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([compiler, *LINK_FLAGS, str(obj), "-o", str(out), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, target)  # atomic: a concurrent process sees the whole file or none


def _load() -> ctypes.CDLL | None:
    global _LIB, _WHY
    with _LOCK:
        if _LIB is None:
            try:
                path = kernel_path()
                if not path.is_file():
                    _compile(path)
                lib = ctypes.CDLL(str(path))
                f32 = ctypes.POINTER(ctypes.c_float)
                lib.epoch_statistics.argtypes = [f32, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_float] + [f32] * 6
                lib.epoch_statistics.restype = ctypes.c_int64
            except (OSError, subprocess.SubprocessError) as exc:
                _LIB, _WHY = False, _build_failure(exc)
                return None
            problem = self_check(lambda z, y, eps: _run(lib, z, y, eps))
            if problem:
                _LIB, _WHY = False, f"{path.name} failed its check against float64 numpy: {problem}"
                warnings.warn(f"native kernel not used (stage two runs eager): {_WHY}", RuntimeWarning,
                              stacklevel=2)
            else:
                _LIB = lib
        return _LIB or None


def _build_failure(exc: Exception) -> str:
    """Why the kernel could not be built or loaded, in a line."""
    if isinstance(exc, subprocess.CalledProcessError):
        said = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        return (f"the C compiler failed on it ({' '.join(map(str, exc.cmd[:1]))} with "
                f"{' '.join(_compile_flags())}: {said[-1] if said else 'exit ' + str(exc.returncode)})")
    return f"no working C compiler to build it ({type(exc).__name__}: {exc})"


def available() -> bool:
    """Whether the kernel is (or can be) compiled, loaded and checked on this machine."""
    return _load() is not None


def unavailable_reason() -> str:
    """Why ``available()`` is False ("" while it is True or not yet tried)."""
    _load()
    return _WHY


def _check_inputs() -> list[tuple[np.ndarray, np.ndarray]]:
    """What the kernel is checked on: C = 7 over two tiles (the second partial) with two confident
    samples (gaps of 200: the exp clamp), and C = 600 (tiles of one sample)."""
    rng = np.random.default_rng(20261205)
    z = (rng.standard_normal((3, 70, 7)) * 3).astype(np.float32)
    y = rng.integers(0, 7, 70)
    z[:, 0, y[0]] += 200.0  # learned: every other class 200 below the gold one
    z[:, 1, (y[1] + 1) % 7] += 200.0  # mislabelled: the gold class 200 below another
    wide = (rng.standard_normal((2, 2, 600)) * 2).astype(np.float32)
    return [(z, y), (wide, rng.integers(0, 600, 2))]


def self_check(statistics) -> str:
    """"" if ``statistics`` (z, y, eps -> the six outputs of ``epoch_statistics``) agrees with
    ``reference_statistics`` within ``CHECK_ATOL`` + ``CHECK_RTOL`` × |reference| on
    ``_check_inputs()``; else the first output that does not, with its worst difference."""
    names = ("gold", "margin", "entropy", "el2n", "kl", "abs_kl")
    for z, y in _check_inputs():
        try:
            got = statistics(z, y, 1e-8)
        except (NonFiniteLogits, MemoryError) as exc:
            return f"on finite logits of shape {z.shape}: {exc}"
        for name, a, b in zip(names, got, reference_statistics(z, y, 1e-8)):
            if np.shape(a) != b.shape:
                return f"{name} has shape {np.shape(a)}, expected {b.shape} (logits of shape {z.shape})"
            err = np.abs(np.asarray(a, dtype=np.float64) - b)
            if not np.all(err <= CHECK_ATOL + CHECK_RTOL * np.abs(b)):  # NaN fails too
                return (f"{name} of shape {b.shape} is {np.nanmax(err):.3g} off, expected within "
                        f"{CHECK_ATOL:g} + {CHECK_RTOL:g} x |value| (logits of shape {z.shape})")
    return ""


def reference_statistics(z: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    """The outputs of ``epoch_statistics`` in float64 numpy, straight from their definitions:
    z (T, n, C), y (n,) -> gold, margin, entropy, el2n (T, n) and kl, abs_kl (T-1, n)."""
    z = np.asarray(z, dtype=np.float64)
    T, n, C = z.shape
    shifted = z - z.max(axis=-1, keepdims=True)
    total = np.exp(shifted).sum(axis=-1, keepdims=True)
    log_p = shifted - np.log(total)
    p = np.exp(log_p)
    gold_idx = np.broadcast_to(np.asarray(y)[None, :, None], (T, n, 1))
    onehot = np.arange(C) == np.asarray(y)[:, None]  # (n, C)
    gold = np.take_along_axis(p, gold_idx, axis=-1)[..., 0]
    margin = np.take_along_axis(z, gold_idx, axis=-1)[..., 0] - np.where(onehot, -np.inf, z).max(axis=-1)
    entropy = -(p * log_p).sum(axis=-1)
    el2n = np.sqrt(((p - onehot) ** 2).sum(axis=-1))
    log_eps = np.log(p + eps)
    terms = p[1:] * (log_eps[1:] - log_eps[:-1])
    return gold, margin, entropy, el2n, terms.sum(axis=-1), np.abs(terms).sum(axis=-1)


def epoch_statistics(z: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    """z (T, n, C) float32, y (n,) ints -> (gold, margin, entropy, el2n) each (T, n) and
    (kl, abs_kl) each (T-1, n), float32. See the module docstring. Raises ``NonFiniteLogits``
    if any logit is NaN or inf (checked on the bits in the same pass)."""
    lib = _load()
    if lib is None:
        raise RuntimeError(f"the native kernel is not available on this machine: {_WHY}")
    return _run(lib, z, y, eps)


def _run(lib: ctypes.CDLL, z: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    z = np.ascontiguousarray(z, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    T, n, C = z.shape
    if y.shape != (n,):
        raise ValueError(f"labels: expected shape ({n},), found {y.shape}")
    if C < 2:
        raise ValueError(f"logits: expected C >= 2 classes, found C = {C}")
    if n and (int(y.min()) < 0 or int(y.max()) >= C):  # the kernel indexes rows by label: never out of range
        raise ValueError(f"labels: expected values in [0, {C - 1}], found [{int(y.min())}, {int(y.max())}]")
    per_epoch = np.empty((4, T, n), dtype=np.float32)
    pairs = np.empty((2, max(T - 1, 0), n), dtype=np.float32)
    f32 = ctypes.POINTER(ctypes.c_float)

    def ptr(a: np.ndarray):
        return a.ctypes.data_as(f32)

    nonfinite = lib.epoch_statistics(ptr(z), y.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), T, n, C, float(eps),
                                     ptr(per_epoch[0]), ptr(per_epoch[1]), ptr(per_epoch[2]), ptr(per_epoch[3]),
                                     ptr(pairs[0]), ptr(pairs[1]))
    if nonfinite < 0:
        raise MemoryError(f"the native kernel could not allocate its work space (about 4 x 512 floats, C = {C})")
    if nonfinite:
        raise NonFiniteLogits(int(nonfinite))
    return per_epoch[0], per_epoch[1], per_epoch[2], per_epoch[3], pairs[0], pairs[1]
