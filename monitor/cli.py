"""The command line; the only place where exceptions become exit codes."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from monitor.config import Config, load_config
from monitor.errors import MonitorError

EXIT_ERROR = 2
CONFIG_OPTION = click.option(
    "--config", "-c", "config_path", type=click.Path(path_type=Path),
    default=None, help="config.toml (default: ./config.toml if present, else built-in defaults).",
)


class _Group(click.Group):
    """Turns pbf-monitor's own errors into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MonitorError as e:
            click.echo(f"pbf-monitor: error: {e}", err=True)
            ctx.exit(EXIT_ERROR)


def _load(config_path: Path | None) -> Config:
    if config_path is None and Path("config.toml").is_file():
        config_path = Path("config.toml")
    return load_config(config_path)


def _setup_logging(level: str) -> None:
    import os

    # journald stamps every line itself: no second timestamp when stderr goes there.
    journald = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if journald else (
        "%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    logging.basicConfig(level=level, stream=sys.stderr, format=fmt)


@click.group(cls=_Group)
@click.version_option(package_name="pbf-monitor")
def main() -> None:
    """pbf-monitor: layer-by-layer defect monitoring for powder-bed-fusion printers."""


@main.command()
@CONFIG_OPTION
def run(config_path: Path | None) -> None:
    """Run the daemon until SIGTERM or Ctrl-C; SIGHUP reloads alarm rules, thresholds and weights.

    Under systemd (Type=notify) it reports READY=1 once everything is up, and WATCHDOG=1
    only while the worker keeps making progress.
    """
    from monitor.daemon import sdnotify
    from monitor.daemon.daemon import Daemon

    cfg = _load(config_path)
    _setup_logging(cfg.log.level)
    log = logging.getLogger("monitor")
    stop, hup = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            hup.set()
            return
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    daemon = Daemon(cfg)
    daemon.start()
    sdnotify.notify("READY=1", f"STATUS=watching {cfg.watch.dir}")
    watchdog = sdnotify.watchdog_interval()
    beat = watchdog / 2 if watchdog else 1.0
    try:
        while not stop.wait(min(beat, 1.0)):
            if hup.is_set():
                hup.clear()
                _reload(daemon, config_path, log)
            if watchdog and daemon.healthy(within_s=watchdog / 2):
                sdnotify.notify("WATCHDOG=1")
    finally:
        sdnotify.notify("STOPPING=1", "STATUS=stopping")
        daemon.stop()


def _reload(daemon: Any, config_path: Path | None, log: logging.Logger) -> None:
    """SIGHUP: re-read the config; a bad one is logged and the running one kept."""
    from monitor.daemon import sdnotify

    sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        ignored = daemon.reload(_load(config_path))
    except MonitorError as e:
        log.error("reload refused, keeping the running configuration: %s", e)
    else:
        log.info("reloaded alarm rules, thresholds and weights")
        if ignored:
            log.warning("changed settings that need a restart: %s", ", ".join(ignored))
    sdnotify.notify("READY=1")


@main.command("validate-config")
@click.argument("file", type=click.Path(path_type=Path))
def validate_config(file: Path) -> None:
    """Check a config file and the weights it names."""
    from monitor.alarms.engine import AlarmEngine
    from monitor.errors import ConfigError
    from monitor.vision.model import read_info

    cfg = load_config(file)
    info = read_info(cfg.model.weights)
    unknown = set(cfg.model.thresholds) - set(info.class_names)
    if unknown:
        raise ConfigError(f"{file}: model.thresholds.{sorted(unknown)[0]}: unknown class; the "
                          f"weights' classes are {', '.join(info.class_names)}")
    try:
        AlarmEngine(cfg.alarms, class_names=info.class_names,
                    part_regions=[r.name for r in cfg.regions if r.kind == "part"])
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from e
    click.echo(f"{file}: ok (watch {cfg.watch.dir}, weights {cfg.model.weights.name} with "
               f"classes {', '.join(info.class_names)}, database {cfg.store_url})")


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@CONFIG_OPTION
@click.option("--weights", type=click.Path(path_type=Path), help="Override model.weights.")
@click.option("--out", type=click.Path(path_type=Path), help="Write a colour overlay PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def infer(image: Path, config_path: Path | None, weights: Path | None, out: Path | None,
          as_json: bool) -> None:
    """Segment one image and print its per-class statistics."""
    import cv2
    from rich.table import Table

    from monitor.errors import ImageError
    from monitor.vision.imaging import decode, overlay
    from monitor.vision.segmenter import Segmenter
    from monitor.vision.stats import layer_stats

    cfg = _load(config_path)
    seg = Segmenter.from_config(cfg, weights)
    try:
        data = image.read_bytes()
    except OSError as e:
        raise ImageError(f"{image}: cannot read ({e.strerror or e})") from e
    try:
        gray = decode(data, max_pixels=cfg.watch.max_pixels)
    except ImageError as e:
        raise ImageError(f"{image}: {e}") from e
    result = seg.predict(gray, probs=False)
    stats = layer_stats(result.masks, seg.class_names, pixel_size_mm=cfg.camera.pixel_size_mm,
                        max_components=cfg.store.max_components)
    if out is not None:
        ok, buf = cv2.imencode(".png", overlay(gray, result.masks, seg.class_names))
        if ok:
            out.write_bytes(buf.tobytes())
    if as_json:
        click.echo(json.dumps({
            "image": str(image), "width": stats.width, "height": stats.height,
            "model_sha256": seg.info.sha256, "device": str(seg.device),
            "infer_ms": result.infer_ms, "classes": stats.summary(),
        }))
        return
    t = Table(title=f"{image.name}: {stats.width}x{stats.height}, {result.infer_ms:.0f} ms on "
                    f"{seg.device}")
    for col in ("class", "area %", "area mm²", "components", "largest px"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c in stats.classes.values():
        t.add_row(c.name, f"{100 * c.area_fraction:.3f}", f"{c.area_mm2:.2f}",
                  str(c.components), str(c.largest_component_px))
    Console().print(t)


def _client_curve(cfg: Config, server_key: Path | None, client_secret: Path | None) -> Any:
    """CURVE for a client: both files given, or none (plain)."""
    from monitor.daemon.security import CurveClient

    if (server_key is None) != (client_secret is None):
        raise MonitorError("--server-key and --client-secret go together (CURVE on), or "
                           "neither")
    if server_key is None or client_secret is None:
        return None
    return CurveClient(server_key, client_secret)


CURVE_OPTIONS = [
    click.option("--server-key", type=click.Path(path_type=Path),
                 help="CURVE: the daemon's public key file (server.key)."),
    click.option("--client-secret", type=click.Path(path_type=Path),
                 help="CURVE: this client's secret key file (NAME.key_secret)."),
]


def curve_options(f: Any) -> Any:
    for opt in reversed(CURVE_OPTIONS):
        f = opt(f)
    return f


def _control(cfg: Config, msg: dict[str, Any], *, endpoint: str | None = None,
             server_key: Path | None = None, client_secret: Path | None = None,
             timeout_s: float = 5.0) -> dict[str, Any]:
    from monitor.daemon.control import request

    return request(endpoint or cfg.publish.state_endpoint, msg, timeout_s=timeout_s,
                   curve=_client_curve(cfg, server_key, client_secret))


@main.command("subscribe")
@CONFIG_OPTION
@click.option("--endpoint", help="PUB endpoint (default: publish.endpoint from the config).")
@click.option("--state-endpoint", help="State endpoint (default: publish.state_endpoint).")
@click.option("--topic", "topics", multiple=True, help="Topic prefix; repeatable (default: all).")
@click.option("--count", type=int, default=0, help="Exit after this many messages.")
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Exit after this many seconds without a message.")
@click.option("--no-state", is_flag=True, help="Do not ask the state endpoint first.")
@curve_options
def subscribe_cmd(config_path: Path | None, endpoint: str | None, state_endpoint: str | None,
                  topics: tuple[str, ...], count: int, timeout_s: float | None,
                  no_state: bool, server_key: Path | None, client_secret: Path | None) -> None:
    """Print published messages as JSON lines; warns on stderr about gaps in seq.

    First prints the daemon's state (open alarms, the last layer of each active build) as a
    line with topic "state", then every message after it, so a subscriber that joins
    mid-build starts consistent.
    """
    import queue as queue_mod

    from monitor.daemon.control import ControlError
    from monitor.daemon.publisher import subscribe

    cfg = _load(config_path)
    endpoint = endpoint or cfg.publish.endpoint
    curve = _client_curve(cfg, server_key, client_secret)
    # Connect first, then ask for the state: every message committed after the state's seq
    # then reaches this subscriber.
    stop = threading.Event()
    inbox: queue_mod.Queue[tuple[str, dict[str, Any]] | None] = queue_mod.Queue()

    def pump() -> None:
        try:
            for item in subscribe(endpoint, topics or ("",), timeout_s=timeout_s, stop=stop,
                                  curve=curve):
                inbox.put(item)
        finally:
            inbox.put(None)

    thread = threading.Thread(target=pump, name="subscriber", daemon=True)
    thread.start()
    last_seq: int | None = None
    try:
        if not no_state:
            time.sleep(0.3)  # let the SUB connection and its subscriptions reach the daemon
            try:
                state = _control(cfg, {"cmd": "state"}, endpoint=state_endpoint,
                                 server_key=server_key, client_secret=client_secret)
            except ControlError as e:
                click.echo(f"pbf-monitor: no state ({e}); printing live messages only",
                           err=True)
            else:
                state.pop("ok", None)
                last_seq = int(state.get("seq", 0))
                click.echo(json.dumps({"topic": "state", **state}))
        n = 0
        while True:
            item = inbox.get()
            if item is None:
                return
            topic, payload = item
            seq = payload.get("seq")
            if isinstance(seq, int):
                if last_seq is not None and seq <= last_seq:
                    continue  # already reflected in the state (or a re-send after a crash)
                if last_seq is not None and seq > last_seq + 1:
                    click.echo(f"pbf-monitor: missed messages {last_seq + 1}..{seq - 1}",
                               err=True)
                last_seq = seq
            click.echo(json.dumps({"topic": topic, **payload}), nl=True)
            n += 1
            if count and n >= count:
                return
    finally:
        stop.set()
        thread.join(2)


@main.command("alarms")
@CONFIG_OPTION
@click.option("--build", help="Only this build.")
@click.option("--open", "open_only", is_flag=True, help="Only open or acknowledged alarms.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
def alarms_cmd(config_path: Path | None, build: str | None, open_only: bool,
               as_json: bool) -> None:
    """List alarms from the database, newest first."""
    from rich.table import Table
    from sqlalchemy.orm import Session

    from monitor.daemon.publisher import alarm_message
    from monitor.store.queries import alarm_records

    cfg = _load(config_path)
    engine = _reader(cfg)
    try:
        with Session(engine) as s:
            rows = [alarm_message(a)
                    for a in alarm_records(s, build=build, open_only=open_only)]
    finally:
        engine.dispose()
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    t = Table(title=f"{len(rows)} alarm(s)")
    for col in ("id", "build", "layer", "class", "rule", "severity", "state", "value"):
        t.add_column(col)
    for r in rows:
        t.add_row(str(r["id"]), r["build"], str(r["layer"]), r["class"], r["rule"],
                  r["severity"], r["state"], f"{r['value']:.4g}")
    Console().print(t)


@main.command()
@click.argument("alarm_id", type=int)
@CONFIG_OPTION
@curve_options
def ack(alarm_id: int, config_path: Path | None, server_key: Path | None,
        client_secret: Path | None) -> None:
    """Acknowledge an open alarm (through the running daemon, which publishes it)."""
    reply = _control(_load(config_path), {"cmd": "ack", "id": alarm_id},
                     server_key=server_key, client_secret=client_secret)
    a = reply["alarm"]
    click.echo(f"alarm {a['id']} acknowledged ({a['build']} layer {a['layer']} {a['rule']})")


@main.command()
@click.argument("build")
@click.option("--class", "cls", help="Only this class (default: every class and stalls).")
@click.option("--printer", default="", help="Printer of the build (fleets).")
@click.option("--unmute", is_flag=True, help="Lift the mute instead.")
@CONFIG_OPTION
@curve_options
def mute(build: str, cls: str | None, printer: str, unmute: bool, config_path: Path | None,
         server_key: Path | None, client_secret: Path | None) -> None:
    """Stop a build (or one class of it) from opening alarms."""
    _control(_load(config_path), {"cmd": "unmute" if unmute else "mute", "build": build,
                                  "class": cls, "printer": printer},
             server_key=server_key, client_secret=client_secret)
    what = f"class {cls} of build {build}" if cls else f"build {build}"
    click.echo(f"{'unmuted' if unmute else 'muted'} {what}")


@main.command("test-alarm")
@click.option("--severity", type=click.Choice(["warning", "critical"]), default="warning",
              show_default=True)
@click.option("--hook", "run_hook", is_flag=True,
              help="Also run alarms.hook.command (it may really pause the machine).")
@CONFIG_OPTION
@curve_options
def test_alarm(severity: str, run_hook: bool, config_path: Path | None,
               server_key: Path | None, client_secret: Path | None) -> None:
    """Make the running daemon publish a test alarm (rule "test") end to end."""
    reply = _control(_load(config_path), {"cmd": "test-alarm", "severity": severity,
                                          "hook": run_hook},
                     server_key=server_key, client_secret=client_secret)
    click.echo(f"test alarm published with seq {reply['alarm']['seq']}"
               + (" and the hook started" if reply.get("hook") else ""))


@main.command()
@CONFIG_OPTION
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to serve on (loopback by default).")
def dashboard(config_path: Path | None, port: int, address: str) -> None:
    """The live dashboard (Streamlit, the 'dashboard' extra); reads the database read-only."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise MonitorError("the dashboard needs Streamlit: pip install 'pbf-monitor[dashboard]'")
    cfg = _load(config_path)  # fail here, in one line, rather than inside Streamlit
    app = Path(__file__).parent / "reports" / "dashboard_app.py"
    args = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
            "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", "--"]
    if cfg.source is not None:
        args += ["--config", str(cfg.source.resolve())]
    click.echo(f"dashboard on http://{address}:{port} (database {cfg.store_url})")
    sys.stdout.flush()
    # Become Streamlit rather than wait for it: a SIGTERM to this command (a service stop, a
    # test's cleanup) then reaches the server instead of leaving it running as an orphan.
    os.execv(sys.executable, args)


@main.command()
@click.option("--size", type=click.IntRange(64), default=2048, show_default=True,
              help="Side of the generated layer images.")
@click.option("--layers", type=click.IntRange(1), default=3, show_default=True,
              help="Images per backend measurement (median reported).")
@click.option("--e2e-layers", type=click.IntRange(3), default=20, show_default=True,
              help="Layers through the real daemon for the latency percentiles.")
@click.option("--seed-size", type=click.IntRange(0), default=512, show_default=True,
              help="Image side for the width-64 seed model on a CPU (0 = skip).")
@click.option("--memory-size", type=click.IntRange(0), default=4096, show_default=True,
              help="Layer side for the peak-memory measurement in a fresh process (0 = skip).")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights (default: bundled).")
def bench(size: int, layers: int, e2e_layers: int, seed_size: int, memory_size: int,
          weights: Path | None) -> None:
    """Measure inference speed (a benchmark, minutes): backends against eager fp32 PyTorch,
    the machine's matmul rate, end-to-end latency on the daemon, backlog rate, peak memory.
    Prints a table, then one JSON line."""
    from rich.table import Table

    from monitor.config import DEFAULT_WEIGHTS
    from monitor.tools.bench import run_bench

    _setup_logging("WARNING")
    console = Console(stderr=True)
    res = run_bench(weights or DEFAULT_WEIGHTS, size=size, layers=layers,
                    e2e_layers=e2e_layers, seed_size=seed_size, memory_size=memory_size,
                    progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    t = Table(title=f"inference at {size}x{size} px on {res.summary['device']} "
                    f"({res.summary['threads']} threads); matmul "
                    f"{res.summary['matmul_gflops']:.0f} GFLOP/s")
    for col in ("what", "ms / image", "x eager", "GFLOP/s", "of matmul"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for r in res.rows:
        t.add_row(r["what"], f"{r['ms']:.0f}", f"{r['speedup']:.2f}", f"{r['gflops']:.0f}",
                  f"{r['gflops'] / res.summary['matmul_gflops']:.0%}")
    Console().print(t)
    s = res.summary
    click.echo(f"end to end: p50 {s['e2e_p50_ms']:.0f} ms, p95 {s['e2e_p95_ms']:.0f} ms, "
               f"p99 {s['e2e_p99_ms']:.0f} ms for {s['infer_ms']:.0f} ms of inference "
               f"({s['e2e_over_infer']:.2f}x); backlog {s['backlog_layers_per_s']:.2f} "
               f"layers/s ({s['backlog_over_infer_rate']:.2f}x one over the inference time); "
               f"peak memory {s['peak_rss_mb']:.0f} MB")
    if memory_size:
        click.echo(f"a fresh process serving one {memory_size} px layer: "
                   f"{s['model_loaded_rss_mb']:.0f} MB with the model loaded, "
                   f"{s['layer_peak_rss_mb']:.0f} MB at peak")
    click.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                           for k, v in s.items()}))


@main.command()
@click.option("--layers", type=click.IntRange(2), default=2000, show_default=True)
@click.option("--size", type=click.IntRange(64), default=128, show_default=True,
              help="Side of the generated layer images.")
@click.option("--warmup", type=click.IntRange(0), default=200, show_default=True,
              help="Layers before memory is taken as the baseline.")
@click.option("--every", type=click.IntRange(1), default=50, show_default=True,
              help="Sample memory and open files every N layers.")
@click.option("--max-growth-mb", type=float, default=30.0, show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), help="Weights (default: bundled).")
def soak(layers: int, size: int, warmup: int, every: int, max_growth_mb: float,
         weights: Path | None) -> None:
    """Run many small layers through a daemon process (a benchmark, minutes): memory growth
    after warm-up, open files, layers lost. Prints samples, then one JSON line; exits 2 if
    a target is missed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from monitor.tools.soak import run_soak

    with Progress(TextColumn("soak"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rss]}"), console=Console(stderr=True)) as bar:
        task = bar.add_task("soak", total=layers, rss="")

        def show(res: Any) -> None:
            s = res.samples[-1]
            bar.update(task, completed=s.layer, rss=f"{s.rss_mb:.1f} MB, {s.fds} open files")

        res = run_soak(layers=layers, size=size, warmup=warmup, every=every, weights=weights,
                       progress=show)
    for s in res.samples:
        click.echo(f"layer {s.layer:>6}: {s.rss_mb:8.1f} MB resident, {s.fds} open files")
    click.echo(json.dumps(res.summary(max_growth_mb)))
    failed = res.failures(max_growth_mb)
    if failed:
        raise MonitorError("soak: " + "; ".join(failed))


@main.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@CONFIG_OPTION
def db_upgrade(config_path: Path | None) -> None:
    """Upgrade the schema to this version's (the daemon also does it at start); a SQLite
    file is copied aside first."""
    from monitor.store import migrate
    from monitor.store.connect import make_engine

    cfg = _load(config_path)
    engine = make_engine(cfg.store_url, writer=True)
    try:
        before = migrate.current(engine)
        backup = migrate.upgrade(engine, cfg.store_url)
        click.echo(f"{cfg.store_url}: schema {before or 'empty'} -> {migrate.head()}"
                   + (f" (backup {backup})" if backup else ""))
    finally:
        engine.dispose()


@main.group()
def keys() -> None:
    """CURVE keys for the daemon's endpoints."""


@keys.command("generate")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", default="server", show_default=True,
              help="Key name: NAME.key (public) and NAME.key_secret (secret, mode 0600).")
def keys_generate(directory: Path, name: str) -> None:
    """Generate a CURVE key pair (the daemon's, or a client's)."""
    from monitor.daemon.security import generate_keys

    public, secret = generate_keys(directory, name)
    click.echo(f"public key {public}\nsecret key {secret}")


def _reader(cfg: Config) -> Any:
    from monitor.store.connect import open_db

    return open_db(cfg.store_url, writer=False)


@main.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def builds(config_path: Path | None, as_json: bool) -> None:
    """List the builds in the database."""
    from rich.table import Table
    from sqlalchemy.orm import Session

    from monitor.store.queries import list_builds

    engine = _reader(_load(config_path))
    with Session(engine) as s:
        rows = list_builds(s)
    if as_json:
        click.echo(json.dumps(rows))
        return
    t = Table(title="builds")
    for col in ("build", "layers", "first", "last", "errors"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["build"], str(r["layers"]), str(r["first_layer"]), str(r["last_layer"]),
                  str(r["errors"]))
    Console().print(t)


@main.command()
@click.argument("build")
@CONFIG_OPTION
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "html"]),
              default="table")
