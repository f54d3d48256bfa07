"""Stage two out of core: every requested score from the logit store, one block of samples at a time.

The store's logits (E, N, C) are read with ``dask.array.from_zarr(..., chunks=(T, block, C))``:
each task holds *every* epoch and *every* class of ``block`` samples, checks them for NaN/inf and
computes every requested score for them with ``pipeline.scores.compute_block``, so the store is
read once for all scores. The per-sample results, a few floats per sample, are gathered in
memory and finished with ``pipeline.scores.finalize`` (global ranks, ``random``). Peak memory
is about ``workers × (block_mb + a few × SLICE_MB)`` (a task scores its block in slices), never
proportional to N: the (T, N, C) array is never materialised.

The epoch and class axes must never be split inside a task: a reduction over a split axis
silently returns a per-chunk answer. ``check_unsplit`` checks the chunking before anything runs
and every task checks the block it got; both raise ``AssertionError`` explicitly, so ``python -O``
does not remove them.

Scheduler: dask's threaded scheduler by default (``num_workers`` = the usable cores, so at most
that many blocks are in memory at once), or a ``dask.distributed.Client`` that runs the same
graph on a cluster. ``device="cuda"`` runs the score functions on the worker's GPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from store import schema as S
from store.logits import LogitStore, labels_fingerprint
from store.schema import StoreError

__all__ = [
    "ScoreResult",
    "score_store",
    "choose_block",
    "slice_samples_of",
    "check_unsplit",
    "check_block",
    "check_labels",
    "check_data_config",
    "check_device",
    "usable_cores",
    "DATA_KEYS_IGNORED",
]

# Keys of the data section that say where the data lives or how to fetch it, not what it is:
# a store made on another machine (another data.root) is still the same data set.
DATA_KEYS_IGNORED = ("root", "download")

# Each task scores its block in slices of about this many MiB of float32 logits: the score
# functions' temporaries are several times their input, so they scale with the slice while the
# read (one decompression of each chunk) stays a whole, chunk-aligned block. 4 MiB: about 7
# slice-sized temporaries live at once (28 MiB a thread, within a shared 32 MiB L3 for two);
# 2, 4 and 8 MiB measured the same speed within noise (E=50, C=100), 32 MiB (above the mmap
# threshold) twice as slow.
SLICE_MB = 4.0

_NONFINITE = "__nonfinite__"  # a block task's report of NaN/inf logits, instead of its scores


@dataclass(frozen=True)
class ScoreResult:
    """What ``score_store`` returns.

    arrays: name -> (N,) scores in dataset order (every output of every method, e.g. td_dyun, wdu,
    tsdd); seconds: wall time of the read-and-score pass; bytes_read: logit bytes read from the
    store (uncompressed, T × N × C × itemsize); block: samples per task; epochs_read: T;
    scheduler: a short description ("threads(2)" or "distributed(tcp://...)").
    """

    arrays: dict[str, np.ndarray]
    seconds: float
    bytes_read: int
    block: int
    epochs_read: int
    num_blocks: int = 0
    scheduler: str = "threads"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_mb_s(self) -> float:
        """Read throughput in MB/s (10^6 bytes) over the whole pass."""
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else float("inf")


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------
def usable_cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def choose_block(block_mb: float, *, epochs: int, num_classes: int, chunk: int, num_samples: int,
                 itemsize: int = 4) -> int:
    """Samples per task: ``block × T × C × itemsize ≈ block_mb`` MiB, at most N.

    itemsize is that of the in-memory block (float32: 4). Normally a multiple of the store's
    sample chunk ``chunk``, so that every chunk is read (and decompressed) by exactly one task.
    When one chunk of all T epochs would exceed twice ``block_mb`` (a long trajectory), the
    chunk is split evenly into blocks of about ``block_mb`` instead: each part then decompresses
    the whole chunk again (slower reads), but memory stays bounded by ``block_mb``.
    """
    if not block_mb > 0:
        raise ValueError(f"score.block_mb = {block_mb!r}: expected a number of MiB > 0")
    per_sample = max(1, epochs * num_classes * itemsize)
    wanted = max(1, int(block_mb * 2**20 // per_sample))
    if wanted * 2 < chunk:
        parts = -(-chunk // wanted)  # ceil: the fewest parts of at most `wanted` samples
        return int(min(-(-chunk // parts), num_samples))
    block = max(1, wanted // chunk) * chunk
    return int(min(block, num_samples))


def slice_samples_of(*, slice_mb: float, block_mb: float, epochs: int, num_classes: int) -> int:
    """Samples per slice a block task scores at once: about ``min(slice_mb, block_mb)`` MiB of
    float32 logits (all ``epochs`` epochs, all classes), at least one."""
    return max(1, int(min(slice_mb, block_mb) * 2**20 // (epochs * num_classes * 4)))


def check_unsplit(chunks: tuple[tuple[int, ...], ...], *, epochs: int, num_classes: int) -> None:
    """Raise AssertionError unless every block holds all ``epochs`` epochs and all classes.

    chunks: a dask array's ``.chunks`` for (T, N, C). An explicit raise, not ``assert``: this
    guards correctness (a reduction over a split axis returns a per-chunk answer) and must
    survive ``python -O``.
    """
    if len(chunks) != 3:
        raise AssertionError(f"logit blocks must be (T, n, C), got chunks over {len(chunks)} axes")
    if tuple(chunks[0]) != (epochs,):
        raise AssertionError(
            f"the epoch axis is split into chunks {tuple(chunks[0])}; every task must hold all "
            f"{epochs} epochs of its samples")
    if tuple(chunks[2]) != (num_classes,):
        raise AssertionError(
            f"the class axis is split into chunks {tuple(chunks[2])}; every task must hold all "
            f"{num_classes} classes of its samples")


def check_block(shape: tuple[int, ...], *, epochs: int, num_classes: int, num_labels: int) -> None:
    """Raise AssertionError unless one task's block is (epochs, n, num_classes) with n labels."""
    if len(shape) != 3 or shape[0] != epochs or shape[2] != num_classes:
        raise AssertionError(
            f"a score task got a block of shape {tuple(shape)}; expected ({epochs}, n, {num_classes}): "
            "the epoch or class axis was split")
    if shape[1] != num_labels:
        raise AssertionError(f"a score task got {shape[1]} samples of logits but {num_labels} labels")


