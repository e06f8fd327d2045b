"""The MQTT publisher: its owner thread, the paho client, a bounded queue, retained state.

Fed the committed outbox stream like the ZeroMQ publisher (after the commit, with the same
seq). Topics, with <printer> the message's printer (mqtt.printer for the single printer,
named "" in messages):

    pbf-monitor/<printer>/layer | alarm | heartbeat     the ZeroMQ JSON, seq included; QoS 1
    pbf-monitor/<printer>/state/last_layer               retained: the last layer message
    pbf-monitor/<printer>/state/alarms/<id>              retained while open or acknowledged;
                                                         an empty retained message clears it
    pbf-monitor/<printer>/state/online                   retained "true"; "false" as the will

A broker that is down or slow never holds up a layer: the stream (layer, alarm, heartbeat)
waits in a queue of mqtt.queue_size; beyond it the oldest are dropped, counted (`dropped`)
and logged. What was handed to the client before a disconnect is re-sent by it on reconnect.
`cursor` is the seq up to which every message was acknowledged by the broker or dropped; the
daemon stores it (monitor.daemon.sinks.Cursors) and, after a restart, hands this publisher
again what followed it.

The retained state is the present, not a queue: the newest message per topic (a printer's
last layer, each alarm not yet cleared), seeded from the database at start, published when
a topic changes and all of it again on every connect (a broker restarted without persistence
has it too). On connect the publisher also reads the broker's retained alarms of its
printers and empties those that are not open here (cleared while the daemon was down).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections.abc import Callable, Collection, Iterable
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from monitor.config import MqttConfig
from monitor.errors import ConfigError
from monitor.records import Outgoing, Present

log = logging.getLogger(__name__)

PREFIX = "pbf-monitor"
_MAX_INFLIGHT = 100  # handed to the client and not yet acknowledged by the broker


class MqttPublisher:
    """Owns the paho client on its own thread; publish() only appends to a bounded queue."""

    name = "mqtt"  # its cursor's name in the database

    def __init__(self, cfg: MqttConfig, *, health: Callable[[], dict[str, Any]],
                 heartbeat_interval_s: float = 5.0,
                 on_drop: Callable[[int], None] | None = None,
                 on_cursor: Callable[[int], None] | None = None,
                 printers: Collection[str] = ("",)) -> None:
        self.cfg = cfg
        self._health = health
        self.heartbeat_interval_s = heartbeat_interval_s
        self._on_drop = on_drop
        self._on_cursor = on_cursor
        url = urlsplit(cfg.url)
        self.host = url.hostname or "127.0.0.1"
        self.tls = url.scheme == "mqtts"
        self.port = url.port or (8883 if self.tls else 1883)
        self.password = _read_password(cfg)
        self.dropped = 0
        self.sent = 0
        self.last_seq = 0  # the newest seq handed to this publisher
        self.cursor = 0  # every seq up to it acknowledged by the broker or dropped
        self._reported = 0  # the cursor last given to on_cursor
        self._present_seq = 0  # the present seeded at start is as of this seq
        self.connected = False
        # The stream: (seq, topic, payload); seq None for heartbeats.
        self._q: collections.deque[tuple[int | None, str, bytes]] = collections.deque()
        self._handed: collections.deque[int] = collections.deque()  # seqs not behind cursor
        self._done: set[int] = set()  # of those, acknowledged or dropped
        self._cv = threading.Condition()
        self._stop = threading.Event()
        # mid -> (seq, topic, payload) handed to the client and not yet acknowledged
        self._inflight: dict[int, tuple[int | None, str, bytes]] = {}
        # The present: topic -> newest retained payload (b"": an alarm cleared, to empty at
        # the broker); _dirty: the topics to publish (an ordered set).
        self._retained: dict[str, bytes] = {}
        self._dirty: dict[str, None] = {}
        self._alarm_topics = [f"{self.base(p)}/state/alarms/+" for p in sorted(set(printers))]
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def start(self, *, cursor: int = 0, present: Present | None = None) -> None:
        """Start from the stored cursor, with the retained state of the present."""
        self.last_seq = self.cursor = self._reported = cursor
        if present is not None:
            with self._cv:
                self._present_seq = present.seq
                for m in present.messages:
                    self._retain(m, *self._encode(m))
        self._thread.start()

    def publish(self, messages: Iterable[Outgoing]) -> None:
        """Queue the messages and update the retained state; never blocks."""
        with self._cv:
            for m in messages:
                if m.seq <= self.last_seq:
                    continue  # handed already
                self.last_seq = m.seq
                base, data = self._encode(m)
                self._handed.append(m.seq)
                self._put([(m.seq, f"{base}/{m.topic}", data)])
                if m.seq > self._present_seq:  # older ones: in the present seeded at start
                    self._retain(m, base, data)

    def base(self, printer: str) -> str:
        return f"{PREFIX}/{printer or self.cfg.printer}"

    def _encode(self, m: Outgoing) -> tuple[str, bytes]:
        """(topic base, the ZeroMQ JSON with seq)."""
        payload = {**m.payload, "seq": m.seq}
        return (self.base(str(payload.get("printer") or "")),
                json.dumps(payload, separators=(",", ":")).encode())

    def _retain(self, m: Outgoing, base: str, data: bytes) -> None:
        """The message's change to the present, if any (lock held)."""
        if m.topic == "layer":
            topic, value = f"{base}/state/last_layer", data
        elif m.topic == "alarm" and not m.payload.get("test"):
            topic = f"{base}/state/alarms/{m.payload['id']}"
            value = b"" if m.payload.get("state") == "cleared" else data
        else:
            return
        self._retained[topic] = value
        self._dirty[topic] = None
        self._cv.notify()

    def _put(self, items: list[tuple[int | None, str, bytes]]) -> None:
        """Append under the lock, dropping the oldest beyond queue_size."""
        dropped = 0
        for item in items:
            if len(self._q) >= self.cfg.queue_size:
                seq = self._q.popleft()[0]
                dropped += 1
                if seq is not None:
                    self._finish(seq)
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

    def _finish(self, seq: int) -> None:
        """A message acknowledged or dropped: move the cursor over what is done (lock held)."""
        self._done.add(seq)
        while self._handed and self._handed[0] in self._done:
            self.cursor = self._handed.popleft()
            self._done.discard(self.cursor)

    def _report(self) -> None:
        """Hand a cursor that moved to on_cursor (owner thread)."""
        with self._cv:
            cursor = self.cursor
        if cursor > self._reported and self._on_cursor is not None:
            self._reported = cursor
            self._on_cursor(cursor)

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
        client.on_message = self._on_message
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
        with self._cv:  # the whole present again, before the stream
            self._dirty.update(dict.fromkeys(self._retained))
        client.subscribe([(topic, 1) for topic in self._alarm_topics])

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any,
                       props: Any) -> None:
        if self.connected:
            log.warning("MQTT disconnected from %s:%d (%s); queueing", self.host, self.port,
                        reason)
        self.connected = False

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any,
                    props: Any) -> None:
        sent = self._inflight.pop(mid, None)
        if sent is None:
            return
        seq, topic, data = sent
        with self._cv:
            if seq is not None:
                self._finish(seq)
            elif not data and self._retained.get(topic) == b"" and topic not in self._dirty:
                del self._retained[topic]  # emptied at the broker: nothing to repeat

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        """The broker's retained alarms of our printers, sent on subscribing: one that is not
        open here is emptied (it cleared while the daemon was down, or MQTT was off)."""
        if not msg.retain or not msg.payload:
            return
        with self._cv:
            if msg.topic not in self._retained:
                log.info("MQTT: %s is retained at the broker but not open: emptying it",
                         msg.topic)
                self._retained[msg.topic] = b""
                self._dirty[msg.topic] = None

    def _run(self) -> None:
        client = self._client()
        retry = 0.0
        backoff = 0.2
        next_beat = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self._stop.is_set() and (not (self._q or self._dirty) or not self.connected):
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
                        self._put([(None, f"{self.base('')}/heartbeat",
                                    json.dumps(payload, default=str).encode())])
                    next_beat = now + self.heartbeat_interval_s
                if self.connected:
                    self._send(client)
                try:
                    client.loop(timeout=0.05)
                except Exception:  # a broker's odd answer never ends the thread
                    log.exception("MQTT client loop failed; reconnecting")
                    self.connected = False
                self._report()
                if not self.connected or not (self._q or self._dirty):
                    with self._cv:
                        if not (self._q or self._dirty) and not self._stop.is_set():
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
            self._report()

    def _send(self, client: paho.Client) -> None:
        """The retained topics that changed first, then the stream, while the broker keeps
        up (at most _MAX_INFLIGHT unacknowledged)."""
        while len(self._inflight) < _MAX_INFLIGHT:
            with self._cv:
                seq: int | None = None
                if self._dirty:
                    topic = next(iter(self._dirty))
                    del self._dirty[topic]
                    data, retain = self._retained.get(topic, b""), True
                elif self._q:
                    seq, topic, data = self._q.popleft()
                    retain = False
                else:
                    return
            info = client.publish(topic, data, qos=1, retain=retain)
            if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
                with self._cv:  # not taken by the client: again after the reconnect
                    if retain:
                        self._dirty[topic] = None
                    else:
                        self._q.appendleft((seq, topic, data))
                self.connected = False
                return
            # Taken: the client keeps a QoS 1 message until the broker acknowledges it, and
            # sends it again on reconnect (also one that found no connection just now).
            self._inflight[info.mid] = (seq, topic, data)
            if not retain:
                self.sent += 1
            if info.rc == paho.MQTT_ERR_NO_CONN:
                self.connected = False
                return


def _read_password(cfg: MqttConfig) -> str | None:
    if cfg.password_file is None:
        return None
    try:
        return cfg.password_file.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(f"mqtt.password_file {cfg.password_file}: cannot read "
                          f"({e.strerror or e})") from e
