"""Stage two throughput and memory: how close scoring comes to just reading the store.

Builds a synthetic logit store in the project's schema (random-walk float32 logits, E × N × C)
in a temporary folder, then measures in one run:

  (a) read:   read the store once with the same dask blocks as stage two, computing nothing
              (each task only sums its block);
  (b) score:  ``pipeline.compute.score_store`` with every registered score (trajectory: all);
  (b2)        the same with td_dyun alone;
  (c) naive:  an in-memory numpy version of the TDDS authors' scoring loop (all logits in RAM, a
              Python loop over windows and the epochs of each window: per-epoch softmax and
              reorder by sample index, |KL| between consecutive epochs, the window's spread,
              EMA weighting), on ``--ref-samples`` samples, compared per sample;
  (d) memory: peak RSS of (b) in a fresh subprocess, at N and at N/10.

(a), (b) and (b2) run back to back in each of ``--repeats`` rounds; timings are medians, and
b/a is the median of the rounds' own ratios (the machine's speed drifts between rounds). The
page cache is warm unless ``--cold`` (which evicts the store before each cold run). Prints a
markdown table and the ratios against the goals (b/a <= 1.2; c/b per sample >= 10; RSS flat
between the two N and < 1.5 GB).

    .venv/bin/python bench/score_throughput.py                      # E=50, C=100, N=150000 (~3 GB)
    .venv/bin/python bench/score_throughput.py --samples 20000 --epochs 20 --repeats 1   # quick check
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# ---------------------------------------------------------------------------------------------
# The synthetic store
# ---------------------------------------------------------------------------------------------
def build_store(path: Path, *, samples: int, epochs: int, classes: int, seed: int = 0) -> float:
    """Write a store of random-walk logits with a per-sample drift toward the label; returns seconds."""
    from store.logits import LogitWriter, create_logit_store

    rng = np.random.default_rng(seed)
    labels = (np.arange(samples) % classes).astype(np.int32)
    rng.shuffle(labels)
    start = time.perf_counter()
    create_logit_store(
        path, labels=labels, num_classes=classes, epochs=epochs,
        dataset={"name": "synthetic-bench", "split": "train"}, model="none", view="train",
        config={"data": {"name": "synthetic-bench"}}, versions={}, overwrite=True,
    )
    current = rng.standard_normal((samples, classes), dtype=np.float32)
    speed = (rng.uniform(-0.5, 2.0, size=samples) * 0.25).astype(np.float32)
    rows = np.arange(samples)
    with LogitWriter(path) as writer:
        for e in range(epochs):
            current = current + 0.6 * rng.standard_normal((samples, classes), dtype=np.float32)
            current[rows, labels] += speed
            writer.write_epoch(e, current.copy())
            writer.flush()  # one epoch buffer in flight: bounded memory
    return time.perf_counter() - start


def evict(path: Path) -> None:
    """Drop the store's files from the page cache (``posix_fadvise(DONTNEED)``, no root needed),
    so the next read comes from the disk, as it does when a store is larger than the RAM."""
    import os

    for f in path.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def ensure_store(path: Path, *, samples: int, epochs: int, classes: int, seed: int = 0) -> float:
    """Build the store unless a complete one of this shape is there already; returns the build
    seconds (0 when reused)."""
    from store.logits import open_logits

    if path.exists():
        try:
            store = open_logits(path)
            if store.epochs_complete == epochs and store.num_samples == samples and store.num_classes == classes:
                return 0.0
        except Exception:  # a half-built store from an interrupted run: build it again
            pass
    return build_store(path, samples=samples, epochs=epochs, classes=classes, seed=seed)


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------
# (a) read only, (b) score_store
# ---------------------------------------------------------------------------------------------
def _touch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.empty((1, 1, 1), dtype=object)
    out[0, 0, 0] = float(x.sum(dtype=np.float64))
    return out


def read_only(store, *, epochs: int, block: int, workers: int) -> float:
    """Seconds to read the first ``epochs`` epochs once, in the same (T, block, C) tasks as
    stage two (``pipeline.compute.block_tasks``), each only summing its block."""
    import dask

    from pipeline.compute import block_tasks

    tasks = block_tasks(store, _touch, epochs=epochs, block=block, token="bench-read")
    start = time.perf_counter()
    dask.compute(*tasks, scheduler="threads", num_workers=workers)
    return time.perf_counter() - start


def all_methods() -> dict:
    from pipeline.scores import SCORES

    return {name: ({} if name == "random" else {"trajectory": "all"}) for name in SCORES
            if name not in ("wdu", "tsdd")}  # td_dyun writes wdu and tsdd already


def score_once(store, methods: dict, *, block_mb: float, kernel: str = "auto"):
    from pipeline.compute import score_store
    from pipeline.scores import resolve_methods

    resolved = resolve_methods(methods, epochs=store.epochs_complete, prune_rate=0.5)
    return score_store(store, resolved, block_mb=block_mb, kernel=kernel)


# ---------------------------------------------------------------------------------------------
# (c) the TDDS authors' loop, in numpy, all in memory
# ---------------------------------------------------------------------------------------------
def tdds_reference(logits: np.ndarray, indexes: np.ndarray, *, window: int = 10, decay: float = 0.9) -> np.ndarray:
    """TDDS as the official code computes it: logits (T, N, C) as recorded in each epoch's
    (shuffled) batch order, indexes (T, N) the sample id of each row. For every window it
    re-takes the softmax of each epoch, scatters rows back to sample order, takes
    |P_{t+1} (log P_{t+1} - log P_t)| summed over classes, the L2 spread of those K-1 values
    around their mean, and adds it with the EMA weight decay * (1-decay)^(T-K-k)."""
    T, N, C = logits.shape
    moving = []
    k = 0
    while k < T - window + 1:
        probs = []
        for i in range(window):
            z = logits[k + i]
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            reordered = np.zeros_like(p)
            reordered[indexes[k + i]] = p  # their index_add, over a permutation
            probs.append(reordered)
        kd = []
        for j in range(window - 1):
            log = np.log(probs[j + 1] + 1e-8) - np.log(probs[j] + 1e-8)
            kd.append(np.abs(probs[j + 1] * np.nan_to_num(log)).sum(axis=1))
        kd = np.stack(kd)  # (K-1, N)
        mean = kd.mean(axis=0)
        spread = np.linalg.norm(kd - mean, axis=0)
        moving.append(spread * decay * (1 - decay) ** (T - window - k))
        k += 1
    return np.stack(moving).sum(axis=0)


def naive_seconds(store, *, samples: int, repeats: int) -> tuple[float, float]:
    """Median seconds of the reference loop on the first ``samples`` samples, and the max |diff|
    against this project's tdds (same data) as a sanity check."""
    from pipeline.scores import score_arrays

    z = np.ascontiguousarray(store.read_epochs()[:, :samples])  # (T, n, C) in RAM
    labels = store.labels[:samples]
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(samples) for _ in range(z.shape[0])])  # per-epoch batch order
    shuffled = np.stack([z[e, order[e]] for e in range(z.shape[0])])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ref = tdds_reference(shuffled, order)
        times.append(time.perf_counter() - start)
    ours = score_arrays(z, labels, {"tdds": {"trajectory": "all"}})["tdds"]
    return statistics.median(times), float(np.max(np.abs(ref - ours)) / max(1e-12, np.max(np.abs(ours))))