@click.option("--out", type=click.Path(path_type=Path), help="Write to a file, not stdout.")
@click.option("--layers", "layer_range", help="Only layers A:B (inclusive), A: or :B.")
@click.option("--printer", default=None, help="Printer of the build (fleets).")
def report(build: str, config_path: Path | None, fmt: str, out: Path | None,
           layer_range: str | None, printer: str | None) -> None:
    """Report of one build: a table, JSON, CSV, or a self-contained HTML file with plots."""
    from sqlalchemy.orm import Session

    from monitor.reports import report as rep

    span = rep.parse_layers(layer_range) if layer_range else None
    engine = _reader(_load(config_path))
    with Session(engine) as s:
        if fmt == "html":
            from monitor.reports.html import render_html

            html = render_html(s, build, layers=span, printer=printer)
            if out is None:
                raise MonitorError("--format html needs --out FILE.html")
            out.write_text(html, encoding="utf-8")
            click.echo(f"wrote {out} ({len(html) / 1e6:.1f} MB)")
            return
        data = rep.build_report(s, build, layers=span, printer=printer)
    if fmt == "table":
        console = Console(file=out.open("w", encoding="utf-8") if out else None)
        console.print(rep.to_table(data))
        return
    text = json.dumps(data, indent=1) if fmt == "json" else rep.to_csv(data)
    if out:
        out.write_text(text, encoding="utf-8")
    else:
        click.echo(text)


