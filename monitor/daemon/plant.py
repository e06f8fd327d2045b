"""[mqtt] and [opcua]: more sinks of the committed stream (README "Plant integration")."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from monitor.config import Config
from monitor.errors import ConfigError
from monitor.records import OutboxStart

log = logging.getLogger(__name__)
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def enabled_sinks(cfg: Config) -> list[str]:
    """The names of the sinks the config turns on: their cursors count (monitor.daemon.sinks)."""
    return [name for name, on in (("mqtt", cfg.mqtt.enabled), ("opcua", cfg.opcua.enabled))
            if on]


class Plant:
    """The MQTT publisher and OPC UA server that run, beside the ZeroMQ publisher."""

    def __init__(self) -> None:
        self.mqtt: Any = None  # MqttPublisher, with [mqtt] enabled
        self.sinks: list[Any] = []  # the OPC UA and MQTT sinks that run

    @property
    def alive(self) -> bool:
        return all(sink.alive for sink in self.sinks)

    def start(self, cfg: Config, *, outbox: OutboxStart, health: Callable[[], dict[str, Any]],
              handler: Handler, on_mqtt_drop: Callable[[int], None],
              on_cursor: Callable[[str, int], None],
              undo: list[Callable[[], None]]) -> list[Any]:
        """Start what the config enables, each showing the present and then handed what
        came after its cursor, pushing each stop on `undo`; returns the sinks."""
        if cfg.mqtt.enabled:
            try:
                from monitor.daemon.mqtt import MqttPublisher
            except ImportError as e:
                raise ConfigError(f"mqtt.enabled needs paho-mqtt ({e}): pip install "
                                  "'paho-mqtt>=2', or set mqtt.enabled = false") from e
            mqtt = self.mqtt = MqttPublisher(
                cfg.mqtt, health=health,
                heartbeat_interval_s=cfg.publish.heartbeat_interval_s,
                on_drop=on_mqtt_drop, on_cursor=lambda seq: on_cursor("mqtt", seq),
                printers=[p.name for p in cfg.fleet()])
            self._start(mqtt, outbox, undo)
        if cfg.opcua.enabled:
            try:
                from monitor.daemon.opcua import OpcuaServer
            except ImportError as e:
                raise ConfigError(f"opcua.enabled needs asyncua ({e}): pip install "
                                  "'asyncua>=1.1', or set opcua.enabled = false") from e
            opcua = OpcuaServer(cfg.opcua, handler=handler, health=health,
                                heartbeat_interval_s=cfg.publish.heartbeat_interval_s,
                                on_cursor=lambda seq: on_cursor("opcua", seq))
            self._start(opcua, outbox, undo)
        return self.sinks

    def _start(self, sink: Any, outbox: OutboxStart, undo: list[Callable[[], None]]) -> None:
        cursor = outbox.cursors[sink.name]
        sink.start(cursor=cursor, present=outbox.present)
        undo.append(sink.stop)
        self.sinks.append(sink)
        backlog = outbox.backlog[sink.name]
        if backlog:
            log.info("%s: sending %d message(s) committed after its cursor (seq %d)",
                     sink.name, len(backlog), cursor)
            sink.publish(backlog)
