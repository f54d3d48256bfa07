"""``tddyun score``: stage two. Logit store → scores.zarr, keep.csv, score summary.

load config → open the store (paths.store) → check it matches the configured data → resolve the
score methods → read the store once, out of core, computing every score (pipeline.compute) →
select by ``score.select_by`` → importance weights → write the three outputs, each atomically.
Rescoring with other parameters reads only the store: seconds, no retraining.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Iterator

import click
import numpy as np

from pipeline.config import Config, ConfigError, config_to_dict, prune_rate_of
from stages.common import config_from_cli, params_options, user_errors


@contextlib.contextmanager
def dask_client(workers: int | None, scheduler: str | None, scheduler_file: str | None) -> Iterator[Any]:
    """None (threads), a LocalCluster of ``workers`` processes, or a client of an existing cluster."""
    given = [name for name, value in (("--workers", workers), ("--scheduler", scheduler),
                                      ("--scheduler-file", scheduler_file)) if value is not None]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)}: expected at most one of them")
    if not given:
        yield None
        return
    from distributed import Client, LocalCluster

    if workers is not None:
        if workers < 1:
            raise click.UsageError(f"--workers = {workers}: expected an integer >= 1")
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    if scheduler_file and not Path(scheduler_file).is_file():
        raise click.UsageError(f"--scheduler-file {scheduler_file}: file not found")
    try:
        client = Client(address=scheduler, scheduler_file=scheduler_file, timeout="30s")
    except OSError as exc:
        where = scheduler or f"the scheduler in {scheduler_file}"
        raise click.ClickException(f"cannot connect to {where}: {exc}") from exc
    with client:
        yield client


def run_score(config: Config, *, client=None, progress: bool = False) -> dict[str, Any]:
    """Stage two on ``config``; returns the summary (also written to paths.score_summary)."""
    from pipeline.compute import check_data_config, check_labels, score_store
    from pipeline.data import load_train_labels
    from pipeline.scores import SCORES, ScoreParamError, resolve_methods
    from pipeline.prune import make_keep_list
    from store.artifacts import atomic_path, write_json, write_keep_csv, write_scores
    from store.logits import open_logits

    started = time.perf_counter()
    sc, paths = config.score, config.paths
    resolved_config = config_to_dict(config)
    store = open_logits(paths.store)
    check_data_config(store, resolved_config["data"], source=config.source)
    check_labels(store, load_train_labels(config.data))

    prune_rate = prune_rate_of(sc)
    try:
        resolved = resolve_methods(sc.methods, epochs=store.epochs_complete, prune_rate=prune_rate)
    except ScoreParamError as exc:
        raise ScoreParamError(f"{config.source}: {exc} (store {store.path}: "
                              f"{store.epochs_complete} complete epochs)") from exc
    if sc.select_by not in resolved:  # config validation checks this too; keep the stage honest
        raise ConfigError(f"{config.source}: score.select_by = {sc.select_by!r}: expected one of the "
                          f"names in score.methods ({', '.join(resolved)})")

    result = score_store(store, resolved, block_mb=sc.block_mb, device=sc.device, client=client, kernel=sc.kernel,
                         progress=progress, seed=sc.seed)
    arrays = result.arrays
    labels = store.labels.astype(np.int64)
    keep = make_keep_list(np.asarray(arrays[sc.select_by]), labels, sc, select_by=sc.select_by,
                          prune_rate=prune_rate)
    keep_ids, weights, scheme = keep.ids, keep.weights, keep.weighting

    directions = {}
    for name in resolved:
        spec = SCORES[name]
        for output in getattr(spec, "outputs", (name,)):
            directions[output] = spec.direction
    store_info = {"path": str(store.path), "fingerprint": store.fingerprint,
                  "epochs_complete": store.epochs_complete, "num_samples": store.num_samples,
                  "num_classes": store.num_classes}

    scores_attrs = {
        "config": resolved_config, "methods": resolved, "prune_rate": prune_rate,
        "select_by": sc.select_by, "directions": directions, "store": store_info,
        "versions": store.attrs.get("versions", {}),
    }
    classes, counts = np.unique(labels[keep_ids], return_counts=True)
    summary = {
        "n_keep": int(keep_ids.size),
        "n_total": store.num_samples,
        "prune_rate": prune_rate,
        "select_by": sc.select_by,
        "selection": sc.selection,
        "class_balanced": sc.class_balanced,
        "weighting": scheme,
        "kept_per_class": {str(int(k)): int(v) for k, v in zip(classes, counts)},
        "weight_min": float(weights.min()),
        "weight_mean": float(weights.mean()),
        "weight_max": float(weights.max()),
        "seconds": time.perf_counter() - started,
        "score_seconds": result.seconds,
        "read_mb": result.bytes_read / 1e6,
        "read_throughput_mb_s": result.throughput_mb_s,
        "block_samples": result.block,
        "block_mb": sc.block_mb,
        "num_blocks": result.num_blocks,
        "epochs_read": result.epochs_read,
        "scheduler": result.scheduler,
        "device": sc.device,
        "kernel": result.extra.get("kernel"),
        "methods": resolved,
        "store": store_info,
        "outputs": {"scores": paths.scores, "keep": paths.keep},
        "config": resolved_config,
    }
    # All three are written under temporary names first and renamed only once all are whole:
    # an interrupted run leaves the previous outputs (or none), never a half-written or mixed set.
    with atomic_path(paths.scores) as scores_tmp, atomic_path(paths.keep) as keep_tmp, \
            atomic_path(paths.score_summary) as summary_tmp:
        write_scores(scores_tmp, arrays, scores_attrs)
        write_keep_csv(keep_tmp, keep_ids, weights, keep.scores)
        write_json(summary_tmp, summary)
    return summary


@click.command("score")
@params_options
@click.option("--workers", type=int, default=None,
              help="Start a local dask cluster of N worker processes (loopback) for this run.")
@click.option("--scheduler", "scheduler", default=None, metavar="ADDRESS",
              help="Run on an existing dask.distributed scheduler, e.g. tcp://host:8786.")
@click.option("--scheduler-file", "scheduler_file", type=click.Path(dir_okay=False), default=None,
              help="Run on the dask.distributed scheduler described by this file.")
@click.option("--progress/--no-progress", default=False, help="Show a progress bar over blocks.")
@user_errors
def score(params_file: str | None, overrides: tuple[str, ...], workers: int | None, scheduler: str | None,
          scheduler_file: str | None, progress: bool) -> None:
    """Stage two: score every sample from the logit store, select, weight; write scores, keep-list, summary."""
    config = config_from_cli(params_file, overrides)
    with dask_client(workers, scheduler, scheduler_file) as client:
        summary = run_score(config, client=client, progress=progress)
    click.echo(
        f"score: kept {summary['n_keep']}/{summary['n_total']} (prune_rate {summary['prune_rate']:g}, "
        f"by {summary['select_by']}, {summary['selection']}, weights {summary['weighting']} "
        f"{summary['weight_min']:.3g}..{summary['weight_max']:.3g}); read {summary['read_mb']:.1f} MB "
        f"in {summary['score_seconds']:.2f} s ({summary['read_throughput_mb_s']:.0f} MB/s, "
        f"{summary['epochs_read']} epochs, {summary['scheduler']}) → {config.paths.keep}"
    )
