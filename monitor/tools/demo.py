"""The demo: the real daemon on a temporary state dir, fed a synthetic build layer by layer.

The build has part events (a part breaks off, another distorts) and each layer's nominal
slice is written to `nominal/<build>/` before its image, with `[geometry] nominal` naming
them, so the daemon's part checks have something to find."""

from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
from rich.console import Console
from rich.markup import escape
from sqlalchemy.orm import Session

from monitor.config import Config, parse_config
from monitor.daemon.daemon import Daemon
from monitor.daemon.publisher import subscribe
from monitor.reports.report import build_report, to_table
from monitor.store.connect import open_db
from monitor.training.synth import BuildGenerator
from monitor.vision.stats import NO_DEFECT


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


NOMINAL_TEMPLATE = "nominal/{build}/layer_{layer:05d}.png"


def demo_config(workdir: Path, *, weights: Path | None = None) -> Config:
    data: dict[str, Any] = {
        "watch": {"dir": "watch", "settle_s": 0.5, "rescan_interval_s": 30},
        "geometry": {"nominal": NOMINAL_TEMPLATE},
        "store": {"state_dir": "state"},
        "publish": {"endpoint": free_tcp_endpoint(), "state_endpoint": free_tcp_endpoint(),
                    "heartbeat_interval_s": 1.0},
        "metrics": {"listen": ""},
    }
    if weights is not None:
        data["model"] = {"weights": str(weights)}
    return parse_config(data, base_dir=workdir)


def _describe(payload: dict[str, Any]) -> str:
    if payload["status"] != "ok":
        return f"[red]error[/red]: {escape(str(payload.get('error')))}"
    parts = []
    for name, c in payload["classes"].items():
        if name != NO_DEFECT and c["components"]:
            parts.append(f"{name} {100 * c['area_fraction']:.2f}% ({c['components']})")
    found = ", ".join(parts) or "no defects"
    return f"[green]ok[/green] {found}  [dim]{payload['latency_ms']:.0f} ms[/dim]"


def write_layer_file(path: Path, image: Any) -> None:
    """Write like a camera does: straight into the final name (close-after-write)."""
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.tobytes())


def _listen(endpoint: str, build: str, console: Console, received: dict[int, dict[str, Any]],
            connected: threading.Event, done: threading.Event) -> None:
    """The demo's subscriber: prints each layer and alarm of the build as it is published."""
    for topic, payload in subscribe(endpoint, stop=done):
        if topic == "heartbeat":
            connected.set()
        elif topic == "layer" and payload["build"] == build:
            received[payload["layer"]] = payload
            # soft_wrap: one line per layer, however narrow the terminal or pipe
            console.print(f"  layer {payload['layer']:>4}  {_describe(payload)}  "
                          f"[dim]seq {payload['seq']}[/dim]", soft_wrap=True)
        elif topic == "alarm":
            console.print(f"  [bold red]ALARM[/bold red] #{payload['id']} "
                          f"{payload['state']} {payload['severity']}: "
                          f"{escape(payload['rule'])} {payload['value']:.4g} > "
                          f"{payload['threshold']:.4g} at layer {payload['layer']}",
                          soft_wrap=True)


def _write_build(cfg: Config, workdir: Path, build: str, *, layers: int, size: int,
                 interval_s: float, seed: int, console: Console) -> None:
    """The synthetic build, a layer every `interval_s`: its nominal slice, then its image."""
    gen = BuildGenerator(size=size, layers=layers, seed=seed, part_events=True)
    for ev in gen.events_json():
        console.print(f"  [dim]part event: part {ev['part']} {ev.get('mode') or ev['kind']}"
                      f" in layers {ev['first_layer']}-{ev['last_layer']}[/dim]")
    for i in range(layers):
        layer = gen.layer(i)
        # the slice first: the daemon looks for it when the image arrives
        write_layer_file(workdir / NOMINAL_TEMPLATE.format(build=build, layer=i + 1),
                         gen.nominal(i))
        write_layer_file(cfg.watch.dir / build / f"layer_{i + 1:05d}.png", layer.image)
        time.sleep(interval_s)