def check_device(device: str) -> None:
    """Refuse a device this process cannot use: a clear error instead of a torch traceback."""
    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"score.device = {device!r}: expected cpu, cuda or cuda:K")
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(
            f"score.device = {device!r}: CUDA is not available on this machine "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); use score.device=cpu")
    if ":" in device:
        index = int(device.split(":", 1)[1])
        if not 0 <= index < torch.cuda.device_count():
            raise RuntimeError(f"score.device = {device!r}: only {torch.cuda.device_count()} CUDA devices")


def check_labels(store: LogitStore, expected_labels: np.ndarray) -> None:
    """Refuse a store whose labels are not those of the configured data set (by fingerprint)."""
    expected = labels_fingerprint(np.asarray(expected_labels))
    found = store.fingerprint
    if expected != found or np.asarray(expected_labels).shape != (store.num_samples,):
        raise StoreError(
            store.path, "attrs.dataset.fingerprint",
            f"the configured data set's labels (N = {np.asarray(expected_labels).shape[0]}, "
            f"fingerprint {expected})",
            f"N = {store.num_samples}, fingerprint {found}")


def check_data_config(store: LogitStore, data: Mapping[str, Any], *, source: str = "params") -> None:
    """Refuse a store trained on another data section than the configured one.

    ``data``: the configured ``data`` section as a mapping. Keys in ``DATA_KEYS_IGNORED`` (where
    the data lives, whether to download it) are not compared. Every differing key is named with
    both values.
    """
    config = store.attrs.get(S.A_CONFIG) or {}
    recorded = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(recorded, Mapping):
        raise StoreError(store.path, "attrs.config.data", "the data section the store was trained on",
                         recorded)
    keys = sorted((set(recorded) | set(data)) - set(DATA_KEYS_IGNORED))
    diffs = [k for k in keys if recorded.get(k, "<missing>") != data.get(k, "<missing>")]
    if diffs:
        detail = "; ".join(
            f"data.{k} = {data.get(k, '<missing>')!r} in {source}, {recorded.get(k, '<missing>')!r} in the store"
            for k in diffs)
        raise StoreError(store.path, "attrs.config.data",
                         f"the configured data section ({detail})", {k: recorded.get(k) for k in diffs})


