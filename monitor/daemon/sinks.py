"""Where committed messages go: the ZeroMQ publisher and, when on, OPC UA and MQTT.

Every sink gets the same stream: each message after its commit, with its outbox seq, in seq
order. Each keeps its own account of what it has taken: the ZeroMQ publisher marks outbox
rows sent (the rows not marked go out again on restart), and OPC UA and MQTT each move a
cursor in the database (sink_cursors) past the messages they have delivered (MQTT: the
broker acknowledged them at QoS 1, or the bounded queue dropped and counted them). On start,
each sink is sent the messages after its own cursor, so a kill -9 loses nothing that a sink
had not taken; re-sends keep their seq (README "Plant integration").
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Protocol

from sqlalchemy.orm import Session

from monitor.records import Outgoing
from monitor.store import writes
from monitor.store.writer import StoreWriter


class Sink(Protocol):
    def publish(self, messages: Iterable[Outgoing]) -> None: ...


class Fanout:
    """Hands each batch to every sink; each sink's publish() only queues, never blocks."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = tuple(sinks)

    def publish(self, messages: Iterable[Outgoing]) -> None:
        batch = list(messages)
        for sink in self.sinks:
            sink.publish(batch)


class Cursors:
    """Stores sinks' cursors through the writer, from any thread; advances that come while
    a write is queued ride along with it (one write, whatever the rate of acknowledgements)."""

    def __init__(self, writer: StoreWriter) -> None:
        self.writer = writer
        self._lock = threading.Lock()
        self._due: dict[str, int] = {}  # sink -> newest cursor not yet handed to a write

    def advance(self, name: str, seq: int) -> None:
        with self._lock:
            queued = bool(self._due)
            self._due[name] = max(seq, self._due.get(name, seq))
        if not queued:
            self.writer.submit(self._write)

    def _write(self, s: Session) -> None:
        with self._lock:
            due, self._due = self._due, {}
        writes.set_cursors(s, due)
