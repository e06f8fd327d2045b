"""Exceptions raised where a problem arises; only the CLI turns them into exit codes."""

from __future__ import annotations


class MonitorError(Exception):
    """Base class: a problem the user can fix, reported as one line without a traceback."""


class ConfigError(MonitorError):
    """The configuration is invalid; the message names the key."""


class WeightsError(MonitorError):
    """The weights file is missing, corrupt or not a pbf-monitor model."""


class DeviceError(MonitorError):
    """The requested compute device cannot be used."""


class ImageError(MonitorError):
    """An image file cannot be decoded into a layer."""


class StoreError(MonitorError):
    """The state directory or database cannot be used."""


class UnknownBuild(StoreError):
    """No build of that name (on that printer) in the database."""

    def __init__(self, build: str, printer: str | None = None) -> None:
        super().__init__(f"no build {build!r}" + (f" on printer {printer!r}" if printer else ""))
        self.build = build
        self.printer = printer