# ---------------------------------------------------------------------------------------------
# The block task
# ---------------------------------------------------------------------------------------------
def _block_task(x: np.ndarray, y: np.ndarray, *, resolved: dict, device: str, task_epochs: int,
                num_classes: int, slice_samples: int, kernel: str = "eager") -> np.ndarray:
    """One task: x (T, n, C) logits of a block, y (1, n, 1) labels → a (1, 1, 1) object array
    holding ``{output: (n,)}``, or a NaN/inf report ``{_NONFINITE: (per-epoch counts (T,), n_bad)}``.

    The block is scored in slices of ``slice_samples`` samples (every score is per sample, so
    this is exact): the score functions' temporaries (softmax, log-softmax, divergences: several
    times their input) then scale with the slice, not with the block read from the store. The
    native kernel's temporaries are a few floats per sample, so it takes the block whole.
    """
    import torch

    from pipeline.scores import native_checks

    epochs = task_epochs
    _tune_malloc()
    check_block(x.shape, epochs=epochs, num_classes=num_classes, num_labels=y.size)
    labels = y.reshape(-1)
    n = x.shape[1]
    holder = np.empty((1, 1, 1), dtype=object)
    if device != "cpu":
        check_device(device)  # on the worker: a cluster's workers may lack the GPU
    bad_per_epoch = np.zeros(epochs, dtype=np.int64)  # (T,) samples with NaN/inf, per epoch
    pieces: dict[str, list[np.ndarray]] = {}
    block = torch.from_numpy(np.ascontiguousarray(x))  # the store's dtype (float32 or float16)
    # the native kernel checks every logit for NaN/inf in its own pass: no separate check here
    kernel_checks = native_checks(kernel, device=device, resolved=resolved)
    if kernel_checks and block.dtype == torch.float32:
        # the native kernel's temporaries are per sample, not per element: one slice, no copy
        slice_samples = n
    bad_samples = _score_slices(block, labels, resolved, device=device, kernel=kernel, kernel_checks=kernel_checks,
                                slice_samples=slice_samples, bad_per_epoch=bad_per_epoch, pieces=pieces)
    if bad_samples:
        holder[0, 0, 0] = {_NONFINITE: (bad_per_epoch, bad_samples)}
    else:
        holder[0, 0, 0] = {name: np.concatenate(parts) for name, parts in pieces.items()}
    del block, x
    return holder


