"""The command line; the only place where exceptions become exit codes.

The commands live in daemon.py, reports.py, geometry.py, model.py and tools.py; they are registered
on the one group here, whose invoke() turns pbf-monitor's own errors into exit code 2.
"""

from __future__ import annotations

from typing import Any

import click

from monitor.cli import daemon, geometry, model, reports, tools
from monitor.errors import MonitorError

EXIT_ERROR = 2


class _Group(click.Group):
    """Turns pbf-monitor's own errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MonitorError as e:
            click.echo(f"pbf-monitor: error: {e}", err=True)
            ctx.exit(EXIT_ERROR)


@click.group(cls=_Group)
@click.version_option(package_name="pbf-monitor")
def main() -> None:
    """pbf-monitor: layer-by-layer defect monitoring for powder-bed-fusion printers."""


for _command in (*daemon.COMMANDS, *reports.COMMANDS, *geometry.COMMANDS, *model.COMMANDS,
                 *tools.COMMANDS):
    main.add_command(_command)
