"""The ``tddyun`` command group: one subcommand per stage, plus ``run``, ``sweep`` and ``inspect``."""
from __future__ import annotations

import click

from .report import report
from .retrain import retrain
from .run import run
from .score import score
from .sweep import sweep
from .train import inspect, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """TD-DyUn: train once, score every sample by its prediction dynamics, retrain on the kept ones."""


for _command in (train, score, retrain, report, run, sweep, inspect):
    main.add_command(_command)
