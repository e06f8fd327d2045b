"""Attacks on a real daemon's outside-facing endpoints (issue 17): junk on the state
endpoint, ids that overflowed, idle connections that used up descriptors. Real ZeroMQ and
TCP sockets on loopback."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import pytest
import zmq
from sqlalchemy import create_engine, text

from monitor.config import load_config
from monitor.daemon.control import request
from monitor.daemon.daemon import Daemon
from monitor.daemon.security import raise_open_files_limit
from tests.conftest import daemon_toml, free_port, layer_image, write_config
from tests.test_daemon_e2e import Listener


@pytest.fixture
def daemon(tmp_path: Path, tiny_weights: Path) -> Iterator[Daemon]:
    port = free_port()
    cfg = load_config(write_config(tmp_path / "config.toml",
                                   daemon_toml(tiny_weights, metrics=f"127.0.0.1:{port}")))
    d = Daemon(cfg)
    d.start()
    try:
        yield d
    finally:
        d.stop()


def raw(endpoint: str, frames: list[bytes], timeout_s: float = 5.0) -> dict[str, Any]:
    """One request as bytes that request() would never send; the reply as JSON."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(frames)
        assert sock.poll(int(timeout_s * 1000)), f"no reply to {frames[0][:40]!r}"
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close()


JUNK = {
    "deep array (RecursionError; it killed the control thread)": [b"[" * 1000],
    "deep closed array": [b"[" * 100_000 + b"]" * 100_000],
    "deep object": [b'{"a":' * 5000 + b"1" + b"}" * 5000],
    "huge integer": [b'{"cmd": "ack", "id": ' + b"9" * 100_000 + b"}"],
    "huge float": [b'{"cmd": "ack", "id": 1e999999}'],
    "invalid UTF-8": [b'{"cmd": "\xff\xfe"}'],
    "lone surrogate": [b'{"cmd": "\\ud800"}'],
    "array": [b"[1, 2]"],
    "string": [b'"state"'],
    "null": [b"null"],
    "NaN": [b'{"cmd": NaN}'],
    "two frames": [b'{"cmd": "state"}', b"x"],
    "empty": [b""],
    "cmd not a string": [b'{"cmd": ["state"]}'],
    "deep value of a known command": [b'{"cmd": "mute", "build": ' + b"[" * 900
                                      + b"]" * 900 + b"}"],
}


@pytest.mark.parametrize("name", sorted(JUNK))
def test_state_endpoint_survives_junk(daemon: Daemon, name: str) -> None:
    endpoint = daemon.cfg.publish.state_endpoint
    reply = raw(endpoint, JUNK[name])
    assert reply["ok"] is False and reply["error"], reply
    assert daemon.health()["endpoints"]["state_endpoint"] is True
    assert request(endpoint, {"cmd": "state"})["ok"] is True


def test_state_endpoint_survives_all_junk_in_a_row(daemon: Daemon) -> None:
    endpoint = daemon.cfg.publish.state_endpoint
    for frames in JUNK.values():
        assert raw(endpoint, frames)["ok"] is False
    state = request(endpoint, {"cmd": "state"})
    assert state["health"]["status"] == "ready"
    # every outward-facing thread is alive, as the daemon's own health (the watchdog's) says
    assert state["health"]["endpoints"] == {"publisher": True, "state_endpoint": True,
                                            "metrics": True}, state["health"]
    assert daemon.healthy(60)


