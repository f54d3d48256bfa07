"""``tddyun retrain`` (stage three): a fresh model on the keep-list, with the weighted loss."""
from __future__ import annotations

import click

from .common import config_from_cli, params_options, user_errors


@click.command()
@params_options
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def retrain(params_file, overrides, progress):
    """Stage three: retrain from scratch on paths.keep with loss mean_i(w_i * CE_i)."""
    from pipeline.retrain import retrain_from_keep_list

    cfg = config_from_cli(params_file, overrides)
    m = retrain_from_keep_list(cfg, progress=progress)
    speed = f", {m['speedup_vs_full']:.2f}x faster than stage one" if m.get("speedup_vs_full") else ""
    click.echo(f"stage three: {m['n_keep']}/{m['n_total']} samples ({m['kept_fraction']:.0%}), "
               f"{m['epochs']} epochs ({m['budget']}), final test accuracy {m['final_test_accuracy']:.4f}"
               f"{speed}; metrics in {cfg.paths.retrain_metrics}")