@main.command()
@click.option("--layers", type=click.IntRange(1), default=12, show_default=True)
@click.option("--size", type=click.IntRange(64), default=512, show_default=True)
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True,
              help="Seconds between layers.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Keep the watch folder and database here (default: a temporary folder).")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights to use.")
def demo(layers: int, size: int, interval_s: float, seed: int, workdir: Path | None,
         weights: Path | None) -> None:
    """Run the daemon on a synthetic build and print what a subscriber receives."""
    from monitor.tools.demo import run_demo

    _setup_logging("WARNING")
    report = run_demo(layers=layers, size=size, interval_s=interval_s, seed=seed,
                      workdir=workdir, weights=weights)
    if len([r for r in report["layers"] if r["status"] == "ok"]) < layers:
        raise MonitorError(f"demo: only {len(report['layers'])} of {layers} layers processed")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", type=click.IntRange(1), default=40, show_default=True)
@click.option("--size", type=click.IntRange(64), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out: Path, layers: int, size: int, seed: int) -> None:
    """Write a synthetic build (images, masks, manifest) in the dataset format."""
    from rich.progress import Progress

    from monitor.training.synth import write_dataset

    with Progress() as progress:
        task = progress.add_task(f"synth {out}", total=layers)
        manifest = write_dataset(out, layers=layers, size=size, seed=seed,
                                 progress=lambda i: progress.update(task, completed=i + 1))
    click.echo(f"wrote {manifest}")


