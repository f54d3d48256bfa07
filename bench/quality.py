"""Does TD-DyUn keep the right samples? Accuracy against pruning rate on CIFAR-10, all methods, one run.

    .venv/bin/python bench/quality.py                      # the full benchmark (about 1.5 h on 2 cores)
    .venv/bin/python bench/quality.py --seeds 1 --rates 0.5 --methods random,td_dyun   # a quick look

Stage one trains once (configs/cifar10-cpu.yaml: a seeded class-balanced 10,000-image subset of the
shared CIFAR-10 JPEGs, small_cnn width 16, 20 epochs) and records logits; every method is then a
rescore of that one store plus retrains (same_epochs budget) at each rate and seed, on the full
10,000-image test set. Finished cells are reused (tddyun sweep's resumable cells), so an
interrupted benchmark continues. Prints the table and the wall time of each part and writes them
to docs/benchmarks.md between the BEGIN/END quality markers.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402
from pipeline.record import record_training  # noqa: E402
from pipeline.sweep import markdown_table, run_sweep  # noqa: E402
from store.artifacts import read_json  # noqa: E402
from store.logits import open_logits  # noqa: E402

METHODS = "random,el2n,forgetting,aum,dyun,tdds,td_dyun"
BEGIN, END = "<!-- BEGIN quality -->", "<!-- END quality -->"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(ROOT / "configs" / "cifar10-cpu.yaml"))
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--rates", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    args = parser.parse_args()
    # sweeps test once, after the last epoch (the reported accuracy); stage one tests every epoch
    cfg = load_config(args.params, args.overrides)
    methods = [m for m in args.methods.split(",") if m]
    rates = [float(r) for r in args.rates.split(",")]

    t0 = time.perf_counter()
    stage_one = ensure_stage_one(cfg)
    t1 = time.perf_counter()
    sweep_cfg = load_config(args.params, args.overrides + ["train.test_every=0"])
    rows = run_sweep(sweep_cfg, methods=methods, rates=rates, seeds=args.seeds)
    t2 = time.perf_counter()

    table = markdown_table(rows, full_accuracy=stage_one["final_test_accuracy"])
    command = "python bench/quality.py " + " ".join(
        [f"--methods {args.methods}", f"--rates {args.rates}", f"--seeds {args.seeds}"]
        + [f"--set {o}" for o in args.overrides])
    cells = read_cells(Path(cfg.paths.sweep) / "cells.csv")
    retrain_seconds = sum(float(c["train_seconds"]) for c in cells)
    text = "\n".join([
        BEGIN,
        f"Measured {time.strftime('%Y-%m-%d')} with `{command}` (params `{Path(args.params).name}`: "
        f"{cfg.data.name} subset {cfg.data.subset}, {cfg.model.name} width {cfg.model.width}, "
        f"{cfg.train.epochs} epochs, batch {cfg.train.batch_size}, lr {cfg.train.lr}, budget {cfg.retrain.budget}).",
        "",
        table,
        "| part | wall seconds |",
        "|---|---|",
        f"| stage one: train {cfg.train.epochs} epochs on {stage_one['num_train']} images, logits recorded "
        f"| {stage_one['train_seconds']:.0f} |",
        f"| rescore + retrain, {len(cells)} cells (sum of retrain times) | {retrain_seconds:.0f} |",
        f"| this run (cells already done are reused) | {t2 - t0:.0f} |",
        END,
    ])
    print(text)
    out = write_section(Path(args.out), text, BEGIN, END,
                        heading="Accuracy against pruning rate (CIFAR-10, 10k subset)")
    print(f"\nwritten to {out} (stage one {t1 - t0:.0f}s, sweep {t2 - t1:.0f}s)")


def ensure_stage_one(cfg) -> dict:
    """Train and record stage one unless its store is complete (resuming a partial one);
    returns stage one's metrics."""
    store_path = Path(cfg.paths.store)
    if not (store_path.exists() and open_logits(store_path).epochs_complete == cfg.train.epochs):
        record_training(cfg, resume=store_path.exists(), progress=False)
    return read_json(cfg.paths.train_metrics)


def write_section(out: Path, text: str, begin: str, end: str, *, heading: str) -> Path:
    """Replace the text between the ``begin``/``end`` markers of ``out`` (``text`` holds both);
    without them, append it under ``heading``."""
    doc = out.read_text() if out.exists() else "# Benchmarks\n\n"
    if begin in doc and end in doc:
        doc = doc[: doc.index(begin)] + text + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + f"\n\n## {heading}\n\n" + text + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc)
    return out


def read_cells(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]


if __name__ == "__main__":
    main()
