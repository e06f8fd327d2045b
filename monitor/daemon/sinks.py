"""Where committed messages go: the ZeroMQ publisher and, when on, OPC UA and MQTT.

Every sink gets the same stream: each message after its commit, with its outbox seq, in seq
order, and after a restart the messages the ZeroMQ publisher had not sent (re-sends keep
their seq). The ZeroMQ publisher alone marks outbox rows sent, so the guarantee for every
sink is at-least-once within what it can queue, with seq for deduplication; a message the
ZeroMQ publisher sent just before a crash but another sink had not may be missing there
(README "Plant integration").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from monitor.records import Outgoing


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