@pytest.mark.parametrize(("req", "error"), [
    ({"cmd": "ack", "id": 2**63}, "between 1 and 9223372036854775807"),
    ({"cmd": "ack", "id": -1}, "between 1 and"),
    ({"cmd": "ack", "id": 0}, "between 1 and"),
    ({"cmd": "ack", "id": 1.9}, "must be an integer"),
    ({"cmd": "ack", "id": True}, "must be an integer"),
    ({"cmd": "ack", "id": "1"}, "must be an integer"),
    ({"cmd": "ack"}, "must be an integer"),
    ({"cmd": "mute"}, "'build' must be a string"),
    ({"cmd": "mute", "build": 7}, "'build' must be a string"),
    ({"cmd": "mute", "build": ""}, "must not be empty"),
    ({"cmd": "mute", "build": "B" * 257}, "at most 256"),
    ({"cmd": "mute", "build": "B\x00"}, "without NUL"),
    ({"cmd": "unmute", "build": "B1", "printer": ["p"]}, "'printer' must be a string"),
    ({"cmd": "mute", "build": "B1", "class": {"a": 1}}, "'class' must be a string"),
    ({"cmd": "test-alarm", "severity": "fatal"}, "'severity' must be one of"),
    ({"cmd": "test-alarm", "hook": "yes"}, "'hook' must be true or false"),
])
def test_bad_fields_are_answered_at_once(daemon: Daemon, req: dict[str, Any],
                                         error: str) -> None:
    # 2**63 used to overflow in the database writer: the endpoint then waited its 30 s
    # timeout; the 5 s a request waits here would have run out.
    reply = raw(daemon.cfg.publish.state_endpoint, [json.dumps(req).encode()], timeout_s=5)
    assert reply["ok"] is False and error in reply["error"], reply
    assert request(daemon.cfg.publish.state_endpoint, {"cmd": "state"})["ok"] is True


def test_ack_of_a_large_unknown_id_is_an_error_not_alarm_1(daemon: Daemon) -> None:
    reply = raw(daemon.cfg.publish.state_endpoint,
                [json.dumps({"cmd": "ack", "id": 2**63 - 1}).encode()])
    assert reply["ok"] is False and "internal error" not in reply["error"], reply


def read_until_closed(socks: list[socket.socket], timeout_s: float) -> int:
    """Read each socket until the peer closes it (b"" or a reset); how many were closed."""
    deadline = time.monotonic() + timeout_s
    closed = 0
    for s in socks:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return closed
            s.settimeout(min(left, 1.0))
            try:
                if not s.recv(4096):
                    break
            except TimeoutError:
                continue
            except ConnectionResetError:
                break
        closed += 1
    return closed


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        body: bytes = r.read()
        return body.decode()


def test_idle_connections_are_dropped_and_endpoints_keep_answering(daemon: Daemon) -> None:
    assert daemon.metrics is not None and daemon.metrics._server is not None
    metrics_port = daemon.metrics._server.port
    host, port = daemon.cfg.publish.state_endpoint.rsplit("//", 1)[1].rsplit(":", 1)
    idle: dict[str, list[socket.socket]] = {"state": [], "metrics": []}
    try:
        for _ in range(200):
            idle["state"].append(socket.create_connection((host, int(port)), timeout=10))
            idle["metrics"].append(socket.create_connection(("127.0.0.1", metrics_port),
                                                            timeout=10))
        # While 400 peers sit idle, both endpoints answer.
        assert request(daemon.cfg.publish.state_endpoint, {"cmd": "state"})["ok"] is True
        assert "pbf_monitor_queue_depth" in scrape(metrics_port)
        # ... and every idle peer is dropped: the state endpoint's after the 5 s handshake
        # interval, the metrics endpoint's after 5 s idle (or at once, past 64 connections).
        assert read_until_closed(idle["metrics"], 60) == 200
        assert read_until_closed(idle["state"], 60) == 200
        assert daemon.metrics._server.connections <= 1
        assert request(daemon.cfg.publish.state_endpoint, {"cmd": "state"})["ok"] is True
        assert "pbf_monitor_queue_depth" in scrape(metrics_port)
    finally:
        for socks in idle.values():
            for s in socks:
                s.close()


