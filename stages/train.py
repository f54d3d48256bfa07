"""``tddyun train`` (stage one) and ``tddyun inspect`` (describe a logit store)."""
from __future__ import annotations

from pathlib import Path

import click

from .common import config_from_cli, params_options, user_errors


@click.command()
@params_options
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store (another data set or config).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@user_errors
def train(params_file, overrides, resume, overwrite, progress):
    """Stage one: train on the full data and record every epoch's logits in paths.store."""
    from pipeline.record import record_training

    cfg = config_from_cli(params_file, overrides)
    metrics = record_training(cfg, resume=resume, overwrite=overwrite, progress=progress)
    click.echo(f"stage one: {metrics['epochs']} epochs on {metrics['num_train']} samples, "
               f"final test accuracy {metrics['final_test_accuracy']:.4f}, "
               f"{metrics['train_seconds']:.1f}s; logits in {cfg.paths.store}")


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@click.command()
@click.argument("path", type=click.Path(exists=False))
@user_errors
def inspect(path):
    """Describe the logit store at PATH: shape, dtype, complete epochs, data set, view, size."""
    from store import schema as S
    from store.logits import open_logits

    store = open_logits(path)
    logits = store.logits_array()
    raw = store.num_samples * store.num_classes * store.epochs_complete * logits.dtype.itemsize
    size = _size_on_disk(Path(path))
    ds = store.attrs[S.A_DATASET]
    compressors = ", ".join(str(c.to_dict()) for c in logits.compressors) or "none"
    rows = [
        ("path", str(path)),
        ("logits", f"{tuple(logits.shape)} (epoch, sample, class) {logits.dtype}, chunks {tuple(logits.chunks)}"),
        ("epochs complete", f"{store.epochs_complete} of {store.epochs_planned}"),
        ("data set", f"{ds.get('name')} ({ds.get('split')}, {store.num_samples} samples, {store.num_classes} classes)"),
        ("fingerprint", store.fingerprint[:16] + "..."),
        ("model", str(store.attrs[S.A_MODEL])),
        ("view", str(store.attrs[S.A_VIEW])),
        ("per-sample loss", "yes" if store.has_loss else "no"),
        ("size on disk", f"{size / 2**20:.2f} MiB"),
        ("compression", f"{compressors}; ratio {raw / size:.2f}x on complete epochs" if size and raw
         else compressors),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")
