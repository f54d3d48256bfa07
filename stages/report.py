"""``tddyun report``: the run's figures, ``report.html`` and ``summary.md`` in ``paths.report``.

load config → read whatever artifacts exist (store, scores, keep-list, metrics, histories, sweep)
→ pipeline.report draws the figures and writes the folder atomically → print the summary table.
Absent inputs give "—" and a note, never an error; malformed ones are errors naming the file.
"""
from __future__ import annotations

import click

from stages.common import config_from_cli, params_options, user_errors


@click.command("report")
@params_options
@click.option("--quiet", is_flag=True, help="Print only where the report went, not the summary table "
              "(dvc.yaml: `make run` prints summary.md itself, also when DVC skips the stage).")
@user_errors
def report(params_file: str | None, overrides: tuple[str, ...], quiet: bool) -> None:
    """Write the report of the run (PNG figures, report.html, summary.md) into paths.report."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (pipeline.report draws on Agg canvases too)
    from pipeline.report import build_report

    config = config_from_cli(params_file, overrides)
    result = build_report(config)
    if not quiet:
        click.echo(result.summary_md, nl=False)
        click.echo()
    click.echo(f"report: {len(result.figures)} figures, report.html and summary.md in {result.folder} "
               f"({result.seconds:.1f} s)")