def test_metrics_endpoint_answers_bad_requests_and_keeps_serving(daemon: Daemon) -> None:
    assert daemon.metrics is not None and daemon.metrics._server is not None
    port = daemon.metrics._server.port
    for req, status in [(b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
                        (b"GET /nothing HTTP/1.1\r\n\r\n", b"404"),
                        (b"\xff\xfe\r\n\r\n", b"405"),
                        (b"GET /" + b"a" * 10000, b"431")]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(req)
            assert s.recv(100).split()[1] == status, req[:20]
    assert daemon.metrics.alive
    assert "pbf_monitor_layers_total" in scrape(port) or "pbf_monitor_queue_depth" in scrape(port)


def test_open_files_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    probe = ("import resource, json\n"
             "from monitor.daemon.security import raise_open_files_limit\n"
             "print(json.dumps([*raise_open_files_limit(), "
             "resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, soft)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", probe], preexec_fn=lower, env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    old, new, now = json.loads(out)
    assert old == low and now == new
    assert new == (hard if hard != resource.RLIM_INFINITY else 1 << 20)
    assert raise_open_files_limit()[1] >= soft  # in this process: never lowered


# --- the watch folder: symlinks out of it, pipes and devices named like layers ----------

@pytest.fixture
def rescanning(tmp_path: Path, tiny_weights: Path) -> Iterator[tuple[Daemon, Listener]]:
    cfg = load_config(write_config(tmp_path / "config.toml",
                                   daemon_toml(tiny_weights, rescan_interval_s=0.2)))
    (cfg.watch.dir / "B1").mkdir(parents=True)
    d = Daemon(cfg)
    d.start()
    listener = Listener(cfg.publish.endpoint)
    try:
        listener.wait_heartbeat()
        yield d, listener
    finally:
        listener.close()
        d.stop()


def layer_rows(d: Daemon) -> dict[int, tuple[int, str, str | None, str | None]]:
    """layer -> (versions, status, error, image_sha256)."""
    engine = create_engine(d.cfg.store_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text(
                "SELECT layer, versions, status, error, image_sha256 FROM layers")).all()
    finally:
        engine.dispose()
    return {r[0]: tuple(r[1:]) for r in rows}  # type: ignore[misc]


def after_rescans(d: Daemon, n: int) -> None:
    settler = d.settlers[""]
    target = settler.rescans + n
    deadline = time.monotonic() + 60
    while settler.rescans < target:
        assert time.monotonic() < deadline, "no rescans"
        time.sleep(0.05)


def test_pipes_and_devices_are_recorded_once_across_rescans(
        rescanning: tuple[Daemon, Listener]) -> None:
    d, listener = rescanning
    build = d.cfg.watch.dir / "B1"
    os.mkfifo(build / "layer_00001.png")
    (build / "layer_00002.png").symlink_to("/dev/null")
    cv2.imwrite(str(build / "layer_00003.png"), layer_image())
    listener.wait(lambda: set(listener.layers()) >= {1, 2, 3})
    after_rescans(d, 5)  # each used to record the pipe and the device again
    listener.wait_heartbeat()
    assert {n: len(m) for n, m in listener.layers().items()} == {1: 1, 2: 1, 3: 1}
    rows = layer_rows(d)
    assert rows[1][:2] == (1, "error") and "not a regular file" in str(rows[1][2])
    assert rows[2][:2] == (1, "error") and "not a regular file" in str(rows[2][2])
    assert rows[3][:2] == (1, "ok")


def test_symlinks_out_of_the_watch_folder_are_refused_unread(
        rescanning: tuple[Daemon, Listener], tmp_path: Path) -> None:
    d, listener = rescanning
    build = d.cfg.watch.dir / "B1"
    outside = tmp_path / "elsewhere.png"
    cv2.imwrite(str(outside), layer_image())
    (build / "layer_00001.png").symlink_to(outside)
    (build / "layer_00002.png").symlink_to("/etc/passwd")
    (build / "layer_00003.png").symlink_to("/proc/self/environ")  # stayed pending for good
    inner = build / ".inner.png"
    cv2.imwrite(str(inner), layer_image())
    (build / "layer_00004.png").symlink_to(inner)  # inside the folder: fine
    listener.wait(lambda: set(listener.layers()) >= {1, 2, 3, 4})
    after_rescans(d, 5)
    listener.wait_heartbeat()
    assert {n: len(m) for n, m in listener.layers().items()} == {1: 1, 2: 1, 3: 1, 4: 1}
    rows = layer_rows(d)
    for n in (1, 2, 3):
        versions, status, error, sha = rows[n]
        assert (versions, status, sha) == (1, "error", None), rows[n]  # never read
        assert "leads outside the watch folder" in str(error), error
    assert rows[4][:2] == (1, "ok")