def _score_slices(block, labels: np.ndarray, resolved: dict, *, device: str, kernel: str, kernel_checks: bool,
                  slice_samples: int, bad_per_epoch: np.ndarray, pieces: dict[str, list[np.ndarray]]) -> int:
    """Score ``block`` (T, n, C) slice by slice into ``pieces`` (name -> per-slice arrays); returns
    the number of samples with NaN/inf (counted into ``bad_per_epoch``; then nothing is scored)."""
    import torch

    from pipeline.native import NonFiniteLogits
    from pipeline.scores import compute_block

    bad_samples = 0
    n = block.shape[1]
    for start in range(0, n, slice_samples):
        part = block[:, start:start + slice_samples]  # (T, k, C), a view
        # NaN/inf check: a row of a sample-epoch sums to NaN/inf if it holds any (a fast fused
        # reduction); only then (or on an overflowing sum) the exact per-element check
        check_first = bad_samples or not kernel_checks
        if check_first and not bool(torch.isfinite(part.sum(dim=2)).all()):
            bad_samples += _count_nonfinite(part, bad_per_epoch)
        if bad_samples:
            continue  # this block is reported, not scored; keep counting
        try:
            # the strided view: compute_block makes the contiguous float32 copy (its own, which
            # it may then use as scratch space)
            outputs = compute_block(part, labels[start:start + slice_samples], resolved, device=device,
                                    kernel=kernel, nonfinite="raise")
        except NonFiniteLogits:  # found by the native kernel: count exactly, report the block
            bad_samples += _count_nonfinite(part, bad_per_epoch)
            continue
        for name, values in outputs.items():
            values = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
            if values.shape != (part.shape[1],):
                raise AssertionError(f"compute_block output {name!r} has shape {values.shape}, "
                                     f"expected ({part.shape[1]},)")
            pieces.setdefault(name, []).append(values)
    return bad_samples


def _count_nonfinite(part, bad_per_epoch: np.ndarray) -> int:
    """Samples of ``part`` (T, k, C) holding NaN or inf in any epoch; adds each epoch's count of
    such samples to ``bad_per_epoch`` (T,)."""
    import torch

    finite = torch.isfinite(part).all(dim=2).numpy()  # (T, k)
    bad_per_epoch += (~finite).sum(axis=1)
    return int((~finite).any(axis=0).sum())


_LIBC: Any = None  # glibc via ctypes, False where absent; loaded once per process


def _glibc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _LIBC = libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else False
        except OSError:
            _LIBC = False
    return _LIBC


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 16 * 2**20
_TRIM_THRESHOLD_BYTES = 256 * 2**20
_malloc_tuned = False