def _read_report(cfg: Config, build: str) -> dict[str, Any]:
    engine = open_db(cfg.store_url, writer=False)
    try:
        with Session(engine) as s:
            return build_report(s, build)
    finally:
        engine.dispose()


def _print_table(console: Console, report: dict[str, Any]) -> None:
    table = to_table(report)
    width = console.width
    if not console.is_terminal:  # piped: a line per layer, however wide
        wide = console.options.update_width(100_000)  # measure() clamps to the width given
        console.width = max(width, console.measure(table, options=wide).maximum)
    console.print(table)
    console.width = width


def _print_where(console: Console, cfg: Config, workdir: Path, build: str, *, kept_dir: bool,
                 command: str) -> None:
    """Where the demo's database is, and the commands that look at the build."""
    if not kept_dir:
        console.print(f"the demo's database was deleted with its temporary folder {workdir}; "
                      f"keep it with {command} demo --workdir DIR", soft_wrap=True)
        return
    # A config naming the demo's folders, for the report, alarms and dashboard commands.
    kept = workdir / "demo.toml"
    kept.write_text('# Written by `pbf-monitor demo`: the demo\'s folders.\n[watch]\n'
                    '# Where the demo wrote its layers.\ndir = "watch"\n[geometry]\n'
                    '# The layers\' nominal slices.\n'
                    f'nominal = "{NOMINAL_TEMPLATE}"\n[store]\n'
                    '# The demo\'s database.\nstate_dir = "state"\n', encoding="utf-8")
    console.print(f"database kept in {cfg.store_url.removeprefix('sqlite:///')}; look at "
                  f"the build with\n  {command} report {build} -c {kept} --format html "
                  f"--out {build}.html\n  {command} dashboard -c {kept}", soft_wrap=True)


def run_demo(
    *,
    layers: int = 12,
    size: int = 512,
    interval_s: float = 1.0,
    seed: int = 7,
    workdir: Path | None = None,
    weights: Path | None = None,
    console: Console | None = None,
    command: str = "pbf-monitor",
) -> dict[str, Any]:
    """Run the demo; returns the build's report (also printed). `command` is how the hints
    at the end name pbf-monitor."""
    console = console or Console()
    own_tmp = None
    if workdir is None:
        own_tmp = tempfile.TemporaryDirectory(prefix="pbf-demo-")
        workdir = Path(own_tmp.name)
    cfg = demo_config(workdir, weights=weights)
    build = f"demo-{seed}"
    console.print(f"[bold]pbf-monitor demo[/bold]: {layers} layers of {size}x{size} px every "
                  f"{interval_s:g} s into {cfg.watch.dir / build}")
    cfg.watch.dir.mkdir(parents=True, exist_ok=True)  # the daemon watches only what exists
    daemon = Daemon(cfg)
    daemon.start()
    seg = daemon.segmenter
    assert seg is not None
    console.print(f"model {seg.info.sha256[:12]} on {seg.device}; publishing on "
                  f"{cfg.publish.endpoint}")
    received: dict[int, dict[str, Any]] = {}
    connected = threading.Event()
    done = threading.Event()
    listener = threading.Thread(
        target=_listen, args=(cfg.publish.endpoint, build, console, received, connected, done),
        name="demo-subscriber", daemon=True)
    listener.start()
    try:
        # Slow joiner: wait for a heartbeat so no layer message is sent before we listen.
        connected.wait(10)
        _write_build(cfg, workdir, build, layers=layers, size=size, interval_s=interval_s,
                     seed=seed, console=console)
        deadline = time.monotonic() + 60 + 10 * layers
        while len(received) < layers and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        done.set()
        daemon.stop()
        listener.join(5)
    report = _read_report(cfg, build)
    _print_table(console, report)
    console.print(f"{len(received)}/{layers} layer messages received")
    if own_tmp is not None:
        own_tmp.cleanup()
    _print_where(console, cfg, workdir, build, kept_dir=own_tmp is None, command=command)
    return report
