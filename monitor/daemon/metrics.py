"""Prometheus metrics of one daemon, and the bounded HTTP endpoint that serves them.

Each daemon has its own registry (tests run several in one process). Values that are state,
not events (queue depth, seconds since the last layer of each active build), are read at
scrape time from the daemon through a custom collector, so they can never go stale.

The endpoint is one thread with a selector, not prometheus-client's server (a thread and a
descriptor per connection, kept for as long as the peer likes): a connection costs a
descriptor only, is dropped when idle for IDLE_S, and past MAX_CONNECTIONS the oldest is
dropped, so idle connections can neither exhaust the daemon's descriptors nor lock out a
scrape.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
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
        self._server: MetricsServer | None = None

    def serve(self, listen: str) -> None:
        """Serve /metrics on HOST:PORT; ConfigError naming the key if that fails."""
        host, _, port = listen.rpartition(":")
        try:
            self._server = MetricsServer(host or "127.0.0.1", int(port),
                                         lambda: generate_latest(self.registry))
            self._server.start()
        except (OSError, ValueError) as e:
            raise ConfigError(f"metrics.listen {listen!r}: cannot serve ({e})") from e
        log.info("metrics on http://%s/metrics", listen)

    @property
    def alive(self) -> bool:
        """The endpoint's thread is serving (or the endpoint is off): part of health."""
        return self._server is None or self._server.alive

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


IDLE_S = 5.0  # a connection that has not sent a whole request by then is closed
MAX_CONNECTIONS = 64  # past this, the oldest connection is closed to make room
_MAX_REQUEST = 8192  # bytes of request line and headers


class MetricsServer:
    """GET /metrics over HTTP/1.0-style one-request connections, on one selector thread."""

    def __init__(self, host: str, port: int, render: Callable[[], bytes], *,
                 idle_s: float = IDLE_S, max_connections: int = MAX_CONNECTIONS) -> None:
        self.render = render
        self.idle_s = idle_s
        self.max_connections = max_connections
        self.served = 0
        self.dropped = 0  # idle or evicted connections closed unanswered
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host.strip("[]"), port))
            self._listener.listen(128)
            self._listener.setblocking(False)
        except BaseException:
            self._listener.close()
            raise
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        # socket -> (opened at, bytes received so far); insertion order = age.
        self._conns: dict[socket.socket, tuple[float, bytearray]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self.failed: str | None = None

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ)
        self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection. Idempotent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        for conn in list(self._conns):
            self._close(conn)
        if self._listener.fileno() != -1:
            self._sel.close()
            self._listener.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for key, _ in self._sel.select(0.2):
                    sock: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        if sock is self._listener:
                            self._accept()
                        else:
                            self._read(sock)
                    except Exception:  # one connection must never end the endpoint
                        log.exception("metrics endpoint: a connection failed")
                        self._close(sock)
                self._expire()
        except BaseException as e:
            self.failed = f"{type(e).__name__}: {e}"
            log.critical("metrics endpoint stopped: %s", self.failed)
            raise

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:  # EMFILE: say so, and keep serving the connections we have
            log.warning("metrics endpoint: cannot accept (%s)", e.strerror or e)
            return
        conn.setblocking(False)
        while len(self._conns) >= self.max_connections:
            self.dropped += 1
            self._close(next(iter(self._conns)))  # the oldest
        self._conns[conn] = (time.monotonic(), bytearray())
        self._sel.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)
            return
        buf = self._conns[conn][1]
        buf += chunk
        if b"\r\n\r\n" not in buf and b"\n\n" not in buf:
            if len(buf) > _MAX_REQUEST:
                self._respond(conn, 431, b"request header too large\n")
            return
        line = bytes(buf).split(b"\n", 1)[0].decode("latin-1").split()
        if len(line) < 2 or line[0] not in ("GET", "HEAD"):
            self._respond(conn, 405, b"only GET\n")
        elif line[1].split("?", 1)[0] not in ("/", "/metrics"):
            self._respond(conn, 404, b"see /metrics\n")
        else:
            try:
                body = self.render()
            except Exception:
                log.exception("metrics endpoint: collecting the metrics failed")
                self._respond(conn, 500, b"collecting the metrics failed\n")
                return
            self._respond(conn, 200, b"" if line[0] == "HEAD" else body,
                          content_type=CONTENT_TYPE_LATEST, length=len(body))

    def _respond(self, conn: socket.socket, status: int, body: bytes, *,
                 content_type: str = "text/plain; charset=utf-8",
                 length: int | None = None) -> None:
        reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                  431: "Request Header Fields Too Large",
                  500: "Internal Server Error"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                "Connection: close\r\n\r\n").encode()
        self._sel.unregister(conn)
        try:
            # Blocking with a short timeout: a reply (a few KB) fits the socket buffer; a
            # peer that does not read it costs the loop at most this long.
            conn.settimeout(1.0)
            conn.sendall(head + body)
            self.served += 1
        except OSError:
            pass
        finally:
            self._conns.pop(conn, None)
            conn.close()

    def _expire(self) -> None:
        deadline = time.monotonic() - self.idle_s
        for conn, (opened, _) in list(self._conns.items()):
            if opened > deadline:
                break  # insertion order: the rest are younger
            self.dropped += 1
            self._close(conn)

    def _close(self, conn: socket.socket) -> None:
        if self._conns.pop(conn, None) is not None:
            self._sel.unregister(conn)
        conn.close()
