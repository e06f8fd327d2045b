"""What the commands share: the --config option, finding and loading the config, logging."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

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
