"""The daemon as a service: sd_notify on a real socket, watchdog, SIGHUP, SIGTERM, metrics."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from monitor.daemon import sdnotify
from tests.conftest import daemon_toml, encode, free_endpoint, layer_image, write_config

REPO = Path(__file__).resolve().parent.parent


def _listen(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    return sock


def test_notify_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_interval() is None


def test_notify_path_and_abstract_sockets(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with _listen(str(tmp_path / "notify")) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert sdnotify.notify("READY=1", "STATUS=ok")
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"
    name = f"pbf-test-{os.getpid()}"
    with _listen("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("WATCHDOG=1")
        assert sock.recv(4096) == b"WATCHDOG=1"
    monkeypatch.setenv("WATCHDOG_USEC", "2500000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 2.5
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert sdnotify.watchdog_interval() is None


def _metric(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_service_lifecycle(tmp_path: Path, tiny_weights: Path) -> None:
    port = int(free_endpoint().rsplit(":", 1)[1])
    body = daemon_toml(tiny_weights, metrics=f"127.0.0.1:{port}")
    cfg = write_config(tmp_path / "config.toml", body)
    sock = _listen(str(tmp_path / "notify"))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000",
           "JOURNAL_STREAM": "8:12345"}
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([sys.executable, "-m", "monitor", "run", "--config", str(cfg)],
                            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    got: list[str] = []

    def wait_for(message: str, timeout: float = 120.0, running: bool = True) -> None:
        deadline = time.monotonic() + timeout
        while message not in got:
            assert not running or proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, (message, got, log.read_text())
            with contextlib.suppress(TimeoutError):
                got.extend(sock.recv(4096).decode().split("\n"))

    try:
        wait_for("READY=1")
        assert (tmp_path / "state" / "pbf-monitor.db").is_file()  # ready means ready
        got.clear()
        wait_for("WATCHDOG=1")
        got.clear()
        wait_for("WATCHDOG=1")  # kept coming while idle and healthy

        (tmp_path / "watch" / "B1").mkdir(parents=True)
        (tmp_path / "watch" / "B1" / "layer_1.png").write_bytes(encode(layer_image(1), ".png"))
        deadline = time.monotonic() + 60
        while _metric(port, 'pbf_monitor_layers_total{status="ok"}') != 1.0:
            assert time.monotonic() < deadline, "the layer never showed in the metrics"
            time.sleep(0.2)
        assert (_metric(port, "pbf_monitor_inference_seconds_count") or 0) >= 1
        assert _metric(port, "pbf_monitor_queue_depth") == 0.0
        assert _metric(port, 'pbf_monitor_seconds_since_last_layer{build="B1"}') is not None

        # SIGHUP: a bad config is refused and the daemon goes on; a good one is taken.
        cfg.write_text(body + "\n[alarms]\ngrace_layers = 'x'\n")
        got.clear()
        proc.send_signal(signal.SIGHUP)
        wait_for("READY=1")
        assert "RELOADING=1" in got
        cfg.write_text(body + "\n[alarms]\ngrace_layers = 7\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "reloaded alarm rules" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)

        got.clear()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        wait_for("STOPPING=1", timeout=5, running=False)
        text = log.read_text()
        assert "reload refused" in text and "alarms.grace_layers" in text
        assert not text[:4].isdigit()  # under journald: no timestamp of our own
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sock.close()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_unit_file_verifies(tmp_path: Path) -> None:
    unit = (REPO / "systemd" / "pbf-monitor.service").read_text()
    assert "Type=notify" in unit and "WatchdogSec=" in unit and "StateDirectory=" in unit
    assert "PrivateDevices=yes" not in unit and "MemoryDenyWriteExecute=yes" not in unit
    assert "MemoryMax=4G" in unit and "LimitNOFILE=65536" in unit
    exe = Path(sys.executable).with_name("pbf-monitor")
    local = tmp_path / "pbf-monitor.service"
    local.write_text(unit.replace("/opt/pbf-monitor/.venv/bin/pbf-monitor", str(exe)))
    out = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True,
                         text=True, timeout=60)
    problems = [line for line in (out.stdout + out.stderr).splitlines()
                if "pbf-monitor.service" in line]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_watchdog_only_while_the_worker_makes_progress(tmp_path: Path,
                                                       tiny_weights: Path) -> None:
    from monitor.config import load_config
    from monitor.daemon.daemon import Daemon

    cfg = load_config(write_config(tmp_path / "c.toml", daemon_toml(tiny_weights)))
    daemon = Daemon(cfg)
    daemon.start()
    try:
        deadline = time.monotonic() + 10
        while not daemon.healthy(within_s=1.0):  # the idle worker loops several times a second
            assert time.monotonic() < deadline
            time.sleep(0.05)
        daemon._stop.set()  # the worker leaves its loop: no more progress
        time.sleep(1.5)
        assert not daemon.healthy(within_s=1.0)
    finally:
        daemon.stop()