# ---------------------------------------------------------------------------------------------
# (d) peak RSS in a subprocess
# ---------------------------------------------------------------------------------------------
def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM, MiB). Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so a child would report the benchmark's own peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child_rss(store_path: str, block_mb: float) -> None:
    """Subprocess mode: score the store with every score, print peak RSS (MiB) as JSON."""
    import torch  # noqa: F401  (what the score functions import: part of the baseline)

    import pipeline.compute  # noqa: F401
    import pipeline.scores  # noqa: F401
    from store.logits import open_logits

    baseline = peak_rss_mib()
    store = open_logits(store_path)
    result = score_once(store, all_methods(), block_mb=block_mb)
    peak = peak_rss_mib()
    print(json.dumps({"baseline_mib": baseline, "peak_mib": peak, "seconds": result.seconds,
                      "block": result.block, "n": store.num_samples}))


def measure_rss(store_path: Path, block_mb: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child-rss", str(store_path), "--block-mb", str(block_mb)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=150_000, help="N of the main store")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--ref-samples", type=int, default=20_000, help="N of the in-memory reference loop")
    ap.add_argument("--block-mb", type=float, default=None, help="score.block_mb (default: the config default)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of (a), (b), (b eager), (b2); medians")
    ap.add_argument("--workdir", default="/tmp", help="where the temporary stores go")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--store-dir", default=None,
                    help="build the stores here and reuse them on the next run (default: a temporary folder)")
    ap.add_argument("--cold", action="store_true",
                    help="also time (a) and (b) with the store evicted from the page cache before each run")
    ap.add_argument("--child-rss", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.block_mb is None:
        from pipeline.config import ScoreConfig

        args.block_mb = ScoreConfig().block_mb
    if args.child_rss:
        child_rss(args.child_rss, args.block_mb)
        return

    from pipeline.compute import choose_block, usable_cores
    from store.logits import open_logits

    n, e, c = args.samples, args.epochs, args.classes
    small = max(1, n // 10)
    raw = (n + small) * e * c * 4
    free = shutil.disk_usage(args.workdir).free
    print(f"stores: {n} and {small} samples × {e} epochs × {c} classes float32 = {raw / 1e9:.2f} GB "
          f"uncompressed; {free / 1e9:.1f} GB free in {args.workdir}", flush=True)
    if free < 1.3 * raw + 1e9:
        sys.exit(f"not enough free disk in {args.workdir}: need about {1.3 * raw / 1e9:.1f} GB")
    tmp = Path(args.store_dir) if args.store_dir else Path(tempfile.mkdtemp(prefix="tddyun-bench-", dir=args.workdir))
    try:
        big_path, small_path = tmp / f"big-{n}x{e}x{c}.zarr", tmp / f"small-{small}x{e}x{c}.zarr"
        build_s = ensure_store(big_path, samples=n, epochs=e, classes=c)
        ensure_store(small_path, samples=small, epochs=e, classes=c, seed=1)
        store = open_logits(big_path)
        on_disk = disk_bytes(big_path)
        nbytes = e * n * c * 4
        print(f"{big_path} ({'built in %.1f s' % build_s if build_s else 'reused'}): {on_disk / 1e9:.2f} GB on disk "
              f"({nbytes / on_disk:.2f}x compression)", flush=True)
        workers = usable_cores()
        chunk = int(store.logits_array().chunks[1])
        block = choose_block(args.block_mb, epochs=e, num_classes=c, chunk=chunk, num_samples=n)

        methods = all_methods()
        td_only = {"td_dyun": {"trajectory": "all"}}
        cold = {}
        if args.cold:
            reads, scores = [], []
            for _ in range(args.repeats):
                evict(big_path)
                reads.append(read_only(store, epochs=e, block=block, workers=workers))
                evict(big_path)
                scores.append(score_once(store, methods, block_mb=args.block_mb).seconds)
            cold = {"read": statistics.median(reads), "score": statistics.median(scores),
                    "ratio": statistics.median(b / a for a, b in zip(reads, scores))}
            print(f"cold cache: (a) read {cold['read']:.2f} s, (b) score {cold['score']:.2f} s", flush=True)
        read_only(store, epochs=e, block=block, workers=workers)  # warm-up (page cache, imports)
        # rounds of (a), (b), (b eager), (b2) back to back: this machine's speed drifts by 20 %
        # over minutes (other tenants), so each ratio is taken within a round, then the median
        reads, runs, eager, td = [], [], [], []
        for _ in range(args.repeats):
            reads.append(read_only(store, epochs=e, block=block, workers=workers))
            runs.append(score_once(store, methods, block_mb=args.block_mb))
            eager.append(score_once(store, methods, block_mb=args.block_mb, kernel="eager").seconds)
            td.append(score_once(store, td_only, block_mb=args.block_mb).seconds)
            print(f"round: (a) {reads[-1]:.2f} s, (b) {runs[-1].seconds:.2f} s, (b eager) {eager[-1]:.2f} s, "
                  f"(b2) {td[-1]:.2f} s", flush=True)
        t_read, t_score = statistics.median(reads), statistics.median(r.seconds for r in runs)
        t_eager, t_td = statistics.median(eager), statistics.median(td)
        round_ratios = [r.seconds / a for a, r in zip(reads, runs)]  # b/a of each round
        ratio_ba = statistics.median(round_ratios)
        ratio_ba2 = statistics.median(b / a for a, b in zip(reads, td))
        kernel = runs[0].extra["kernel"]
        ref_n = min(args.ref_samples, n)
        t_naive, rel_diff = naive_seconds(store, samples=ref_n, repeats=args.repeats)
        print(f"(c) naive TDDS loop on {ref_n}: {t_naive:.2f} s (max rel. diff vs ours {rel_diff:.1e})", flush=True)
        rss_big = measure_rss(big_path, args.block_mb)
        rss_small = measure_rss(small_path, args.block_mb)
        print(f"(d) RSS: {rss_small} / {rss_big}", flush=True)
    finally:
        if not (args.keep or args.store_dir):
            shutil.rmtree(tmp, ignore_errors=True)

    mb = nbytes / 1e6
    per = lambda seconds, count: seconds / count * 1e6  # µs per sample
    print()
    print(f"E = {e}, C = {c}, N = {n} ({mb / 1e3:.2f} GB of float32 logits, {on_disk / 1e9:.2f} GB on disk); "
          f"block_mb = {args.block_mb:g} → {block} samples a block ({block * e * c * 4 / 2**20:.0f} MiB), "
          f"threads = {workers}; median of {args.repeats} rounds; warm page cache")
    print()
    print("| measurement | N | seconds | MB/s read | µs / sample |")
    print("|---|---:|---:|---:|---:|")
    print(f"| (a) read only, same blocks | {n} | {t_read:.2f} | {mb / t_read:.0f} | {per(t_read, n):.1f} |")
    print(f"| (b) score_store, all {len(methods)} scores ({len(runs[0].arrays)} outputs), {kernel} kernel | {n} | "
          f"{t_score:.2f} | {mb / t_score:.0f} | {per(t_score, n):.1f} |")
    print(f"| (b) the same, eager kernel (torch ops) | {n} | {t_eager:.2f} | {mb / t_eager:.0f} | "
          f"{per(t_eager, n):.1f} |")
    if cold:
        print(f"| (a) read only, cold page cache | {n} | {cold['read']:.2f} | {mb / cold['read']:.0f} | "
              f"{per(cold['read'], n):.1f} |")
        print(f"| (b) score_store, all scores, cold page cache | {n} | {cold['score']:.2f} | "
              f"{mb / cold['score']:.0f} | {per(cold['score'], n):.1f} |")
    print(f"| (b2) score_store, td_dyun only | {n} | {t_td:.2f} | {mb / t_td:.0f} | {per(t_td, n):.1f} |")
    print(f"| (c) naive in-memory TDDS loop (numpy) | {ref_n} | {t_naive:.2f} | – | {per(t_naive, ref_n):.1f} |")
    print(f"| (d) peak RSS of (b), subprocess | {rss_small['n']} | {rss_small['seconds']:.2f} | – | "
          f"{rss_small['peak_mib']:.0f} MiB (after imports {rss_small['baseline_mib']:.0f}) |")
    print(f"| (d) peak RSS of (b), subprocess | {rss_big['n']} | {rss_big['seconds']:.2f} | – | "
          f"{rss_big['peak_mib']:.0f} MiB (after imports {rss_big['baseline_mib']:.0f}) |")
    print()
    ratio_cb = per(t_naive, ref_n) / per(t_score, n)
    ratio_cb2 = per(t_naive, ref_n) / per(t_td, n)
    flat = rss_big["peak_mib"] / rss_small["peak_mib"]
    print(f"- b/a = {ratio_ba:.2f} (all scores), {ratio_ba2:.2f} (td_dyun), median of the rounds' ratios "
          f"(range {min(round_ratios):.2f}-{max(round_ratios):.2f})   goal <= 1.2: "
          f"{'met' if ratio_ba <= 1.2 else 'NOT met'}")
    if cold:
        print(f"- cold page cache: b/a = {cold['ratio']:.2f}, c/b per sample = "
              f"{per(t_naive, ref_n) / per(cold['score'], n):.1f}x")
    print(f"- c/b per sample = {ratio_cb:.1f}x (all scores), {ratio_cb2:.1f}x (td_dyun)   goal >= 10x: "
          f"{'met' if ratio_cb >= 10 else 'NOT met'}")
    print(f"- peak RSS {rss_small['peak_mib']:.0f} MiB at N = {rss_small['n']}, {rss_big['peak_mib']:.0f} MiB at "
          f"N = {rss_big['n']} (ratio {flat:.2f})   goal flat and < 1.5 GB: "
          f"{'met' if flat < 1.25 and rss_big['peak_mib'] < 1.5 * 1024 else 'NOT met'}")


if __name__ == "__main__":
    main()
