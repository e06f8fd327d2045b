"""What `run` needs from the file system, checked before anything starts: the watch folders
and the state folder. `validate-config` asks the same questions without creating anything.
"""

from __future__ import annotations

import os
from pathlib import Path

from monitor.config import Config, WatchConfig
from monitor.errors import ConfigError, StoreError


def watch_key(printer: str) -> str:
    """The config key of a printer's watch folder, as errors name it."""
    return f"printers.{printer}.watch.dir" if printer else "watch.dir"


def check_watch_dir(watch: WatchConfig, *, printer: str = "", create: bool = True) -> None:
    """A folder that can be watched: present (or made when watch.create is on and `create`),
    a folder, readable. ConfigError names the key and the fix."""
    path, key = watch.dir, watch_key(printer)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key} {path}: is a file, not a folder; fix the path")
    if not path.exists():
        if not watch.create:
            raise ConfigError(f"{key} {path}: no such folder; create it, fix the path, or set "
                              "create = true in its [watch] table")
        if not create:
            _creatable(path, key)
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"{key} {path}: cannot create the folder "
                              f"({e.strerror or e})") from e
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{key} {path}: cannot read the folder (permission denied); give "
                          "the daemon's user read access")


def check_state_dir(cfg: Config) -> None:
    """The state folder is writable, or can be made (nothing is created)."""
    path = cfg.state_dir
    if path.exists():
        if not path.is_dir():
            raise StoreError(f"store.state_dir {path}: is a file, not a folder; fix the path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise StoreError(f"store.state_dir {path}: not writable (permission denied); set "
                             "store.state_dir or give the daemon's user write access")
        return
    _creatable(path, "store.state_dir")


def check_all(cfg: Config) -> None:
    """Everything above, for every printer, creating nothing (validate-config)."""
    for p in cfg.fleet():
        check_watch_dir(p.watch, printer=p.name, create=False)
    check_state_dir(cfg)


def _creatable(path: Path, key: str) -> None:
    """mkdir -p of `path` would succeed: its nearest existing ancestor is a writable folder."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{key} {path}: cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path}: cannot be created: {parent} is not writable")
