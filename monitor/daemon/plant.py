"""[mqtt] and [opcua]: more sinks of the committed stream (README "Plant integration")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from monitor.config import Config
from monitor.errors import ConfigError

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class Plant:
    """The MQTT publisher and OPC UA server that run, beside the ZeroMQ publisher."""

    def __init__(self) -> None:
        self.mqtt: Any = None  # MqttPublisher, with [mqtt] enabled
        self.sinks: list[Any] = []  # the OPC UA and MQTT sinks that run

    @property
    def alive(self) -> bool:
        return all(sink.alive for sink in self.sinks)

    def start(self, cfg: Config, *, last_seq: int, health: Callable[[], dict[str, Any]],
              handler: Handler, on_mqtt_drop: Callable[[int], None],
              undo: list[Callable[[], None]]) -> list[Any]:
        """Start what the config enables, pushing each stop on `undo`; returns the sinks."""
        if cfg.mqtt.enabled:
            try:
                from monitor.daemon.mqtt import MqttPublisher
            except ImportError as e:
                raise ConfigError(f"mqtt.enabled needs paho-mqtt ({e}): pip install "
                                  "'paho-mqtt>=2', or set mqtt.enabled = false") from e
            mqtt = self.mqtt = MqttPublisher(
                cfg.mqtt, health=health,
                heartbeat_interval_s=cfg.publish.heartbeat_interval_s,
                on_drop=on_mqtt_drop)
            mqtt.start(last_seq=last_seq)
            undo.append(mqtt.stop)
            self.sinks.append(mqtt)
        if cfg.opcua.enabled:
            try:
                from monitor.daemon.opcua import OpcuaServer
            except ImportError as e:
                raise ConfigError(f"opcua.enabled needs asyncua ({e}): pip install "
                                  "'asyncua>=1.1', or set opcua.enabled = false") from e
            opcua = OpcuaServer(cfg.opcua, handler=handler, health=health,
                                heartbeat_interval_s=cfg.publish.heartbeat_interval_s)
            opcua.start(last_seq=last_seq)
            undo.append(opcua.stop)
            self.sinks.append(opcua)
        return self.sinks
