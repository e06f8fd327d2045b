"""Prometheus metrics of one daemon, served over HTTP by prometheus-client's own thread.

Each daemon has its own registry (tests run several in one process). Values that are state,
not events (queue depth, seconds since the last layer of each active build), are read at
scrape time from the daemon through a custom collector, so they can never go stale.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.errors import ConfigError

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class _Live(Collector):
    """Gauges computed when scraped."""

    def __init__(self, queue: Callable[[], int], last_layers: Callable[[], dict[str, float]]
                 ) -> None:
        self._queue = queue
        self._last = last_layers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("pbf_monitor_queue_depth", "Layer files waiting for the worker",
                                value=self._queue())
        g = GaugeMetricFamily("pbf_monitor_seconds_since_last_layer",
                              "Seconds since the last layer of each active build",
                              labels=["build"])
        now = time.time()
        for build, at in self._last().items():
            g.add_metric([build], now - at)
        yield g


class Metrics:
    """The daemon's counters and histograms, and the HTTP endpoint."""

    def __init__(self, queue: Callable[[], int], last_layers: Callable[[], dict[str, float]]
                 ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.layers = Counter("pbf_monitor_layers", "Layers processed", ["status"], registry=r)
        self.inference = Histogram("pbf_monitor_inference_seconds", "Model time per layer",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("pbf_monitor_layer_latency_seconds",
                                 "From the file being noticed to the layer being stored",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.alarms = Counter("pbf_monitor_alarms", "Alarms opened",
                              ["class_name", "severity"], registry=r)
        self.batch = Histogram("pbf_monitor_batch_layers", "Layers per model call (a backlog "
                               "goes through together)", buckets=(1, 2, 4, 8, 16), registry=r)
        self.mqtt_dropped = Counter("pbf_monitor_mqtt_dropped", "Messages dropped because "
                                    "the MQTT broker did not take them in time (queue full)",
                                    registry=r)
        self.model = Info("pbf_monitor_model", "The model in use", registry=r)
        r.register(_Live(queue, last_layers))
        self._server: Any = None
        self._thread: Any = None

    def serve(self, listen: str) -> None:
        """Serve /metrics on HOST:PORT; ConfigError naming the key if that fails."""
        from prometheus_client import start_http_server

        host, _, port = listen.rpartition(":")
        try:
            self._server, self._thread = start_http_server(int(port), host or "127.0.0.1",
                                                           registry=self.registry)
        except (OSError, ValueError) as e:
            raise ConfigError(f"metrics.listen {listen!r}: cannot serve ({e})") from e
        log.info("metrics on http://%s/metrics", listen)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)
            self._server = None
