"""The ZeroMQ PUB socket, its owner thread, and the message schema.

Every message is a two-frame multipart ``[topic, json]``. Layer and alarm messages carry a
``seq`` that increases by one per message across restarts (it is the outbox row id), so a
subscriber can detect what it missed; heartbeats carry ``last_seq`` for the same purpose
while the build is idle. PUB never blocks: a slow subscriber loses messages beyond the
high-water mark instead of stalling the pipeline, and the database stays the source of truth.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import zmq

from monitor.daemon import failpoints
from monitor.daemon.security import (
    HANDSHAKE_MS,
    CurveClient,
    CurveServer,
    apply_server,
    subscriber_socket,
)
from monitor.errors import ConfigError
from monitor.records import AlarmRecord, LayerRecord, Outgoing

log = logging.getLogger(__name__)

TOPIC_LAYER = "layer"
TOPIC_ALARM = "alarm"
TOPIC_HEARTBEAT = "heartbeat"
TOPICS = (TOPIC_LAYER, TOPIC_ALARM, TOPIC_HEARTBEAT)


def layer_message(rec: LayerRecord, *, replaced: bool) -> dict[str, Any]:
    """The `layer` payload (seq is added when it is published)."""
    msg: dict[str, Any] = {
        "printer": rec.printer,
        "build": rec.build,
        "layer": rec.layer,
        "status": rec.status,
        "classes": rec.stats.summary() if rec.stats else {},
        "timestamp": rec.processed_at,
        "image": rec.image_path,
        "image_sha256": rec.image_sha256,
        "model_sha256": rec.model_sha256,
        "latency_ms": rec.total_ms,
        "infer_ms": rec.infer_ms,
        "replaced": replaced,
    }
    if rec.status == "error":
        msg["error"] = rec.error
    if rec.regions:
        msg["regions"] = {name: st.summary() for name, st in rec.regions.items()}
    if rec.parts:
        msg["parts"] = [p.summary() for p in rec.parts]
    return msg


def alarm_message(rec: AlarmRecord) -> dict[str, Any]:
    """The `alarm` payload for one alarm in its current state."""
    return {
        "id": rec.id,
        "printer": rec.printer,
        "build": rec.build,
        "layer": rec.layer,
        "class": rec.class_name,
        "rule": rec.rule,
        "severity": rec.severity,
        "state": rec.state,
        "value": rec.value,
        "threshold": rec.threshold,
        "cleared_layer": rec.cleared_layer,
        "track": rec.track,
        "part": rec.part,
        "unit": rec.unit,
        "position_mm": None if rec.position_mm is None else [round(v, 2) for v in rec.position_mm],
        "url": rec.url,
        "model_trusted": rec.model_trusted,
        "verdict": rec.verdict,
        "verdict_note": rec.verdict_note,
        "timestamp": rec.cleared_at or rec.acked_at or rec.opened_at,
    }


def encode(topic: str, payload: dict[str, Any]) -> list[bytes]:
    return [topic.encode(), json.dumps(payload, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> tuple[str, dict[str, Any]]:
    return frames[0].decode(), json.loads(frames[1])


_STOP = object()


class Publisher:
    """Owns the PUB socket; everything else hands it messages through a queue."""

    def __init__(
        self,
        endpoint: str,
        *,
        heartbeat_interval_s: float = 5.0,
        send_hwm: int = 10_000,
        startup_grace_s: float = 1.0,
        health: Callable[[], dict[str, Any]] | None = None,
        on_sent: Callable[[list[int]], None] | None = None,
        curve: CurveServer | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.curve = curve
        self._context = context  # shared with the ZAP authenticator when CURVE is on
        self.heartbeat_interval_s = heartbeat_interval_s
        self.send_hwm = send_hwm
        self.startup_grace_s = startup_grace_s
        self._health = health or dict
        self._on_sent = on_sent
        self._q: queue.Queue[Any] = queue.Queue()
        self._bound = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)
        self.last_seq = 0
        self.sent = 0
        self._next_beat = 0.0

    def start(self, *, last_seq: int = 0) -> None:
        """Bind on the owner thread; raises ConfigError if the endpoint cannot be bound."""
        self.last_seq = last_seq
        self._thread.start()
        self._bound.wait(10)
        if self._error:
            self._thread.join(1)
            raise ConfigError(f"publish.endpoint {self.endpoint}: cannot bind ({self._error})")

    def publish(self, messages: Iterable[Outgoing]) -> None:
        for m in messages:
            self._q.put(m)

    def heartbeat_now(self) -> None:
        self._q.put(TOPIC_HEARTBEAT)

    def _run(self) -> None:
        own = self._context is None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context() if own else self._context  # type: ignore[assignment]
        sock = ctx.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, self.send_hwm)
        # Peers that connect and never finish the handshake are dropped (see control.py);
        # subscribers send nothing, so anything they send is capped too.
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 16)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        try:
            if self.curve is not None:
                apply_server(sock, self.curve)
            sock.bind(self.endpoint)
        except (zmq.ZMQError, ConfigError) as e:
            self._error = str(e)
            sock.close(linger=0)
            if own:
                ctx.term()
            self._bound.set()
            return
        self._bound.set()
        log.info("publishing on %s", self.endpoint)
        # Subscribers that were connected before a restart reconnect within ~100 ms; give them
        # time, or the first messages (often the catch-up of a backlog) go to nobody.
        time.sleep(self.startup_grace_s)
        self._next_beat = time.monotonic() + self.heartbeat_interval_s
        try:
            for item in self._items():
                if item is _STOP:
                    return
                if item == TOPIC_HEARTBEAT:
                    try:
                        health = self._health()
                    except Exception as e:  # a heartbeat must not end the publisher
                        log.exception("heartbeat: health failed")
                        health = {"status": f"health failed: {e!r}"}
                    payload = {"timestamp": time.time(), "last_seq": self.last_seq, **health}
                    sock.send_multipart(encode(TOPIC_HEARTBEAT, payload))
                    self._next_beat = time.monotonic() + self.heartbeat_interval_s
                    continue
                batch: list[Outgoing] = item
                for m in batch:
                    sock.send_multipart(encode(m.topic, {**m.payload, "seq": m.seq}))
                    self.last_seq = max(self.last_seq, m.seq)
                    self.sent += 1
                failpoints.reach("sent")
                if self._on_sent:
                    self._on_sent([m.seq for m in batch])
        finally:
            # Give queued messages a moment to reach connected subscribers, then close with
            # linger 0: with a linger, libzmq's context termination was seen to hang for good
            # when a subscriber had vanished with messages pending (the outbox and the state
            # endpoint keep what a subscriber misses recoverable).
            time.sleep(0.2)
            sock.close(linger=0)
            if own:
                ctx.term()

    def _items(self) -> Iterator[Any]:
        """Queue items, batching consecutive messages; a heartbeat when one is due."""
        while True:
            timeout = self._next_beat - time.monotonic()
            if timeout <= 0:
                yield TOPIC_HEARTBEAT
                continue
            try:
                item = self._q.get(timeout=timeout)
            except queue.Empty:
                continue
            if not isinstance(item, Outgoing):
                yield item
                continue
            batch = [item]
            while len(batch) < 256:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, Outgoing):
                    yield batch
                    batch = []
                    yield nxt
                    break
                batch.append(nxt)
            if batch:
                yield batch

    @property
    def alive(self) -> bool:
        """The PUB socket's thread is up and bound: part of the daemon's health."""
        return self._thread.is_alive() and self._bound.is_set() and self._error is None

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued, then close the socket. Idempotent."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)


def subscribe(
    endpoint: str,
    topics: Iterable[str] = ("",),
    *,
    timeout_s: float | None = None,
    stop: threading.Event | None = None,
    curve: CurveClient | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (topic, payload) from a PUB endpoint.

    Ends after timeout_s without a message, or soon after `stop` is set.
    """
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = subscriber_socket(ctx, endpoint, topics, curve)
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    last = time.monotonic()
    try:
        while not (stop and stop.is_set()):
            if poller.poll(100):
                last = time.monotonic()
                yield decode(sock.recv_multipart())
            elif timeout_s is not None and time.monotonic() - last > timeout_s:
                return
    finally:
        sock.close()