def _tune_malloc() -> None:
    """Once per process (glibc only): serve allocations above 16 MiB by mmap, returned to the OS
    at once. glibc's default threshold floats up to 32 MiB as large buffers are freed, after
    which the slices' temporaries and zarr's chunk buffers pile up in per-thread heaps; on the
    bench store (E=50, C=100) this cut peak RSS by 300-500 MiB at no measurable cost in time
    (a 4 MiB threshold cut more but doubled the time). Fixing the mmap threshold also fixes
    the trim threshold at glibc's 128 KiB, so every freed slice temporary at the top of a heap
    went back to the OS and the next one page-faulted its pages in again (up to ~200k minor
    faults per 200 MiB block, doubling the scoring time); the trim threshold is therefore set
    to 256 MiB. Freed memory then stays in the threads' heaps for the next block (peak RSS is
    the high-water mark of ``workers`` blocks, flat in N); ``_release_free_memory`` hands it
    back once the pass is over. (Trimming after every block, as before, cost 1.1 µs a sample,
    a tenth of the scoring, to save about 30 MiB of peak RSS.) Process-wide, and meant for a
    process whose work is stage two (the CLI, a dask worker)."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    libc = _glibc()
    if libc:
        libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), after a scoring pass."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)


def _method_needing(resolved: dict, needed: int) -> str:
    """The method(s) whose trajectory needs ``needed`` epochs (for the error message)."""
    from pipeline.scores import epochs_needed

    names = []
    for name, params in resolved.items():
        try:
            if epochs_needed({name: params}) == needed:
                names.append(name)
        except (KeyError, TypeError, ValueError):  # a method that cannot be asked alone
            continue
    return ", ".join(names) or ", ".join(resolved)


def logit_blocks(store: LogitStore, *, epochs: int, block: int):
    """The store's logits as a dask array read with ``from_zarr(..., chunks=(T, block, C))``.

    The array spans all planned epochs, (E_planned, N, C); its *first epoch-chunk* is exactly the
    T epochs stage two reads, and only tasks of that chunk row are ever computed (see
    ``block_tasks``). Not slicing ``[:T]`` keeps the zarr read and the task that consumes it in one
    fused task, so a block is read by the task that scores it: no read runs ahead of the
    scoring, and memory stays at workers × block (a separate read task lets the threaded
    scheduler load blocks far ahead of the scoring: memory then grows with N).
    """
    import dask.array as da

    return da.from_zarr(store.logits_array(), chunks=(epochs, block, store.num_classes))


def block_tasks(store: LogitStore, func, *, epochs: int, block: int, token: str, **kwargs: Any) -> list:
    """One dask task per block of samples: ``func(x (T, n, C), y (1, n, 1), **kwargs)`` → a (1, 1, 1)
    object array. Returns the delayed tasks in block order (dataset order)."""
    import dask.array as da

    n, c = store.num_samples, store.num_classes
    x = logit_blocks(store, epochs=epochs, block=block)
    # what each task gets: the first epoch-chunk (the T epochs), every sample block, every class
    check_unsplit((tuple(x.chunks[0][:1]), x.chunks[1], x.chunks[2]), epochs=epochs, num_classes=c)
    y = da.from_array(store.labels.reshape(1, n, 1), chunks=(1, block, 1))  # broadcast over epochs
    out = da.map_blocks(
        func, x, y, dtype=object, chunks=(1, 1, 1), meta=np.empty((0, 0, 0), dtype=object),
        token=token, **kwargs,
    )  # (epoch-chunks, blocks, 1) object
    return list(out.to_delayed(optimize_graph=True)[0, :, 0])  # row 0: epochs 0..T-1


def _build_graph(store: LogitStore, resolved: dict, *, epochs: int, block: int, device: str,
                 slice_samples: int, kernel: str = "eager"):
    """The lazy per-block tasks (dask delayed objects, in block order)."""
    return block_tasks(store, _block_task, epochs=epochs, block=block, token="tddyun-score-block",
                       resolved=resolved, device=device, task_epochs=epochs, num_classes=store.num_classes,
                       slice_samples=slice_samples, kernel=kernel)


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """Limit torch's intra-op threads while ``workers`` dask threads each run torch code, so the
    two levels of parallelism do not oversubscribe the cores; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_threads(tasks: list, *, workers: int, progress: bool, device: str) -> list:
    import dask

    bar: contextlib.AbstractContextManager = contextlib.nullcontext()
    if progress:
        from dask.diagnostics import ProgressBar

        bar = ProgressBar(out=sys.stderr)
    threads = _torch_threads(usable_cores() // workers) if device == "cpu" else contextlib.nullcontext()
    with bar, threads:
        return list(dask.compute(*tasks, scheduler="threads", num_workers=workers))


def _run_client(tasks: list, *, client, progress: bool) -> list:
    futures = client.compute(tasks)
    try:
        if progress:
            from distributed import as_completed
            from tqdm import tqdm

            for future in tqdm(as_completed(futures), total=len(futures), desc="score", unit="block",
                               file=sys.stderr):
                if future.status == "error":
                    break  # gather re-raises it below
        return client.gather(futures)
    finally:
        for future in futures:
            future.release()


def score_store(
    store: LogitStore,
    resolved: dict,
    *,
    block_mb: float,
    device: str = "cpu",
    client=None,
    progress: bool = False,
    seed: int = 0,
    workers: int | None = None,
    slice_mb: float = SLICE_MB,
    kernel: str = "auto",
) -> ScoreResult:
    """Every score in ``resolved`` (from ``pipeline.scores.resolve_methods``) for all N samples.

    Reads the first T = ``epochs_needed(resolved)`` complete epochs once, in blocks of samples
    of about ``block_mb`` MiB (all epochs, all classes), computes every score per block
    (``compute_block``), then ``finalize`` (global ranks; ``random`` from ``seed``). Returns
    (N,) arrays in dataset order, with the same convention as the score functions (higher =
    more worth keeping).

    client: a ``dask.distributed.Client`` to run on (default: threads, ``workers`` of them,
    default the usable cores). slice_mb: each task scores its block in slices of about this
    many MiB of logits (exact; it bounds the score functions' temporaries). device: where the
    score functions run (cpu | cuda | cuda:K). kernel: auto | eager | native
    (``pipeline.scores.resolve_kernel``; resolved here, on the client, so a cluster's workers
    need the same compiler when it resolves to native).
    Errors: too few complete epochs (names the store, the number needed and the method), NaN or
    inf logits in the epochs used (names the store, the first such epoch and the sample count).
    """
    from pipeline.scores import epochs_needed, finalize, resolve_kernel

    if not resolved:
        raise ValueError("score.methods: expected at least one score")
    check_device(device)
    needed = int(epochs_needed(resolved))
    have = store.epochs_complete
    if needed > have:
        raise StoreError(
            store.path, f"attrs.{S.A_EPOCHS_COMPLETE}",
            f"at least {needed} complete epochs (the trajectory of {_method_needing(resolved, needed)})",
            have)
    if needed < 1:
        raise AssertionError(f"epochs_needed returned {needed}; expected >= 1")
    n, c = store.num_samples, store.num_classes
    logits = store.logits_array()
    chunk = int(logits.chunks[1])
    block = choose_block(block_mb, epochs=needed, num_classes=c, chunk=chunk, num_samples=n)
    slice_samples = slice_samples_of(slice_mb=slice_mb, block_mb=block_mb, epochs=needed, num_classes=c)
    kernel = resolve_kernel(kernel, device=device)
    tasks = _build_graph(store, resolved, epochs=needed, block=block, device=device,
                         slice_samples=slice_samples, kernel=kernel)

    start = time.perf_counter()
    if client is None:
        workers = workers or usable_cores()
        scheduler = f"threads({workers})"
        parts = _run_threads(tasks, workers=workers, progress=progress, device=device)
        _release_free_memory()  # the blocks' buffers, kept in the threads' heaps during the pass
    else:
        scheduler = f"distributed({client.scheduler.address})"
        parts = _run_client(tasks, client=client, progress=progress)
    results = [p[0, 0, 0] for p in parts]

    _raise_nonfinite(store, results, epochs=needed)
    names = list(results[0]) if results else []
    for r in results:
        if list(r) != names:
            raise AssertionError(f"blocks returned different outputs: {names} and {list(r)}")
    block_outputs = {name: np.concatenate([r[name] for r in results]) for name in names}
    arrays = finalize(block_outputs, resolved, num_samples=n, seed=seed)
    seconds = time.perf_counter() - start
    for name, values in arrays.items():
        if np.shape(values) != (n,):
            raise AssertionError(f"score {name!r} has shape {np.shape(values)}, expected ({n},)")
    itemsize = np.dtype(logits.dtype).itemsize
    return ScoreResult(
        arrays={k: np.asarray(v) for k, v in arrays.items()}, seconds=seconds,
        bytes_read=needed * n * c * itemsize, block=block, epochs_read=needed,
        num_blocks=len(tasks), scheduler=scheduler, extra={"kernel": kernel},
    )


def _raise_nonfinite(store: LogitStore, results: list[dict], *, epochs: int) -> None:
    reports = [r[_NONFINITE] for r in results if _NONFINITE in r]
    if not reports:
        return
    per_epoch = np.sum([rep[0] for rep in reports], axis=0)  # (T,) samples with NaN/inf per epoch
    samples = sum(rep[1] for rep in reports)
    bad_epochs = np.flatnonzero(per_epoch)
    shown = ", ".join(str(int(e)) for e in bad_epochs[:10]) + (", ..." if bad_epochs.size > 10 else "")
    raise StoreError(
        store.path, f"{S.LOGITS}[epoch {int(bad_epochs[0])}]",
        f"finite logits in the {epochs} epochs used",
        f"NaN or inf in {samples} samples, first at epoch {int(bad_epochs[0])} (epochs {shown})")
