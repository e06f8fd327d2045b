"""The MQTT publisher: its owner thread, the paho client, a bounded queue, retained state.

Fed the committed outbox stream like the ZeroMQ publisher (after the commit, with the same
seq, re-sends included). Topics, with <printer> the message's printer (mqtt.printer for the
single printer, named "" in messages):

    pbf-monitor/<printer>/layer | alarm | heartbeat     the ZeroMQ JSON, seq included; QoS 1
    pbf-monitor/<printer>/state/last_layer               retained: the last layer message
    pbf-monitor/<printer>/state/alarms/<id>              retained while open or acknowledged;
                                                         an empty retained message clears it
    pbf-monitor/<printer>/state/online                   retained "true"; "false" as the will

A broker that is down or slow never holds up a layer: messages wait in a queue of
mqtt.queue_size; beyond it the oldest are dropped, counted (`dropped`) and logged. What was
handed to the client before a disconnect is re-sent by it on reconnect, and the retained state
is published again on every connect, so a broker restarted without persistence has it too.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from monitor.config import MqttConfig
from monitor.errors import ConfigError
from monitor.records import Outgoing

log = logging.getLogger(__name__)

PREFIX = "pbf-monitor"
_MAX_INFLIGHT = 100  # handed to the client and not yet acknowledged by the broker


class MqttPublisher:
    """Owns the paho client on its own thread; publish() only appends to a bounded queue."""

    def __init__(self, cfg: MqttConfig, *, health: Callable[[], dict[str, Any]],
                 heartbeat_interval_s: float = 5.0,
                 on_drop: Callable[[int], None] | None = None) -> None:
        self.cfg = cfg
        self._health = health
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_drop = on_drop
        url = urlsplit(cfg.url)
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        self.password = _read_password(cfg)
        self.dropped = 0
        self.sent = 0
        self.last_seq = 0
        self.connected = False
        self._q: collections.deque[tuple[str, bytes, bool]] = collections.deque()
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._inflight: set[int] = set()
        self._retained: dict[str, bytes] = {}  # the present, published again on each connect
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, *, last_seq: int = 0) -> None:
        self.last_seq = last_seq
        self._thread.start()

    def publish(self, messages: Iterable[Outgoing]) -> None:
        """Queue the messages (and their retained state); never blocks."""
        batch = list(messages)
        out: list[tuple[str, bytes, bool]] = []
        for m in batch:
            payload = {**m.payload, "seq": m.seq}
            base = self.base(str(payload.get("printer") or ""))
            data = json.dumps(payload, separators=(",", ":")).encode()
            out.append((f"{base}/{m.topic}", data, False))
            if m.topic == "layer":
                out.append((f"{base}/state/last_layer", data, True))
            elif m.topic == "alarm" and not payload.get("test"):
                cleared = payload.get("state") == "cleared"
                out.append((f"{base}/state/alarms/{payload['id']}", b"" if cleared else data,
                            True))
        with self._cv:
            self.last_seq = max([self.last_seq, *(m.seq for m in batch)])
            self._put(out)

    def base(self, printer: str) -> str:
        return f"{PREFIX}/{printer or self.cfg.printer}"

    def _put(self, items: list[tuple[str, bytes, bool]]) -> None:
        """Append under the lock, dropping the oldest beyond queue_size."""
        dropped = 0
        for item in items:
            if len(self._q) >= self.cfg.queue_size:
                self._q.popleft()
                dropped += 1
            self._q.append(item)
        if dropped:
            if self.dropped == 0 or (self.dropped + dropped) // 1000 > self.dropped // 1000:
                log.warning("MQTT broker %s:%d not keeping up: queue of %d full, dropped %d "
                            "message(s) so far", self.host, self.port, self.cfg.queue_size,
                            self.dropped + dropped)
            self.dropped += dropped
            if self._on_drop is not None:
                self._on_drop(dropped)
        self._cv.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is queued while the broker takes it (bounded), then disconnect."""
        if self._thread.is_alive():
            self._stop.set()
            with self._cv:
                self._cv.notify()
            self._thread.join(timeout)

    # ------------------------------------------------------------ the owner thread

    def _client(self) -> paho.Client:
        cfg = self.cfg
        client = paho.Client(CallbackAPIVersion.VERSION2,
                             client_id=cfg.client_id or f"pbf-monitor-{cfg.printer}",
                             clean_session=True)
        if self.tls:
            client.tls_set(ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                           certfile=str(cfg.cert_file) if cfg.cert_file else None,
                           keyfile=str(cfg.key_file) if cfg.key_file else None)
        if cfg.username:
            client.username_pw_set(cfg.username, self.password)
        client.max_inflight_messages_set(_MAX_INFLIGHT)
        client.max_queued_messages_set(0)
        client.will_set(f"{self.base('')}/state/online", b"false", qos=1, retain=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        return client

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                    props: Any) -> None:
        if reason.is_failure:
            log.warning("MQTT broker %s:%d refused the connection: %s", self.host, self.port,
                        reason)
            return
        self.connected = True
        log.info("MQTT connected to %s:%d", self.host, self.port)
        client.publish(f"{self.base('')}/state/online", b"true", qos=1, retain=True)
        for topic, data in list(self._retained.items()):
            client.publish(topic, data, qos=1, retain=True)

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:
        if self.connected:
            log.warning("MQTT disconnected from %s:%d (%s); queueing", self.host, self.port,
                        reason)
        self.connected = False

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    props: Any) -> None:
        self._inflight.discard(mid)

    def _run(self) -> None:
        client = self._client()
        retry = 0.0
        backoff = 0.2
        next_beat = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self._stop.is_set() and (not self._q or not self.connected):
                    break
                if not self.connected and now >= retry and not self._stop.is_set():
                    try:
                        client.connect(self.host, self.port, keepalive=self.cfg.keepalive_s)
                        backoff = 0.2
                    except (OSError, ValueError) as e:
                        log.debug("MQTT connect to %s:%d failed: %s", self.host, self.port, e)
                        retry, backoff = now + backoff, min(backoff * 2, 5.0)
                if now >= next_beat:
                    payload = {"timestamp": time.time(), "last_seq": self.last_seq,
                               **self._health()}
                    with self._cv:
                        self._put([(f"{self.base('')}/heartbeat",
                                    json.dumps(payload, default=str).encode(), False)])
                    next_beat = now + self.heartbeat_interval_s
                if self.connected:
                    self._send(client)
                try:
                    client.loop(timeout=0.05)
                except Exception:  # a broker's odd answer never ends the thread
                    log.exception("MQTT client loop failed; reconnecting")
                    self.connected = False
                if not self.connected or not self._q:
                    with self._cv:
                        if not self._q and not self._stop.is_set():
                            self._cv.wait(0.05)
        finally:
            try:
                if self.connected:
                    client.publish(f"{self.base('')}/state/online", b"false", qos=1,
                                   retain=True)
                    deadline = time.monotonic() + 2
                    while self._inflight and time.monotonic() < deadline:
                        client.loop(timeout=0.05)
                client.disconnect()
            except Exception:
                log.exception("MQTT disconnect failed")

    def _send(self, client: paho.Client) -> None:
        while self._q and len(self._inflight) < _MAX_INFLIGHT:
            with self._cv:
                if not self._q:
                    return
                topic, data, retain = self._q.popleft()
            if retain:
                if data:
                    self._retained[topic] = data
                else:
                    self._retained.pop(topic, None)
            info = client.publish(topic, data, qos=1, retain=retain)
            if info.rc != paho.MQTT_ERR_SUCCESS:  # lost the connection just now: try again
                with self._cv:
                    self._q.appendleft((topic, data, retain))
                self.connected = False
                return
            self._inflight.add(info.mid)
            self.sent += 1


def _read_password(cfg: MqttConfig) -> str | None:
    if cfg.password_file is None:
        return None
    try:
        return cfg.password_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"mqtt.password_file {cfg.password_file}: cannot read "
                          f"({e.strerror or e})") from e
