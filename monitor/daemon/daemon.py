"""The daemon: wires the stages and resources, starts them in order, stops them in reverse.

settler -> loader -> worker -> analyser -> store writer -> publisher; beside them the map
pool, the state endpoint, the hook and the metrics endpoint (README, "Architecture").
``start()`` brings them up in order and ``stop()`` takes them down in reverse, finishing the
layer in hand and flushing the store before the socket closes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.alarms.regions import Regions
from monitor.alarms.trust import ModelTrust
from monitor.config import Config
from monitor.daemon.analyser import Analyser, new_engine
from monitor.daemon.committer import Committer
from monitor.daemon.curve import curve_server, start_curve
from monitor.daemon.health import health_report, is_healthy
from monitor.daemon.hook import HookRunner, start_hook
from monitor.daemon.instance import claim_state_dir
from monitor.daemon.items import Analysable, Decoded
from monitor.daemon.loader import Loader
from monitor.daemon.maps import MapMaker
from monitor.daemon.metrics import Metrics
from monitor.daemon.parts import GeometryAhead, PartMeter
from monitor.daemon.plant import Plant, enabled_sinks
from monitor.daemon.preflight import check_watch_dir
from monitor.daemon.publisher import Publisher
from monitor.daemon.reload import Reloader
from monitor.daemon.requests import Requests
from monitor.daemon.sinks import Cursors, Fanout
from monitor.daemon.stage import Stage
from monitor.daemon.trust import fleet_trust, log_trust, untrusted
from monitor.daemon.watcher import Candidate, Settler, start_settlers
from monitor.daemon.worker import Worker, load_model
from monitor.errors import MonitorError
from monitor.store import queries, writes
from monitor.store.connect import open_db
from monitor.store.writer import StoreWriter
from monitor.vision.segmenter import Segmenter

log = logging.getLogger(__name__)


class Daemon:
    """pbf-monitor's long-running process, usable in-process (tests, demo) or from the CLI."""

    def __init__(self, cfg: Config, *, printer: str = "") -> None:
        self.cfg = cfg
        self.printer = printer
        self.ready = threading.Event()
        self.started_at = time.time()
        self.counts = {"ok": 0, "error": 0}  # written by the analyser
        self._stop = threading.Event()
        self._stack: list[Callable[[], None]] = []
        self._candidates: queue.Queue[Candidate] = queue.Queue(maxsize=cfg.watch.queue_size)
        # Between the stages: two ahead is enough to overlap, and bounds the decoded images
        # held in memory.
        self._decoded: queue.Queue[Decoded] = queue.Queue(maxsize=2)
        self._segmented: queue.Queue[Analysable] = queue.Queue(maxsize=2)
        # One per printer of the fleet ("" = the single [watch]/[camera] printer).
        self.printers = {(p.name or printer): p for p in cfg.fleet()}
        self.regions = Regions(cfg.regions, pixel_size_mm=cfg.camera.pixel_size_mm)
        self.settlers: dict[str, Settler] = {}
        # What start() made; None before it (health is asked while starting).
        self.writer: StoreWriter | None = None
        self.hook: HookRunner | None = None
        self.metrics: Metrics | None = None
        self._worker: Worker | None = None
        self._analyser: Analyser | None = None
        self._stages: tuple[Stage, ...] = ()
        self._reloader: Reloader | None = None
        self.trust: dict[str, ModelTrust] = {}  # printer -> trust in the served weights
        self._requests: Requests | None = None
        self._plant = Plant()  # the OPC UA and MQTT sinks that run
        # Threads that face the outside, by name: each must survive any input, and a dead one
        # makes the daemon unhealthy (the systemd watchdog then restarts it).
        self._serving: dict[str, Any] = {}

    @property
    def mqtt(self) -> Any:
        """The MqttPublisher, with [mqtt] enabled; else None."""
        return self._plant.mqtt

    @property
    def segmenter(self) -> Segmenter | None:
        """The model being served."""
        return self._worker.model if self._worker else None

    # ------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Bring everything up in order; on failure, undo what was started and re-raise."""
        try:
            publisher = self._start_all()
        except BaseException:
            self.stop()
            raise
        self.ready.set()
        publisher.heartbeat_now()
        log.info("ready")

    def stop(self) -> None:
        """Stop in reverse order of start. Idempotent."""
        self._stop.set()
        while self._stack:
            undo = self._stack.pop()
            try:
                undo()
            except Exception:
                log.exception("error while stopping")

    def _start_all(self) -> Publisher:
        cfg = self.cfg
        self._init_lock()
        engine, reader = self._init_store()
        model, weights = load_model(cfg)
        alarms = new_engine(cfg, class_names=model.class_names, regions=self.regions,
                            cameras={n: (p.camera.pixel_size_mm, p.camera.layer_thickness_mm)
                                     for n, p in self.printers.items()}, reader=reader)
        writer = self.writer = StoreWriter(engine)
        writer.start()
        self._stack.append(writer.stop)
        hook = self.hook = self._start_hook()
        ctx = self._init_zmq()
        publisher, sinks = self._start_publisher(writer, ctx)
        metrics = self.metrics = Metrics(queue=self._candidates.qsize,
                                         last_layers=self._last_arrivals)
        committer = Committer(writer=writer, publisher=sinks, hook=hook, metrics=metrics,
                              max_components=cfg.store.max_components,
                              hook_severities=cfg.alarms.hook.severities)
        maps = MapMaker(cfg.store, state_dir=cfg.state_dir, writer=writer)
        meters = {n: PartMeter(p.camera, p.geometry)
                  for n, p in self.printers.items() if p.geometry.nominal}
        ahead = None
        if meters:
            ahead = GeometryAhead(meters)
            self._stack.append(ahead.stop)  # after the stages stop: nothing submits then
        loader = Loader(inbox=self._candidates, outbox=self._decoded,
                        watch={n: p.watch for n, p in self.printers.items()},
                        settlers=self.settlers, stop=self._stop, geometry=ahead)
        worker = self._worker = Worker(model=model, weights=weights, metrics=metrics,
                                       inbox=self._decoded, outbox=self._segmented,
                                       stop=self._stop)
        analyser = self._analyser = Analyser(
            engine=alarms, regions=self.regions, cfg=cfg,
            pixel_size_mm={n: p.camera.pixel_size_mm for n, p in self.printers.items()},
            reader=reader, committer=committer, maps=maps, settlers=self.settlers,
            metrics=metrics, counts=self.counts, inbox=self._segmented, upstream=worker,
            stop=self._stop, parts=meters, geometry=ahead)
        self._reloader = Reloader(cfg, worker=worker, analyser=analyser,
                                  on_model=self._set_model_info)
        requests = self._requests = Requests(
            printer=self.printer, reader=reader, analyser=analyser, committer=committer,
            health=self.health, active_s=cfg.alarms.stall.active_s)
        self._start_control(requests.handle, ctx)
        self._start_metrics(metrics, model)
        self._stack.append(maps.stop)
        self._start_stages(loader, worker, analyser)
        self._start_settlers(reader)
        return publisher

    def _init_lock(self) -> None:
        """One daemon per state folder and database: before anything is bound or written."""
        lock = claim_state_dir(self.cfg.state_dir, self.cfg.store_url)
        self._stack.append(lock.release)
        for name, p in self.printers.items():  # before the model loads: fail in a second
            check_watch_dir(p.watch, printer=name)

    def _init_store(self) -> tuple[Engine, Engine]:
        url = self.cfg.store_url
        engine = open_db(url, writer=True)
        self._stack.append(engine.dispose)
        reader = open_db(url, writer=False)
        self._stack.append(reader.dispose)
        log.info("database %s", url)
        return engine, reader

    def _start_hook(self) -> HookRunner | None:
        hook = start_hook(self.cfg.alarms.hook, undo=self._stack)
        if hook is not None:
            self._serving["hook"] = hook
        return hook

    def _init_zmq(self) -> Any:
        """With CURVE, one context and one ZAP authenticator serve both endpoints."""
        started = start_curve(self.cfg, self._stack)
        if started is None:
            return None
        ctx, auth = started
        self._serving["curve_auth"] = auth
        return ctx

    def _start_publisher(self, writer: StoreWriter, ctx: Any) -> tuple[Publisher, Fanout]:
        p = self.cfg.publish
        publisher = Publisher(
            p.endpoint, heartbeat_interval_s=p.heartbeat_interval_s, send_hwm=p.send_hwm,
            startup_grace_s=p.startup_grace_s, health=self.health,
            on_sent=lambda seqs: writer.submit(lambda s: writes.mark_published(s, seqs)),
            curve=curve_server(self.cfg), context=ctx,
        )
        names = enabled_sinks(self.cfg)
        outbox = writer.call(lambda s: writes.open_outbox(s, names))
        pending = outbox.pending
        publisher.start(last_seq=outbox.last_seq - len(pending))
        self._stack.append(publisher.stop)
        self._serving["publisher"] = publisher
        # Each plant sink shows the present and is handed what followed its own cursor.
        plant = self._plant.start(self.cfg, outbox=outbox, health=self.health,
                                  handler=self._request, on_mqtt_drop=self._mqtt_dropped,
                                  on_cursor=Cursors(writer).advance, undo=self._stack)
        sinks = Fanout([publisher, *plant])
        self._stack.append(lambda: _drain(writer))  # runs before the sinks stop
        if pending:
            log.info("re-sending %d message(s) committed but not published before", len(pending))
            publisher.publish(pending)
        return publisher, sinks

    def _mqtt_dropped(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.mqtt_dropped.inc(n)

    def _request(self, req: dict[str, Any]) -> dict[str, Any]:
        """The state endpoint's handler, for OPC UA methods (it starts before the handler)."""
        if self._requests is None:
            return {"ok": False, "error": "the daemon is starting; try again"}
        return self._requests.handle(req)

    def _start_control(self, handler: Callable[[dict[str, Any]], dict[str, Any]],
                       ctx: Any) -> None:
        from monitor.daemon.control import start_control

        self._serving["state_endpoint"] = start_control(
            self.cfg.publish.state_endpoint, handler, curve=curve_server(self.cfg),
            context=ctx, undo=self._stack)

    def _start_metrics(self, metrics: Metrics, model: Segmenter) -> None:
        self._set_model_info(model)
        if self.cfg.metrics.listen:
            metrics.serve(self.cfg.metrics.listen)
            self._stack.append(metrics.stop)
            self._serving["metrics"] = metrics

    def _set_model_info(self, model: Segmenter) -> None:
        if self.metrics is not None:
            _model_info(self.metrics, model)
        self._set_trust(model)

    def _set_trust(self, model: Segmenter) -> None:
        """Which cameras the served weights are trusted on; logged when it changes."""
        trust = fleet_trust(model, self.printers,
                            trust_unadapted=self.cfg.alarms.trust_unadapted)
        if trust != self.trust:
            log_trust(trust, log)
        self.trust = trust
        if self._analyser is not None:
            self._analyser.engine.untrusted = untrusted(trust)

    def _start_stages(self, *stages: Stage) -> None:
        self._stages = stages
        for stage in stages:
            stage.start()

        def join() -> None:
            for stage in stages:  # in stage order: each drains into the next
                stage.join(60)

        self._stack.append(join)

    def _start_settlers(self, reader: Engine) -> None:
        start_settlers(self.printers, self._candidates, known=lambda: _known_images(reader),
                       into=self.settlers, undo=self._stack)

    def _last_arrivals(self) -> dict[str, float]:
        return self._analyser.last_arrivals if self._analyser else {}

    # ------------------------------------------------------------ reload and health

    def reload(self, cfg: Config) -> list[str]:
        """Take new alarm rules, thresholds and weights (SIGHUP) without stopping; returns
        the changed settings that need a restart (see monitor.daemon.reload)."""
        if self._reloader is None:
            raise MonitorError("the daemon is not running; nothing to reload")
        ignored = self._reloader.reload(cfg)
        self.cfg = self._reloader.cfg
        if self.segmenter is not None:  # alarms.trust_unadapted may have changed
            self._set_trust(self.segmenter)
        return ignored

    def health(self) -> dict[str, Any]:
        return health_report(
            ready=self.ready.is_set(), started_at=self.started_at, counts=self.counts,
            queue=(self._candidates.qsize() + self._decoded.qsize() + self._segmented.qsize()
                   + sum(st.pending for st in self.settlers.values())),
            segmenter=self.segmenter, writer=self.writer, serving=self._serving,
            mqtt=self.mqtt, trust=self.trust)

    def healthy(self, within_s: float) -> bool:
        """What the systemd watchdog is told (see monitor.daemon.health.is_healthy)."""
        return is_healthy(stages=self._stages, writer=self.writer,
                          plant_alive=self._plant.alive, serving=self._serving.values(),
                          within_s=within_s)


def _known_images(reader: Engine) -> dict[str, tuple[int | None, int | None]]:
    with Session(reader) as s:
        return queries.known_images(s)


def _drain(writer: StoreWriter) -> None:
    """On stop, once the stages are done: commit what is queued, so its messages are handed
    to the publisher before the socket closes."""
    if writer.alive and writer.file_problem is None:
        try:
            writer.call(lambda s: None, timeout=30)
        except queue.Empty:
            log.error("database writer still busy at stop; unsent messages stay in the "
                      "outbox and go out on restart")


def _model_info(metrics: Metrics, model: Segmenter) -> None:
    info = model.info
    metrics.model.info({"sha256": info.sha256, "classes": ",".join(info.class_names),
                        "base_channels": str(info.base_channels), "device": str(model.device)})