@main.command()
@click.argument("datasets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Weights file to write (NAME.safetensors; NAME.json is its model card).")
@click.option("--width", type=click.IntRange(1), default=16, show_default=True,
              help="U-Net base channels (the seed's model is 64).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--steps", "steps_per_epoch", type=click.IntRange(1), default=100,
              show_default=True, help="Optimizer steps per epoch.")
@click.option("--tile", type=click.IntRange(16), default=256, show_default=True,
              help="Training tile side at native resolution (multiple of 16).")
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="AdamW peak rate.")
@click.option("--pos-weight", default="auto", show_default=True,
              help="Weight of positive pixels: auto (sqrt of neg/pos per class), none, or a "
                   "number.")
@click.option("--defect-bias", type=click.FloatRange(0, 1), default=0.7, show_default=True,
              help="Share of tiles centred on a defect pixel.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2,
              show_default=True, help="Share of layers held out (whole blocks of layers).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="Data-loading processes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint.")
def train(datasets: tuple[Path, ...], out: Path, width: int, epochs: int,
          steps_per_epoch: int, tile: int, batch: int, lr: float, pos_weight: str,
          defect_bias: float, val_fraction: float, device: str, workers: int, seed: int,
          resume: bool) -> None:
    """Train a U-Net on dataset folders; keeps the best epoch by validation defect IoU."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from monitor.training.train import TrainOptions
    from monitor.training.train import train as run_training

    _setup_logging("INFO")
    opts = TrainOptions(width=width, epochs=epochs, steps_per_epoch=steps_per_epoch, tile=tile,
                        batch=batch, lr=lr, pos_weight=pos_weight, defect_bias=defect_bias,
                        val_fraction=val_fraction, device=device, workers=workers, seed=seed)
    opts.check()  # before the progress bars, so a bad option is one line
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        ep = progress.add_task("epochs", total=epochs, info="")
        st = progress.add_task("steps", total=steps_per_epoch, info="")

        def on_progress(phase: str, done: int, total: int, fig: dict[str, Any]) -> None:
            if phase == "step":
                progress.update(st, completed=done, info=f"loss {fig['loss']:.4f}")
            else:
                iou = fig.get("mean_iou_defects")
                progress.update(ep, completed=done,
                                info="" if iou is None else f"val defect IoU {iou:.3f}")
                progress.reset(st, info="")

        result = run_training(list(datasets), out, opts, resume=resume, on_progress=on_progress)
    click.echo(f"wrote {result.weights} (best epoch {result.best_epoch}) and {result.card}")


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@CONFIG_OPTION
@click.option("--weights", type=click.Path(path_type=Path), help="Override model.weights.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--sweep", is_flag=True,
              help="Also recommend a per-class threshold (best IoU over a grid).")
def evaluate(dataset: Path, config_path: Path | None, weights: Path | None, as_json: bool,
             sweep: bool) -> None:
    """Per-class IoU, Dice, precision, recall and per-layer detection on a dataset.

    Uses the daemon's tiling and thresholds from the config.
    """
    from rich.progress import Progress

    from monitor.training.dataset import open_dataset
    from monitor.training.evaluate import ThresholdSweep, metrics_json, metrics_table
    from monitor.training.evaluate import evaluate as run_eval
    from monitor.vision.segmenter import Segmenter

    cfg = _load(config_path)
    ds = open_dataset(dataset)
    seg = Segmenter.from_config(cfg, weights)
    sw = ThresholdSweep(seg.class_names) if sweep else None
    with Progress(transient=True, disable=as_json) as progress:
        task = progress.add_task(f"evaluate {dataset}", total=len(ds.names))
        counts = run_eval(ds, seg, sweep=sw,
                          progress=lambda n: progress.update(task, completed=n))
    if as_json:
        out = metrics_json(counts)
        out.update({"dataset": str(dataset), "weights": str(weights or cfg.model.weights),
                    "model_sha256": seg.info.sha256})
        if sw is not None:
            out["recommended_thresholds"] = sw.best()
        click.echo(json.dumps(out))
        return
    console = Console()
    console.print(metrics_table(counts, title=f"{dataset} with {seg.info.sha256[:12]}"))
    if sw is not None:
        for name, b in sw.best().items():
            console.print(f"{name}: threshold {b['threshold']:.2f} gives IoU {b['iou']:.3f}")


@main.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path), required=True,
              help="Weights to calibrate.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Write the calibrated weights here (default: replace WEIGHTS).")
@CONFIG_OPTION
def calibrate(dataset: Path, weights: Path, out: Path | None, config_path: Path | None) -> None:
    """Set the per-class thresholds stored in a weights file to those with the best IoU on a
    labelled dataset (config's model.thresholds still override them)."""
    from rich.progress import Progress

    from monitor.training.dataset import open_dataset
    from monitor.training.evaluate import calibrate as run_calibration

    cfg = _load(config_path)
    ds = open_dataset(dataset)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"calibrate on {dataset}", total=len(ds.names))
        best = run_calibration(weights, ds, out or weights, tile_size=cfg.model.tile_size,
                               tile_overlap=cfg.model.tile_overlap,
                               progress=lambda n: progress.update(task, completed=n))
    for name, b in best.items():
        click.echo(f"{name}: threshold {b['threshold']:.2f} (IoU {b['iou']:.3f})")
    click.echo(f"wrote {out or weights}")


@main.group()
def dataset() -> None:
    """Make datasets (images, per-class masks, manifest) for training and evaluation."""


@dataset.command("import-peregrine")
@click.argument("hdf5", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--class-ids", default="0,5,8,9,10,11", show_default=True,
              help="Peregrine class ids, in channel order, comma-separated.")
@click.option("--class-names", default=None,
              help="Channel names, comma-separated (default: the v2023 names of the ids).")
@click.option("--layers", "layer_range", default=None,
              help="0-based layer range A:B (B exclusive), A: or :B (default: all).")
def import_peregrine_cmd(hdf5: Path, out: Path, class_ids: str, class_names: str | None,
                         layer_range: str | None) -> None:
    """Convert an ORNL Peregrine v2023 HDF5 build into a dataset folder."""
    from rich.progress import Progress

    from monitor.training.dataset import DatasetError, import_peregrine, parse_layer_range

    try:
        ids = [int(v) for v in class_ids.split(",") if v.strip()]
    except ValueError as e:
        raise DatasetError(f"--class-ids {class_ids!r}: expected integers like 0,5,8") from e
    names = [v.strip() for v in class_names.split(",")] if class_names else None
    rng = parse_layer_range(layer_range) if layer_range else None
    _setup_logging("WARNING")
    with Progress(transient=True) as progress:
        task = progress.add_task(f"import {hdf5.name}", total=None)
        result = import_peregrine(
            hdf5, out, class_ids=ids, class_names=names, layers=rng,
            progress=lambda done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote {result.layers} layers, classes {', '.join(result.classes)}: "
               f"{result.manifest}")


@dataset.command("clean-frames")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def clean_frames_cmd(sources: tuple[Path, ...], out: Path) -> None:
    """Frames known to hold no defect -> a dataset of hard negatives (no defect masks)."""
    from monitor.training.dataset import import_clean_frames

    click.echo(f"wrote {import_clean_frames(list(sources), out)}")
