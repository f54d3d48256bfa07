"""``tddyun run``: the three stages in one command, without DVC, and a table against random pruning."""
from __future__ import annotations

import click
import numpy as np

from .common import config_from_cli, params_options, user_errors


def results_table(rows: list[tuple[str, str, float | None, float | None]]) -> str:
    """Markdown: run, kept fraction, final test accuracy (%), seconds."""
    lines = ["| run | kept | test accuracy (%) | train seconds |", "|---|---|---|---|"]
    for name, kept, acc, seconds in rows:
        acc_text = f"{100 * acc:.2f}" if acc is not None else "—"
        sec_text = f"{seconds:.1f}" if seconds is not None else "—"
        lines.append(f"| {name} | {kept} | {acc_text} | {sec_text} |")
    return "\n".join(lines)


@click.command()
@params_options
@click.option("--resume", is_flag=True, help="Continue stage one from its checkpoint instead of starting over.")
@click.option("--progress/--no-progress", default=None, help="Progress bars (default: when stderr is a terminal).")
@user_errors
def run(params_file, overrides, resume, progress):
    """All three stages: train (full data, logits recorded), score, retrain; plus a random-pruning baseline."""
    from pipeline.config import prune_rate_of
    from pipeline.data import load_data
    from pipeline.record import record_training
    from pipeline.retrain import retrain_from_keep_list, retrain_on
    from pipeline.scores import random_score
    from pipeline.select import select

    from .score import run_score

    cfg = config_from_cli(params_file, overrides)
    full = record_training(cfg, resume=resume, overwrite=not resume, progress=progress)
    summary = run_score(cfg)
    pruned = retrain_from_keep_list(cfg, progress=progress)
    p = prune_rate_of(cfg.score)
    rows = [("full data", "100%", full["final_test_accuracy"], full["train_seconds"]),
            (f"{cfg.score.select_by} (p = {p:g}, weights {summary['weighting']})", f"{pruned['kept_fraction']:.0%}",
             pruned["final_test_accuracy"], pruned["train_seconds"])]
    if cfg.retrain.random_baseline:
        data = load_data(cfg.data)
        labels = data.train.y.numpy()
        chance = select(random_score(len(labels), seed=cfg.score.seed), labels, prune_rate=p, method="top",
                        class_balanced=cfg.score.class_balanced)
        baseline = retrain_on(cfg, data, np.asarray(chance.keep_ids), None, progress=progress)
        rows.append((f"random (p = {p:g}, no weights)", f"{baseline['kept_fraction']:.0%}",
                     baseline["final_test_accuracy"], baseline["train_seconds"]))
    click.echo(results_table(rows))
    click.echo(f"budget {pruned['budget']}; outputs under {cfg.paths.store.rsplit('/', 1)[0]}/")
