"""What the commands share: the --config option, finding and loading the config, logging."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import IO

import click
from rich.console import Console, RenderableType

from monitor.config import Config, load_config

CONFIG_OPTION = click.option(
    "--config", "-c", "config_path", type=click.Path(path_type=Path),
    default=None, help="config.toml (default: ./config.toml if present, else built-in defaults).",
)


def find_config(config_path: Path | None) -> Config:
    """The config --config names, else ./config.toml if present, else the defaults."""
    if config_path is None and Path("config.toml").is_file():
        config_path = Path("config.toml")
    return load_config(config_path)


def setup_logging(level: str) -> None:
    """Log to stderr at `level`."""
    # journald stamps every line itself: no second timestamp when stderr goes there.
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else (
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt)
    # Alembic's INFO lines (context, "Running upgrade ...") say nothing an operator needs;
    # the store logs the schema change itself.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def print_table(table: RenderableType, *, file: IO[str] | None = None) -> None:
    """Print a rich table; to a pipe or a file as wide as it needs (a line per row, names
    whole), to a terminal at its width."""
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=natural_width(console, table))
    console.print(table)


def natural_width(console: Console, renderable: RenderableType) -> int:
    """The width a renderable takes unwrapped (at least the console's)."""
    wide = console.options.update_width(100_000)  # measure() clamps to the width it is given
    return max(console.width, console.measure(renderable, options=wide).maximum)


def command_name() -> str:
    """How to run this pbf-monitor again: the bare name only when it is the one on PATH."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py" or not argv0.name.startswith("pbf-monitor"):
        return f"{sys.executable} -m monitor"
    found = shutil.which(argv0.name)
    if found and Path(found).resolve() == argv0.resolve():
        return argv0.name
    return str(argv0.resolve())
