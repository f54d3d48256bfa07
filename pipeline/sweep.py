"""Accuracy against pruning rate: rescore one logit store and retrain for every (method, rate, seed).

Each finished cell is a JSON file under ``{paths.sweep}/cells/`` holding a key of everything that
determines it (method parameters, rate, seed, selection/weighting, train/model/data config, store
fingerprint); a rerun skips the cells whose key matches, so an interrupted sweep resumes where it
stopped and a changed parameter reruns exactly the cells it affects.
"""
from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from store.artifacts import atomic_path, read_json, write_json
from store.logits import open_logits

from .compute import check_labels, score_store
from .config import Config
from .data import eval_split_of, load_data
from .prune import make_keep_list
from .retrain import retrain_on
from .scores import resolve_methods
from .weights import resolve_weighting

__all__ = ["run_sweep", "summarise", "markdown_table"]

TABLE_COLUMNS = ("method", "prune_rate", "mean", "std", "n")


def _cell_key(cfg: Config, *, method: str, params: dict, rate: float, seed: int, fingerprint: str) -> str:
    score = {k: v for k, v in asdict(cfg.score).items() if k not in ("methods", "select_by", "prune_rate",
                                                                      "keep_fraction", "device", "block_mb",
                                                                      "kernel")}
    train = {k: v for k, v in asdict(cfg.train).items() if k not in ("device", "num_threads", "test_every", "record",
                                                                      "record_loss", "logits_dtype")}
    # data.validation absent when null: the key it had before the field existed, so cells stay valid
    data = {k: v for k, v in asdict(cfg.data).items() if not (k == "validation" and v is None)}
    identity = {"method": method, "params": params, "rate": rate, "seed": seed, "score": score,
                "retrain": asdict(cfg.retrain), "train": train, "model": asdict(cfg.model),
                "data": data, "store": fingerprint}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _cell_path(root: Path, method: str, rate: float, seed: int) -> Path:
    return root / "cells" / f"{method}_p{rate:g}_s{seed}.json"


def run_sweep(cfg: Config, *, methods: list[str], rates: list[float], seeds: int, client=None,
              progress: bool | None = None, log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every missing cell and write cells.csv, table.csv, table.md and full.json under paths.sweep.

    Returns the aggregated rows (method, prune_rate, mean, std, n) of final test accuracy.
    """
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    if seeds < 1:
        raise ValueError(f"--seeds = {seeds}: expected an integer >= 1")
    for rate in rates:
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"--rates: {rate}: expected prune rates in [0, 1)")
    root = Path(cfg.paths.sweep)
    store = open_logits(cfg.paths.store)
    data = load_data(cfg.data)
    check_labels(store, data.train.y.numpy())
    labels = store.labels.astype(np.int64)
    cells: list[dict[str, Any]] = []
    for rate in rates:
        resolved = resolve_methods({m: cfg.score.methods.get(m) or {} for m in methods},
                                   epochs=store.epochs_complete, prune_rate=rate)
        wanted = {(m, s): (_cell_path(root, m, rate, s), _cell_key(cfg, method=m, params=resolved[m], rate=rate,
                                                                   seed=s, fingerprint=store.fingerprint))
                  for m in methods for s in range(seeds)}
        # a cell is done when its key matches and it was weighted as `weighting: auto` now resolves
        # (the key holds the configured scheme, so a changed default of auto must rerun the cell)
        scheme = {m: resolve_weighting(cfg.score.weighting, select_by=m, selection_method=cfg.score.selection)
                  for m in methods}
        done = {}
        for (m, s), (p, key) in wanted.items():
            cell = read_json(p) if p.is_file() else None
            if cell is not None and cell["key"] == key and cell.get("weighting") == scheme[m]:
                done[(m, s)] = cell
        cells += done.values()
        if len(done) == len(wanted):
            log(f"sweep p={rate:g}: all {len(done)} cells done, skipped")
            continue
        t0 = time.perf_counter()
        result = score_store(store, resolved, block_mb=cfg.score.block_mb, device=cfg.score.device, client=client,
                             seed=cfg.score.seed, kernel=cfg.score.kernel)
        log(f"sweep p={rate:g}: scored {len(methods)} methods in {time.perf_counter() - t0:.2f}s")
        for method in methods:
            keep = None
            for seed in range(seeds):
                if (method, seed) in done:
                    continue
                if keep is None:
                    keep = make_keep_list(result.arrays[method], labels, cfg.score, select_by=method, prune_rate=rate)
                path, key = wanted[(method, seed)]
                metrics = retrain_on(cfg, data, keep.ids, keep.weights, seed=cfg.retrain.seed + seed,
                                     progress=progress, log=lambda _: None)
                cell = {"key": key, "method": method, "prune_rate": rate, "seed": seed, "params": resolved[method],
                        "weighting": keep.weighting, **{k: v for k, v in metrics.items() if k != "history"},
                        "history": metrics["history"]}
                write_json(path, cell)
                cells.append(cell)
                log(f"sweep {method} p={rate:g} seed {seed}: {metrics['evaluated_on']} accuracy "
                    f"{metrics['final_test_accuracy']:.4f} "
                    f"({metrics['train_seconds']:.1f}s)")
    rows = summarise(cells, methods=methods, rates=rates)
    _write_outputs(cfg, root, cells, rows)
    return rows


def summarise(cells: list[dict[str, Any]], *, methods: list[str], rates: list[float]) -> list[dict[str, Any]]:
    """Mean and sample std (ddof 1; 0 for one seed) of final test accuracy per (method, rate)."""
    rows = []
    for method in methods:
        for rate in rates:
            acc = [c["final_test_accuracy"] for c in cells if c["method"] == method and c["prune_rate"] == rate]
            if acc:
                rows.append({"method": method, "prune_rate": rate, "mean": statistics.fmean(acc),
                             "std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "n": len(acc)})
    return rows


def markdown_table(rows: list[dict[str, Any]], *, full_accuracy: float | None, split: str = "test") -> str:
    """Methods as rows, prune rates as columns, 'mean ± std' accuracy in percent on ``split``
    (test, or validation when data.validation is set)."""
    rates = sorted({r["prune_rate"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["prune_rate"]): r for r in rows}
    lines = []
    if full_accuracy is not None:
        lines.append(f"Full data (stage one): {100 * full_accuracy:.2f}% {split} accuracy\n")
    lines.append("| method | " + " | ".join(f"p = {r:g}" for r in rates) + " |")
    lines.append("|---|" + "---|" * len(rates))
    for m in methods:
        cells = []
        for r in rates:
            row = by.get((m, r))
            cells.append(f"{100 * row['mean']:.2f} ± {100 * row['std']:.2f}" if row else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    n = sorted({r["n"] for r in rows})
    lines.append(f"\n{split.capitalize()} accuracy (%) after retraining on the kept samples, mean ± std over "
                 f"{'/'.join(map(str, n))} seeds.")
    return "\n".join(lines) + "\n"


def _write_outputs(cfg: Config, root: Path, cells: list[dict], rows: list[dict]) -> None:
    full = None
    if Path(cfg.paths.train_metrics).is_file():
        metrics = read_json(cfg.paths.train_metrics)
        full = metrics.get("final_test_accuracy")
        write_json(root / "full.json", {"final_test_accuracy": full, "train_seconds": metrics.get("train_seconds")})
    cell_columns = ("method", "prune_rate", "seed", "weighting", "n_keep", "kept_fraction", "epochs", "budget",
                    "final_test_accuracy", "best_test_accuracy", "train_seconds")
    with atomic_path(root / "cells.csv") as tmp:
        lines = [",".join(cell_columns)]
        for c in sorted(cells, key=lambda c: (c["method"], c["prune_rate"], c["seed"])):
            lines.append(",".join(str(c.get(k, "")) for k in cell_columns))
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_path(root / "table.csv") as tmp:
        tmp.write_text("\n".join([",".join(TABLE_COLUMNS)] + [",".join(str(r[k]) for k in TABLE_COLUMNS)
                                                              for r in rows]) + "\n")
    with atomic_path(root / "table.md") as tmp:
        tmp.write_text(markdown_table(rows, full_accuracy=full, split=eval_split_of(cfg.data)))
