"""One stage-two block task on one thread, and its parts: where the scoring time goes.

Stage two scores the store block by block (``pipeline.compute._block_task``); this times one
such task on an in-memory block of random-walk logits (no store, no read), one torch thread,
with every registered score (trajectory: all), and the parts it is made of:

  kernel         ``pipeline.native.epoch_statistics`` alone (the per-epoch statistics)
  compute_block  ``pipeline.scores.compute_block`` (the kernel plus every score from its output)
  block task     ``pipeline.compute._block_task`` (compute_block plus the task's checks and upkeep)
  eager          the block task with ``kernel=eager`` (torch ops), the baseline, same run

Runs alternate between the parts (median of ``--repeats`` rounds); prints µs per sample and
the ratio of each to the eager block task. To compare two commits, run the script from a
worktree of each (``git worktree add /tmp/old COMMIT``) with the same arguments.

    .venv/bin/python bench/block_task.py                       # E=50, C=100, 5242 samples (100 MiB)
    .venv/bin/python bench/block_task.py --classes 10 --samples 20000
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def random_walk(epochs: int, samples: int, classes: int, *, scale: float, seed: int = 0):
    """(E, n, C) float32 logits: a random walk per sample and class; (n,) labels."""
    rng = np.random.default_rng(seed)
    steps = rng.standard_normal((epochs, samples, classes), dtype=np.float32) * np.float32(scale)
    return np.cumsum(steps, axis=0, out=steps), rng.integers(0, classes, samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--samples", type=int, default=5242, help="samples in the block (5242: 100 MiB at E=50, C=100)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--scale", type=float, default=1.0, help="std of a random-walk step (logit units)")
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()

    import torch

    from pipeline import compute, native
    from pipeline.config import ScoreConfig
    from pipeline.scores import compute_block, resolve_methods
    from score_throughput import all_methods

    torch.set_num_threads(1)
    E, n, C = args.epochs, args.samples, args.classes
    x, y = random_walk(E, n, C, scale=args.scale)
    resolved = resolve_methods(all_methods(), epochs=E, prune_rate=0.5)
    compute._tune_malloc()  # as in a stage-two process
    slice_samples = compute.slice_samples_of(slice_mb=compute.SLICE_MB, block_mb=ScoreConfig().block_mb,
                                             epochs=E, num_classes=C)  # as score_store chooses

    def task(kernel: str):
        return lambda: compute._block_task(x, y.reshape(1, -1, 1), resolved=resolved, device="cpu",
                                           task_epochs=E, num_classes=C, slice_samples=slice_samples,
                                           kernel=kernel)

    parts = {"block task, eager kernel (baseline)": task("eager"), "block task": task("native")}
    if native.available():
        parts["compute_block"] = lambda: compute_block(x, y, resolved, kernel="native")
        parts["kernel"] = lambda: native.epoch_statistics(x, y, 1e-8)
    else:
        print("no C compiler here: only the eager block task is timed", file=sys.stderr)
        parts.pop("block task")
    times: dict[str, list[float]] = {name: [] for name in parts}
    for f in parts.values():
        f()  # warm-up: compile/load the kernel, first-touch the buffers
    for _ in range(args.repeats):
        for name, f in parts.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    per = {name: statistics.median(ts) / n * 1e6 for name, ts in times.items()}
    base = per["block task, eager kernel (baseline)"]
    print(f"E = {E}, n = {n}, C = {C} ({x.nbytes / 2**20:.0f} MiB), random-walk step {args.scale:g}; "
          f"{len(resolved)} scores; one thread; median of {args.repeats} alternating rounds")
    print()
    print("| part | µs / sample | eager block task / this |")
    print("|---|---:|---:|")
    for name, value in per.items():
        print(f"| {name} | {value:.2f} | {base / value:.2f}x |")


if __name__ == "__main__":
    main()
