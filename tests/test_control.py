"""The state endpoint: real REQ/REP sockets on loopback, plain and with CURVE."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import zmq

from monitor.daemon.control import ControlError, ControlServer, request
from monitor.daemon.security import CurveClient, CurveServer, ServerAuth, generate_keys
from monitor.errors import ConfigError
from tests.conftest import free_endpoint


def handler(req: dict[str, Any]) -> dict[str, Any]:
    if req.get("cmd") == "boom":
        raise RuntimeError("kaboom")
    if req.get("cmd") == "refuse":
        return {"ok": False, "error": "unknown build"}
    return {"echo": req}


def raw_request(endpoint: str, frame: bytes) -> dict[str, Any]:
    """A request that request() would never send."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(frame)
        assert sock.poll(5000), "no reply"
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close()


def test_request_reply_and_errors_keep_the_server_answering() -> None:
    endpoint = free_endpoint()
    with ControlServer(endpoint, handler) as server:
        assert request(endpoint, {"cmd": "state"}) == {"ok": True, "echo": {"cmd": "state"}}
        for frame, error in [(b"not json", "bad request"), (b"[1, 2]", "JSON object"),
                             (b"\xff", "bad request")]:
            reply = raw_request(endpoint, frame)
            assert reply["ok"] is False and error in reply["error"]
        with pytest.raises(ControlError, match="internal error: kaboom"):
            request(endpoint, {"cmd": "boom"})
        with pytest.raises(ControlError, match=r"^unknown build$"):
            request(endpoint, {"cmd": "refuse"})
        assert request(endpoint, {"n": 2})["echo"] == {"n": 2}
        assert server.answered == 7
    server.stop()  # idempotent


def test_no_server_is_a_control_error_that_names_the_endpoint() -> None:
    endpoint = free_endpoint()
    with pytest.raises(ControlError, match=rf"no answer from {endpoint} within 0\.3 s"):
        request(endpoint, {}, timeout_s=0.3)


def test_bind_failure_is_a_config_error() -> None:
    endpoint = free_endpoint()
    in_use = rf"publish\.state_endpoint {endpoint}: cannot bind"
    with ControlServer(endpoint, handler), pytest.raises(ConfigError, match=in_use):
        ControlServer(endpoint, handler).start()
    ControlServer(endpoint, handler).stop()  # never started: a no-op


@pytest.fixture
def curve(tmp_path: Path) -> tuple[CurveServer, dict[str, CurveClient]]:
    server_public, server_secret = generate_keys(tmp_path / "server", "server")
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    clients = {}
    for name in ("alice", "mallory"):
        public, secret = generate_keys(tmp_path / name, name)
        clients[name] = CurveClient(server_public, secret)
        if name == "alice":
            (authorized / public.name).write_bytes(public.read_bytes())
    return CurveServer(server_secret, authorized), clients


@pytest.mark.parametrize("shared_context", [False, True])
def test_curve_state_endpoint_answers_only_authorized_keys(
        curve: tuple[CurveServer, dict[str, CurveClient]], shared_context: bool) -> None:
    server_cfg, clients = curve
    endpoint = free_endpoint()
    ctx: zmq.Context[zmq.Socket[bytes]] | None = zmq.Context() if shared_context else None
    auth = ServerAuth(ctx, server_cfg.authorized_dir) if ctx else None
    try:
        if auth:
            auth.start()
        with ControlServer(endpoint, handler, curve=server_cfg, context=ctx):
            reply = request(endpoint, {"cmd": "state"}, curve=clients["alice"])
            assert reply["echo"] == {"cmd": "state"}
            with pytest.raises(ControlError, match="no answer"):
                request(endpoint, {"cmd": "state"}, timeout_s=1)
            with pytest.raises(ControlError, match="no answer"):
                request(endpoint, {"cmd": "state"}, timeout_s=1, curve=clients["mallory"])
            assert request(endpoint, {}, curve=clients["alice"])["ok"] is True
    finally:
        if auth:
            auth.stop()
        if ctx:
            ctx.term()


def test_bad_server_key_is_a_config_error_and_leaves_nothing_running(
        curve: tuple[CurveServer, dict[str, CurveClient]], tmp_path: Path) -> None:
    server_cfg, _ = curve
    missing = tmp_path / "gone.key_secret"
    with pytest.raises(ConfigError, match=rf"publish\.curve_secret_key: {missing}"):
        ControlServer(free_endpoint(), handler,
                      curve=CurveServer(missing, server_cfg.authorized_dir)).start()


def test_curve_refusals_are_logged_once_per_peer_per_minute(
        curve: tuple[CurveServer, dict[str, CurveClient]],
        caplog: pytest.LogCaptureFixture) -> None:
    server_cfg, clients = curve
    endpoint = free_endpoint()
    with caplog.at_level(logging.WARNING, logger="monitor.daemon.security"), \
            ControlServer(endpoint, handler, curve=server_cfg) as server:
        for _ in range(3):
            with pytest.raises(ControlError, match="no answer"):
                request(endpoint, {"cmd": "state"}, timeout_s=1, curve=clients["mallory"])
        assert request(endpoint, {}, curve=clients["alice"])["ok"] is True
        assert server._auth is not None and server._auth.rejected >= 3
        assert server._auth.alive
    lines = [r.getMessage() for r in caplog.records if "refused a client" in r.getMessage()]
    assert lines == ["CURVE: refused a client from 127.0.0.1: Unknown key"], lines


def test_alive_follows_the_serving_thread() -> None:
    endpoint = free_endpoint()
    server = ControlServer(endpoint, handler)
    assert not server.alive
    with server:
        assert server.alive
    assert not server.alive
