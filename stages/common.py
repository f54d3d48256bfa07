"""What every stage command shares: --params/--set, config loading, clean error exits."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import click

from pipeline.config import Config, ConfigError, load_config

DEFAULT_PARAMS = "params.yaml"


def params_options(command: Callable) -> Callable:
    """Add ``--params FILE`` and repeatable ``--set key.sub=value`` to a click command."""
    command = click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help="Override one parameter, e.g. --set score.prune_rate=0.7 (YAML value). Repeatable.",
    )(command)
    command = click.option(
        "--params", "params_file", type=click.Path(dir_okay=False), default=None,
        help=f"Params file (default: {DEFAULT_PARAMS} when present, else built-in defaults).",
    )(command)
    return command


def config_from_cli(params_file: str | None, overrides: tuple[str, ...]) -> Config:
    if params_file is None and Path(DEFAULT_PARAMS).is_file():
        params_file = DEFAULT_PARAMS
    return load_config(params_file, overrides)


def user_errors(command: Callable) -> Callable:
    """Turn the project's validation errors into a one-line click error (exit status 2 or 1)."""
    from store.schema import StoreError

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as exc:
            raise click.UsageError(str(exc)) from exc
        except (StoreError, ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper
