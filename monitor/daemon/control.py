"""The request/reply state endpoint, so a late subscriber can ask for what it missed.

Requests and replies are single-frame JSON objects; every reply carries ``ok`` and, when it
is false, ``error``. The REP socket lives on one owner thread, like the PUB socket.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from monitor.daemon.security import (
    HANDSHAKE_MS,
    CurveClient,
    CurveServer,
    ServerAuth,
    apply_client,
    apply_server,
)
from monitor.errors import ConfigError, MonitorError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
_MAX_REQUEST = 1 << 20  # bytes; requests are small, and this caps what a stranger can send
_MAX_ID = 2**63 - 1  # alarm ids are SQLite/PostgreSQL BIGINTs
_MAX_NAME = 256  # characters in a build, printer or class name
_SEVERITIES = ("warning", "critical")
_VERDICTS = ("confirmed", "false_alarm")  # an operator's verdict on an alarm
_MAX_NOTE = 2000  # characters in a verdict's or a good build's note


def _snippet(obj: Any, limit: int = 200) -> str:
    """repr(obj) cut to `limit` characters; never raises (deep or huge requests)."""
    try:
        text = repr(obj)
    except Exception:  # RecursionError on a deeply nested request, among others
        return f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


def _name(req: dict[str, Any], key: str, *, required: bool) -> None:
    value = req.get(key)
    if value is None and not required:
        return
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string, got {_snippet(value, 40)}")
    if not value and required:
        raise ValueError(f"{key!r} must not be empty")
    if len(value) > _MAX_NAME or "\x00" in value:
        raise ValueError(f"{key!r} must be at most {_MAX_NAME} characters, without NUL")


def _note(req: dict[str, Any]) -> None:
    note = req.get("note")
    if note is not None and (not isinstance(note, str) or len(note) > _MAX_NOTE
                             or "\x00" in note):
        raise ValueError(f"'note' must be a string of at most {_MAX_NOTE} characters, "
                         f"without NUL")


def validate_request(req: dict[str, Any]) -> None:
    """Check the fields of the commands the daemon knows; ValueError names the bad one.

    Done before the handler so that a bad value is answered at once (an alarm id of 2**63
    used to overflow in the database writer, and the endpoint waited 30 s for it), and so
    that 1.9 or true is not taken as alarm 1.
    """
    cmd = req.get("cmd")
    if cmd is not None and not isinstance(cmd, str):
        raise ValueError(f"'cmd' must be a string, got {_snippet(cmd, 40)}")
    if cmd in ("ack", "verdict"):
        alarm_id = req.get("id")
        if isinstance(alarm_id, bool) or not isinstance(alarm_id, int):
            raise ValueError(f"'id' must be an integer alarm id, got {_snippet(alarm_id, 40)}")
        if not 1 <= alarm_id <= _MAX_ID:
            raise ValueError(f"'id' must be between 1 and {_MAX_ID}, got {_snippet(alarm_id, 40)}")
    if cmd == "verdict":
        if req.get("verdict") not in _VERDICTS:
            raise ValueError(f"'verdict' must be one of {', '.join(_VERDICTS)}, "
                             f"got {_snippet(req.get('verdict'), 40)}")
        _note(req)
    elif cmd in ("mute", "unmute"):
        _name(req, "build", required=True)
        _name(req, "printer", required=False)
        _name(req, "class", required=False)
    elif cmd == "mark-good":
        _name(req, "build", required=True)
        _name(req, "printer", required=False)
        _note(req)
        if not isinstance(req.get("good", True), bool):
            raise ValueError("'good' must be true or false")
    elif cmd == "test-alarm":
        severity = req.get("severity", "warning")
        if severity not in _SEVERITIES:
            raise ValueError(f"'severity' must be one of {', '.join(_SEVERITIES)}, "
                             f"got {_snippet(severity, 40)}")
        if not isinstance(req.get("hook", False), bool):
            raise ValueError("'hook' must be true or false")


class ControlError(MonitorError):
    """The state endpoint did not answer, or answered with an error."""


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


class ControlServer:
    """Owns the REP socket; answers each request with handler(request) on its own thread.

    With curve and no context, it runs its own context and ServerAuth. With a shared context
    (the daemon's, also used by the PUB socket), the caller must have started a ServerAuth on
    it before start(), or CURVE would encrypt but let any client in.
    """

    def __init__(
        self,
        endpoint: str,
        handler: Handler,
        *,
        curve: CurveServer | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
        poll_ms: int = 100,
    ) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.curve = curve
        self.poll_ms = poll_ms
        self.answered = 0
        self._shared_ctx = context
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._auth: ServerAuth | None = None
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: MonitorError | None = None
        self._thread: threading.Thread | None = None
        self.failed: str | None = None  # why the serving thread died, if it did

    @property
    def alive(self) -> bool:
        """The endpoint is bound and its thread still serving: part of the daemon's health."""
        return (self._thread is not None and self._thread.is_alive() and self._bound.is_set()
                and self._error is None)

    def start(self) -> None:
        """Bind on the owner thread; raises ConfigError if the endpoint or keys are unusable."""
        ctx = self._ctx = zmq.Context() if self._shared_ctx is None else self._shared_ctx
        if self._shared_ctx is None and self.curve is not None:
            self._auth = ServerAuth(ctx, self.curve.authorized_dir)
        self._thread = threading.Thread(target=self._run, args=(ctx,), name="control",
                                        daemon=True)
        try:
            if self._auth is not None:
                self._auth.start()
            self._thread.start()
            self._bound.wait(10)
            if self._error:
                raise self._error
        except BaseException:
            self.stop()
            raise

    def _run(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        # A peer that vanished without a FIN (cable pulled) is found and its descriptor freed.
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        try:
            try:
                if self.curve is not None:
                    apply_server(sock, self.curve)
                sock.bind(self.endpoint)
            except ConfigError as e:
                self._error = e
                return
            except zmq.ZMQError as e:
                self._error = ConfigError(
                    f"publish.state_endpoint {self.endpoint}: cannot bind ({e})")
                return
            finally:
                self._bound.set()
            log.info("state endpoint on %s%s", self.endpoint, " (CURVE)" if self.curve else "")
            while not self._stop.is_set():
                if not sock.poll(self.poll_ms):
                    continue
                frames = sock.recv_multipart()
                reply = self._answer(frames)
                self.answered += 1  # before send, so a client that has its reply sees the count
                try:  # REP drops a reply to a vanished or mute requester; send never blocks
                    sock.send(reply)
                except zmq.ZMQError as e:
                    log.warning("state endpoint: reply not sent (%s)", e)
        except BaseException as e:  # _answer never raises: this is the socket itself failing
            self.failed = f"{type(e).__name__}: {e}"
            log.critical("state endpoint %s stopped: %s", self.endpoint, self.failed)
            raise
        finally:
            sock.close(linger=0)

    def _answer(self, frames: list[bytes]) -> bytes:
        """The reply to one request; never raises, whatever a stranger sends."""
        try:
            if len(frames) != 1:
                raise ValueError(f"expected one frame, got {len(frames)}")
            req = json.loads(frames[0])
            if not isinstance(req, dict):
                raise ValueError(f"expected a JSON object, got {type(req).__name__}")
            validate_request(req)
        except RecursionError:  # b"[" * 1000: the parser's own recursion limit
            return _encode({"ok": False, "error": "bad request: JSON nested too deeply"})
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, int digit limits
            return _encode({"ok": False, "error": f"bad request: {str(e)[:300]}"})
        except Exception as e:  # never let one request end the thread
            return _encode({"ok": False, "error": f"bad request: {type(e).__name__}"})
        try:
            return _encode({"ok": True, **self.handler(req)})
        except Exception as e:
            log.exception("state endpoint: request %s failed", _snippet(req))
            try:
                return _encode({"ok": False, "error": f"internal error: {str(e)[:300]}"})
            except Exception:
                return _encode({"ok": False, "error": "internal error"})

    def stop(self, timeout: float = 10.0) -> None:
        """Stop answering and close the socket. Idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None and self._ctx is not self._shared_ctx:
            self._ctx.term()
        self._ctx = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_control(endpoint: str, handler: Handler, *, curve: CurveServer | None,
                  context: zmq.Context[zmq.Socket[bytes]] | None,
                  undo: list[Callable[[], None]]) -> ControlServer:
    """The state endpoint, started (its stop pushed on `undo`)."""
    control = ControlServer(endpoint, handler, curve=curve, context=context)
    control.start()
    undo.append(control.stop)
    return control


def request(
    endpoint: str,
    msg: dict[str, Any],
    *,
    timeout_s: float = 5.0,
    curve: CurveClient | None = None,
) -> dict[str, Any]:
    """Send one request to a ControlServer and return its reply.

    Raises:
        ControlError: no reply within timeout_s, or a reply with ok false.
        ConfigError: the CURVE key files are unusable.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if curve is not None:
            apply_client(sock, curve)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as e:
            raise ControlError(f"{endpoint}: cannot connect ({e})") from e
        sock.send(_encode(msg))
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(
                f"no answer from {endpoint} within {timeout_s:g} s "
                "(is the daemon running? is publish.state_endpoint right?)")
        raw = sock.recv()
    finally:
        sock.close()
    try:
        reply = json.loads(raw)
    except ValueError as e:
        raise ControlError(f"{endpoint}: reply is not JSON ({e})") from e
    if not isinstance(reply, dict):
        raise ControlError(f"{endpoint}: reply is not a JSON object")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "request failed")))
    return reply
