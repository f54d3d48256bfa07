"""The ``tddyun`` command group: one subcommand per stage, plus ``run`` and ``inspect``."""
from __future__ import annotations

import importlib

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """TD-DyUn: train once, score every sample by its prediction dynamics, retrain on the kept ones."""


# (module, command attribute): each stage module defines one click command.
_COMMANDS = [
    ("stages.train", "train"),
    ("stages.train", "inspect"),
    ("stages.score", "score"),
    ("stages.retrain", "retrain"),
    ("stages.run", "run"),
    ("stages.sweep", "sweep"),
    ("stages.report", "report"),
]

for _module, _name in _COMMANDS:
    try:
        _mod = importlib.import_module(_module)
    except ModuleNotFoundError as _exc:  # a stage not built yet; any other import error is a bug
        if _exc.name != _module:
            raise
        continue
    main.add_command(getattr(_mod, _name))
