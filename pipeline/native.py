"""A native CPU kernel for stage two's per-epoch statistics, compiled on first use.

Every score of docs/scores.md is made of a few per-(epoch, sample) quantities: the gold-class
probability g, the margin, the entropy, the EL2N norm and the two depth-one divergences. The
eager path (``pipeline.scores.BlockTensors``) computes them as a chain of torch ops, a dozen
passes over the (T, n, C) logits. This kernel computes all of them in one pass, one row of C
logits at a time, epoch by epoch (the previous epoch's P and log P kept per sample), with the
exp and log vectorised by
glibc's libmvec. It is C compiled here with the system's C compiler (``cc -O3 -march=native
-ffast-math``, linked without it) into a cache folder keyed by the source, the flags and the CPU, and loaded with
ctypes (which releases the GIL, so dask's threads run it in parallel). Where no compiler works,
``available()`` is False and the eager path is used: the results are the same to float32
rounding (tests/test_native.py).

Inputs must be finite: ``-ffast-math`` assumes no NaN or inf (stage two refuses non-finite
logits before scoring; ``compute_block`` sends a block with a -inf logit to the eager path).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

__all__ = ["available", "epoch_statistics", "kernel_path"]

# Compiled with -ffast-math (libmvec's vector exp/log need it) but linked without it: a shared
# object linked with -ffast-math carries crtfastmath.o (GCC < 13), whose constructor turns on
# flush-to-zero for the whole process when the library loads (tests/test_native.py checks not).
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fPIC"]
LINK_FLAGS = ["-shared"]

SOURCE = r"""
#include <math.h>
#include <float.h>
#include <stdint.h>
#include <stddef.h>

/* z (T, n, C) float32, rows contiguous; y (n,) int64 in [0, C).
   Out (T, n): gold = P[y], margin = z[y] - max_{c != y} z[c], ent = H(P), el2n = ||P - onehot||.
   Out (T-1, n): kl[t] = sum_c P[t+1] (log(P[t+1]+eps) - log(P[t]+eps)), akl = the same with |.|.
   Epoch-major, so z is read once, in order; work (4 n C floats) holds P and log(P+eps) of the
   current and the previous epoch for every sample. */
void epoch_statistics(const float *z, const int64_t *y, int64_t T, int64_t n, int64_t C, float eps,
                      float *gold, float *margin, float *ent, float *el2n, float *kl, float *akl,
                      float *work)
{
    float *P = work, *LP = work + n * C, *P_prev = work + 2 * n * C, *LP_prev = work + 3 * n * C;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < n; i++) {
            const int64_t yi = y[i];
            const float *row = z + ((size_t)t * n + i) * C;
            float *p = P + (size_t)i * C, *lp = LP + (size_t)i * C;
            float m = -FLT_MAX, other = -FLT_MAX;
            for (int64_t c = 0; c < C; c++) {
                m = fmaxf(m, row[c]);
                other = fmaxf(other, c == yi ? -FLT_MAX : row[c]);
            }
            float s = 0.0f;
            for (int64_t c = 0; c < C; c++) {
                p[c] = expf(row[c] - m);
                s += p[c];
            }
            const float inv = 1.0f / s;
            float sh = 0.0f, sq = 0.0f;
            for (int64_t c = 0; c < C; c++) {
                p[c] = p[c] * inv;
                sh += p[c] * (row[c] - m);
                sq += c == yi ? 0.0f : p[c] * p[c];
                lp[c] = logf(p[c] + eps);
            }
            const size_t o = (size_t)t * n + i;
            const float g = p[yi];
            gold[o] = g;
            margin[o] = row[yi] - other;
            ent[o] = logf(s) - sh;
            el2n[o] = sqrtf(sq + (g - 1.0f) * (g - 1.0f));
            if (t > 0) {
                const float *lq = LP_prev + (size_t)i * C;
                float a = 0.0f, b = 0.0f;
                for (int64_t c = 0; c < C; c++) {
                    const float d = p[c] * (lp[c] - lq[c]);
                    a += d;
                    b += fabsf(d);
                }
                kl[(size_t)(t - 1) * n + i] = a;
                akl[(size_t)(t - 1) * n + i] = b;
            }
        }
        float *swap = P; P = P_prev; P_prev = swap;
        swap = LP; LP = LP_prev; LP_prev = swap;
    }
}
"""

_LOCK = threading.Lock()
_LIB: ctypes.CDLL | None | bool = None  # None: not tried yet; False: no compiler here


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its flags (Linux), else the machine."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [l for l in text.splitlines() if l.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.machine() + platform.processor()


def kernel_path() -> Path:
    """Where the compiled kernel for this source, these flags and this CPU is cached."""
    root = Path(os.environ.get("TDDYUN_CACHE") or Path.home() / ".cache" / "tddyun") / "kernels"
    recipe = repr((FLAGS, "-c", LINK_FLAGS, "-lm"))  # how it is built, so a change rebuilds it
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
        subprocess.run([compiler, *FLAGS, "-c", str(src), "-o", str(obj)], check=True, capture_output=True,
                       timeout=120)
        subprocess.run([compiler, *LINK_FLAGS, str(obj), "-o", str(out), "-lm"], check=True, capture_output=True,
                       timeout=120)
        os.replace(out, target)  # atomic: a concurrent process sees the whole file or none


def _load() -> ctypes.CDLL | None:
    global _LIB
    with _LOCK:
        if _LIB is None:
            try:
                path = kernel_path()
                if not path.is_file():
                    _compile(path)
                lib = ctypes.CDLL(str(path))
                f32 = ctypes.POINTER(ctypes.c_float)
                lib.epoch_statistics.argtypes = [f32, ctypes.POINTER(ctypes.c_int64), ctypes.c_int64, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_float] + [f32] * 7
                lib.epoch_statistics.restype = None
                _LIB = lib
            except (OSError, subprocess.SubprocessError):
                _LIB = False
        return _LIB or None


def available() -> bool:
    """Whether the kernel is (or can be) compiled and loaded on this machine."""
    return _load() is not None


def epoch_statistics(z: np.ndarray, y: np.ndarray, eps: float) -> tuple[np.ndarray, ...]:
    """z (T, n, C) float32, y (n,) ints -> (gold, margin, entropy, el2n) each (T, n) and
    (kl, abs_kl) each (T-1, n), float32. See the module docstring; finite z only."""
    lib = _load()
    if lib is None:
        raise RuntimeError("the native kernel is not available on this machine (no working C compiler)")
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
    work = np.empty(4 * n * C, dtype=np.float32)  # P, log(P+eps): this epoch and the last
    f32 = ctypes.POINTER(ctypes.c_float)

    def ptr(a: np.ndarray):
        return a.ctypes.data_as(f32)

    lib.epoch_statistics(ptr(z), y.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)), T, n, C, float(eps),
                         ptr(per_epoch[0]), ptr(per_epoch[1]), ptr(per_epoch[2]), ptr(per_epoch[3]),
                         ptr(pairs[0]), ptr(pairs[1]), ptr(work))
    return per_epoch[0], per_epoch[1], per_epoch[2], per_epoch[3], pairs[0], pairs[1]
