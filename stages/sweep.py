"""``tddyun sweep``: accuracy against pruning rate for several methods, from one logit store."""
from __future__ import annotations

import click

from .common import config_from_cli, params_options, user_errors
from .score import dask_client


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _rates(text: str) -> list[float]:
    try:
        return [float(t) for t in _names(text)]
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: expected comma-separated numbers in [0, 1)") from exc


@click.command()
@params_options
@click.option("--methods", default="td_dyun,dyun,tdds,random", show_default=True,
              help="Comma-separated score names (parameters from score.methods, else the defaults).")
@click.option("--rates", default="0.3,0.5,0.7,0.9", show_default=True, help="Comma-separated prune rates.")
@click.option("--seeds", default=3, show_default=True, type=int, help="Retrains per cell (seeds retrain.seed+i).")
@click.option("--workers", type=int, default=None, help="Score on a local dask cluster of N processes.")
@click.option("--scheduler", default=None, metavar="ADDRESS", help="Score on an existing dask scheduler.")
@click.option("--scheduler-file", type=click.Path(dir_okay=False), default=None)
@user_errors
def sweep(params_file, overrides, methods, rates, seeds, workers, scheduler, scheduler_file):
    """Rescore one store and retrain for every (method, rate, seed); resumable. Writes table.md/csv."""
    from pipeline.data import eval_split_of
    from pipeline.sweep import markdown_table, run_sweep
    from store.artifacts import read_json

    cfg = config_from_cli(params_file, overrides)
    with dask_client(workers, scheduler, scheduler_file) as client:
        rows = run_sweep(cfg, methods=_names(methods), rates=_rates(rates), seeds=seeds, client=client,
                         progress=False)
    from pathlib import Path

    full = Path(cfg.paths.sweep) / "full.json"
    full_acc = read_json(full)["final_test_accuracy"] if full.is_file() else None
    click.echo(markdown_table(rows, full_accuracy=full_acc, split=eval_split_of(cfg.data)))
    click.echo(f"written: {cfg.paths.sweep}/table.md, table.csv, cells.csv")
