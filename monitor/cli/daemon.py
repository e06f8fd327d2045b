"""Commands that run the daemon or talk to it: run, validate-config, subscribe, ack, verdict,
mute, mark-good, test-alarm; CURVE keys and the database schema."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import click

from monitor.cli.options import CONFIG_OPTION, find_config, setup_logging
from monitor.config import Config, load_config
from monitor.errors import MonitorError


@click.command()
@CONFIG_OPTION
def run(config_path: Path | None) -> None:
    """Run the daemon until SIGTERM or Ctrl-C; SIGHUP reloads alarm rules, thresholds and weights.

    Under systemd (Type=notify) it reports READY=1 once everything is up, and WATCHDOG=1
    only while the worker keeps making progress.
    """
    from monitor.daemon import sdnotify
    from monitor.daemon.daemon import Daemon
    from monitor.daemon.security import raise_open_files_limit

    cfg = find_config(config_path)
    setup_logging(cfg.log.level)
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
    raise_open_files_limit()  # idle peers must not take the descriptors layers need
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
        log.info("pbf-monitor stopped")


def _reload(daemon: Any, config_path: Path | None, log: logging.Logger) -> None:
    """SIGHUP: re-read the config; a bad one is logged and the running one kept."""
    from monitor.daemon import sdnotify

    sdnotify.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
    try:
        ignored = daemon.reload(find_config(config_path))
    except MonitorError as e:
        log.error("reload refused, keeping the running configuration: %s", e)
    else:
        log.info("reloaded alarm rules, thresholds and weights")
        if ignored:
            log.warning("changed settings that need a restart: %s", ", ".join(ignored))
    sdnotify.notify("READY=1")


@click.command("validate-config")
@click.argument("file", type=click.Path(path_type=Path))
def validate_config(file: Path) -> None:
    """Check a config file and what `run` needs: the weights, the watch folders, and a
    writable (or creatable) state folder; nothing is created."""
    from monitor.alarms.engine import AlarmEngine
    from monitor.daemon.parts import check_outside_classes
    from monitor.daemon.preflight import check_all
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
        check_outside_classes(cfg, info.class_names)
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}") from e
    try:
        check_all(cfg)
    except MonitorError as e:
        raise type(e)(f"{file}: {e}") from e
    click.echo(f"{file}: ok (watch {cfg.watch.dir}, weights {cfg.model.weights.name} with "
               f"classes {', '.join(info.class_names)}, database {cfg.store_url})")


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


@click.command("subscribe")
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

    cfg = find_config(config_path)
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


@click.command()
@click.argument("alarm_id", type=int)
@CONFIG_OPTION
@curve_options
def ack(alarm_id: int, config_path: Path | None, server_key: Path | None,
        client_secret: Path | None) -> None:
    """Acknowledge an open alarm (through the running daemon, which publishes it)."""
    reply = _control(find_config(config_path), {"cmd": "ack", "id": alarm_id},
                     server_key=server_key, client_secret=client_secret)
    a = reply["alarm"]
    click.echo(f"alarm {a['id']} acknowledged ({a['build']} layer {a['layer']} {a['rule']})")


@click.command()
@click.argument("alarm_id", type=click.IntRange(1, 2**63 - 1))
@click.argument("verdict", type=click.Choice(["confirmed", "false_alarm"]))
@click.option("--note", default=None, help="Why (at most 2000 characters).")
@CONFIG_OPTION
@curve_options
def verdict(alarm_id: int, verdict: str, note: str | None, config_path: Path | None,
            server_key: Path | None, client_secret: Path | None) -> None:
    """Mark an alarm confirmed or a false alarm (through the running daemon, which stores
    and publishes it); `pbf-monitor alarms --stats` sums verdicts per rule."""
    msg: dict[str, Any] = {"cmd": "verdict", "id": alarm_id, "verdict": verdict}
    if note is not None:
        msg["note"] = note
    reply = _control(find_config(config_path), msg, server_key=server_key,
                     client_secret=client_secret)
    a = reply["alarm"]
    click.echo(f"alarm {a['id']} marked {a['verdict']} ({a['build']} layer {a['layer']} "
               f"{a['rule']})")


@click.command()
@click.argument("build")
@click.option("--class", "cls", help="Only this class (default: every class and stalls).")
@click.option("--printer", default="", help="Printer of the build (fleets).")
@click.option("--unmute", is_flag=True, help="Lift the mute instead.")
@CONFIG_OPTION
@curve_options
def mute(build: str, cls: str | None, printer: str, unmute: bool, config_path: Path | None,
         server_key: Path | None, client_secret: Path | None) -> None:
    """Stop a build (or one class of it) from opening alarms."""
    _control(find_config(config_path), {"cmd": "unmute" if unmute else "mute", "build": build,
                                  "class": cls, "printer": printer},
             server_key=server_key, client_secret=client_secret)
    what = f"class {cls} of build {build}" if cls else f"build {build}"
    click.echo(f"{'unmuted' if unmute else 'muted'} {what}")


@click.command("mark-good")
@click.argument("build")
@click.option("--printer", default=None,
              help="Printer of the build (default: the one printer that has it).")
@click.option("--note", default=None, help="Why (at most 2000 characters).")
@click.option("--undo", is_flag=True, help="Remove the mark.")
@CONFIG_OPTION
@curve_options
def mark_good(build: str, printer: str | None, note: str | None, undo: bool,
              config_path: Path | None, server_key: Path | None,
              client_secret: Path | None) -> None:
    """Mark a build as printed well: its layers become the printer's healthy examples for
    `pbf-monitor adapt`. Through the running daemon, else straight into the database."""
    from monitor.daemon.instance import holder, lock_paths
    from monitor.records import storable

    if undo and note is not None:
        raise MonitorError("--note goes with a mark, not with --undo")
    cfg = find_config(config_path)
    build = storable(build)  # a name typed with its raw bytes: stored as \xNN
    if holder(lock_paths(cfg.state_dir, cfg.store_url)) is not None:
        msg: dict[str, Any] = {"cmd": "mark-good", "build": build, "good": not undo}
        if printer is not None:
            msg["printer"] = printer
        if note is not None:
            msg["note"] = note
        reply = _control(cfg, msg, server_key=server_key, client_secret=client_secret)
    else:
        reply = _mark_good_in_db(cfg, printer, build, note, good=not undo)
    on = f" on printer {reply['printer']}" if reply.get("printer") else ""
    if reply["good"]:
        click.echo(f"build {reply['build']}{on} marked good ({reply['layers']} ok layers)")
    else:
        click.echo(f"build {reply['build']}{on} no longer marked good")


def _mark_good_in_db(cfg: Config, printer: str | None, build: str, note: str | None, *,
                     good: bool) -> dict[str, Any]:
    """No daemon holds the state folder: one short transaction of our own (SQLite: BEGIN
    IMMEDIATE in WAL mode, so readers go on)."""
    from sqlalchemy.orm import Session

    from monitor.store import writes
    from monitor.store.connect import open_db

    open_db(cfg.store_url, writer=False).dispose()  # no database yet: say so, make none
    engine = open_db(cfg.store_url)  # an older schema is upgraded, as the daemon does
    try:
        with Session(engine) as s, s.begin():
            mark = writes.mark_good(s, printer, build, note, good)
            return writes.mark_good_reply(build, printer, mark)
    finally:
        engine.dispose()


@click.command("test-alarm")
@click.option("--severity", type=click.Choice(["warning", "critical"]), default="warning",
              show_default=True)
@click.option("--hook", "run_hook", is_flag=True,
              help="Also run alarms.hook.command (it may really pause the machine).")
@CONFIG_OPTION
@curve_options
def test_alarm(severity: str, run_hook: bool, config_path: Path | None,
               server_key: Path | None, client_secret: Path | None) -> None:
    """Make the running daemon publish a test alarm (rule "test") end to end."""
    reply = _control(find_config(config_path), {"cmd": "test-alarm", "severity": severity,
                                          "hook": run_hook},
                     server_key=server_key, client_secret=client_secret)
    click.echo(f"test alarm published with seq {reply['alarm']['seq']}"
               + (" and the hook started" if reply.get("hook") else ""))


@click.group()
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


@click.group()
def db() -> None:
    """The database schema."""


@db.command("upgrade")
@CONFIG_OPTION
def db_upgrade(config_path: Path | None) -> None:
    """Upgrade the schema to this version's (the daemon also does it at start); a SQLite
    file is copied aside first."""
    from monitor.store import migrate
    from monitor.store.connect import make_engine

    cfg = find_config(config_path)
    engine = make_engine(cfg.store_url, writer=True)
    try:
        before = migrate.current(engine)
        backup = migrate.upgrade(engine, cfg.store_url)
        click.echo(f"{cfg.store_url}: schema {before or 'empty'} -> {migrate.head()}"
                   + (f" (backup {backup})" if backup else ""))
    finally:
        engine.dispose()


# Registered on the `pbf-monitor` group by monitor.cli.
COMMANDS: list[click.Command] = [run, validate_config, subscribe_cmd, ack, verdict, mute,
                                 mark_good, test_alarm, keys, db]
