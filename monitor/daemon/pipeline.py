"""The daemon: watch -> decode -> segment -> statistics -> alarms -> store -> publish.

Each resource has one owner thread: the settler (files), the loader (reading and decoding),
the worker (the model), the analyser (statistics and the alarm engine), the store writer
(the database) and the publisher (the ZeroMQ socket). They talk through queues, in layer
order, so reading the next layer and the statistics of the last one overlap the model's work.
``start()`` brings them up in order and ``stop()`` takes them down in reverse, finishing the
layer in hand and flushing the store before the socket closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.alarms.engine import RULE_TEST, AlarmEngine, AlarmEvent, BuildKey, LayerAlarms
from monitor.alarms.regions import Regions, apply_ignore, region_stats
from monitor.config import Config
from monitor.daemon import failpoints
from monitor.daemon.hook import HookRunner
from monitor.daemon.metrics import Metrics
from monitor.daemon.publisher import Publisher, alarm_message, layer_message
from monitor.daemon.watcher import Candidate, Settler
from monitor.errors import ImageError, MonitorError, StoreError, WeightsError
from monitor.reports.maps import encode_map
from monitor.store import db as store
from monitor.store.db import LayerRecord, Outgoing, StoreWriter
from monitor.vision.imaging import decode
from monitor.vision.model import file_sha256, file_signature
from monitor.vision.segmenter import Segmentation, Segmenter
from monitor.vision.stats import layer_stats

log = logging.getLogger(__name__)
T = TypeVar("T")


class _Facts(NamedTuple):
    """What is known about an image file's content."""

    size: int | None
    mtime_ns: int | None
    sha256: str | None


class _Loaded(NamedTuple):
    """A layer read and decoded, waiting for the model."""

    cand: Candidate
    gray: np.ndarray
    sig: tuple[int, int]
    facts: _Facts
    decode_ms: float


class _Segmented(NamedTuple):
    """A layer through the model, waiting for its statistics."""

    model: Segmenter
    loaded: _Loaded
    seg: Segmentation


_Outcome = Callable[[], None]  # a layer's result decided before the model (an error record)


class Daemon:
    """pbf-monitor's long-running process, usable in-process (tests, demo) or from the CLI."""

    def __init__(self, cfg: Config, *, printer: str = "") -> None:
        self.cfg = cfg
        self.printer = printer
        self.ready = threading.Event()
        self.started_at = time.time()
        self.counts = {"ok": 0, "error": 0}
        self._queue: queue.Queue[Candidate] = queue.Queue(maxsize=cfg.watch.queue_size)
        # Between the stages: a decoded layer or a finished outcome, then a segmented layer.
        # Two ahead is enough to overlap, and bounds the decoded images held in memory.
        self._decoded: queue.Queue[_Loaded | _Outcome] = queue.Queue(maxsize=2)
        self._segmented: queue.Queue[_Segmented | _Outcome] = queue.Queue(maxsize=2)
        self._threads: dict[str, threading.Thread] = {}
        self._beats: dict[str, float] = {}
        self._stop = threading.Event()
        self._stack: list[Callable[[], None]] = []
        self.engine: Engine | None = None
        self.reader: Engine | None = None
        self.segmenter: Segmenter | None = None
        self.writer: StoreWriter | None = None
        self.publisher: Publisher | None = None
        self.settlers: dict[str, Settler] = {}
        # One per printer of the fleet ("" = the single [watch]/[camera] printer).
        self.printers = {(p.name or printer): p for p in cfg.fleet()}
        self.alarms: AlarmEngine | None = None
        self.regions = Regions(cfg.regions, pixel_size_mm=cfg.camera.pixel_size_mm)
        self.hook: HookRunner | None = None
        self.control: Any = None
        self._zmq_context: Any = None
        self._next_stall_check = 0.0
        self._next_prune = 0.0
        self.metrics: Metrics | None = None
        self._weights_sig: tuple[int, int, int] | None = None  # of the file being served
        self._weights_warned: tuple[int, int, int] | None = None

    # ------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Bring everything up in order; on failure, undo what was started and re-raise."""
        try:
            for step in (self._init_store, self._init_segmenter, self._init_alarms,
                         self._start_writer, self._start_hook, self._init_zmq,
                         self._start_publisher,
                         self._start_control, self._start_metrics, self._start_map_pool,
                         self._start_worker, self._start_settler):
                step()
        except BaseException:
            self.stop()
            raise
        self.ready.set()
        assert self.publisher is not None
        self.publisher.heartbeat_now()
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

    def _init_store(self) -> None:
        state = self.cfg.state_dir
        try:
            state.mkdir(parents=True, exist_ok=True)
            probe = state / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"{state}: state directory is not writable "
                             f"({e.strerror or e}); set store.state_dir") from e
        url = self.cfg.store_url
        self.engine = store.open_db(url, writer=True)
        self._stack.append(self.engine.dispose)
        self.reader = store.open_db(url, writer=False)
        self._stack.append(self.reader.dispose)
        log.info("database %s", url)

    def _init_segmenter(self) -> None:
        with contextlib.suppress(OSError):  # from_config names the problem
            self._weights_sig = file_signature(self.cfg.model.weights)
        self.segmenter = Segmenter.from_config(self.cfg)
        self.segmenter.warm_up()

    def _init_alarms(self) -> None:
        assert self.segmenter is not None and self.reader is not None
        cam = self.cfg.camera
        self.alarms = AlarmEngine(
            self.cfg.alarms, class_names=self.segmenter.class_names,
            part_regions=self.regions.part_names, pixel_size_mm=cam.pixel_size_mm,
            layer_thickness_mm=cam.layer_thickness_mm,
            cameras={n: (p.camera.pixel_size_mm, p.camera.layer_thickness_mm)
                     for n, p in self.printers.items()},
        )
        with Session(self.reader) as s:
            for printer, build, cls in store.all_mutes(s):
                self.alarms.mute(BuildKey(printer, build), cls)
            # The newest recent build of each printer is watched for stalls from the start,
            # so a machine that stopped while the daemon was down still raises the alarm.
            seen: set[str] = set()
            since = time.time() - self.cfg.alarms.stall.active_s
            for printer, build in store.active_builds(s, since):
                if printer not in seen:
                    seen.add(printer)
                    self._restore(s, BuildKey(printer, build))

    def _restore(self, s: Session, key: BuildKey) -> None:
        assert self.alarms is not None
        st = store.load_engine_state(s, key.printer, key.build)
        if st is not None:
            self.alarms.restore_build(
                key, first_layer=st["first_layer"], last_layer=st["last_evaluated"],
                rules=st["rules"], tracks=st["tracks"], next_track=st["next_track"],
                arrivals=st["arrivals"], stall_open=st["stall_open"])

    def _start_hook(self) -> None:
        h = self.cfg.alarms.hook
        if h.command:
            self.hook = HookRunner(h.command, timeout_s=h.timeout_s)
            self.hook.start()
            self._stack.append(self.hook.stop)

    def _curve_server(self) -> Any:
        from monitor.daemon.security import CurveServer

        p = self.cfg.publish
        if p.curve_secret_key is None or p.curve_authorized_dir is None:
            return None
        return CurveServer(p.curve_secret_key, p.curve_authorized_dir)

    def _init_zmq(self) -> None:
        """With CURVE, one context and one ZAP authenticator serve both endpoints."""
        curve = self._curve_server()
        if curve is None:
            return
        import zmq

        from monitor.daemon.security import ServerAuth

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self._zmq_context = ctx
        self._stack.append(lambda: ctx.term())
        auth = ServerAuth(ctx, curve.authorized_dir)
        auth.start()
        self._stack.append(auth.stop)
        log.info("CURVE on: clients must hold a key listed in %s", curve.authorized_dir)

    def _start_metrics(self) -> None:
        assert self.segmenter is not None and self.alarms is not None
        alarms = self.alarms
        self.metrics = Metrics(queue=lambda: self._queue.qsize(),
                               last_layers=alarms.last_arrivals)
        self._set_model_info()
        if self.cfg.metrics.listen:
            self.metrics.serve(self.cfg.metrics.listen)
            self._stack.append(self.metrics.stop)

    def _set_model_info(self) -> None:
        if self.metrics is not None and self.segmenter is not None:
            info = self.segmenter.info
            self.metrics.model.info({"sha256": info.sha256,
                                     "classes": ",".join(info.class_names),
                                     "base_channels": str(info.base_channels),
                                     "device": str(self.segmenter.device)})

    def _start_control(self) -> None:
        from monitor.daemon.control import ControlServer

        p = self.cfg.publish
        self.control = ControlServer(p.state_endpoint, self.handle_request,
                                     curve=self._curve_server(), context=self._zmq_context)
        self.control.start()
        self._stack.append(self.control.stop)

    def _start_writer(self) -> None:
        assert self.engine is not None
        self.writer = StoreWriter(self.engine)
        self.writer.start()
        self._stack.append(self.writer.stop)

    def _start_publisher(self) -> None:
        assert self.writer is not None
        writer = self.writer
        p = self.cfg.publish
        self.publisher = Publisher(
            p.endpoint, heartbeat_interval_s=p.heartbeat_interval_s, send_hwm=p.send_hwm,
            startup_grace_s=p.startup_grace_s, health=self.health,
            on_sent=lambda seqs: writer.submit(lambda s: store.mark_published(s, seqs)),
            curve=self._curve_server(), context=self._zmq_context,
        )

        def outbox(s: Session) -> tuple[int, list[Outgoing]]:
            store.prune_outbox(s)
            return store.last_seq(s), store.pending_outbox(s)

        last, pending = writer.call(outbox)
        self.publisher.start(last_seq=last - len(pending))
        self._stack.append(self.publisher.stop)
        self._stack.append(self._drain_writer)  # runs before the publisher stops
        if pending:
            log.info("re-sending %d message(s) committed but not published before", len(pending))
            self.publisher.publish(pending)

    def _drain_writer(self) -> None:
        """On stop, once the worker is done: commit what is queued, so its messages are
        handed to the publisher before the socket closes."""
        if self.writer is not None and self.writer.alive:
            try:
                self.writer.call(lambda s: None, timeout=30)
            except queue.Empty:
                log.error("database writer still busy at stop; unsent messages stay in the "
                          "outbox and go out on restart")

    def _start_map_pool(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._map_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maps")

        def stop() -> None:
            # A map starts once its layer is committed: let the writer reach the last ones.
            reached = threading.Event()
            if self.writer is not None and self.writer.alive:
                self.writer.then(reached.set)
                reached.wait(30)
            self._map_pool.shutdown(wait=True)

        self._stack.append(stop)

    def _start_worker(self) -> None:
        for name, loop in (("loader", self._load_loop), ("worker", self._work),
                           ("analyser", self._analyse_loop)):
            self._beats[name] = time.monotonic()
            self._threads[name] = threading.Thread(target=loop, name=name, daemon=True)
            self._threads[name].start()

        def join() -> None:
            for t in self._threads.values():  # in stage order: each drains into the next
                t.join(60)

        self._stack.append(join)

    def _start_settler(self) -> None:
        for name, p in self.printers.items():
            settler = Settler(
                p.watch, self._queue, known=self._known_images, printer=name,
                on_skip=lambda path, why: log.info("skipping %s: %s", path, why),
            )
            settler.start()
            self.settlers[name] = settler
            self._stack.append(settler.stop)

    def _known_images(self) -> dict[str, tuple[int | None, int | None]]:
        assert self.reader is not None
        with Session(self.reader) as s:
            return store.known_images(s)

    # ------------------------------------------------------------ reload

    RELOADABLE = ("alarms", "model.weights", "model.sha256", "model.threshold",
                  "model.thresholds", "model.min_component_mm2")

    def reload(self, cfg: Config) -> list[str]:
        """Take new alarm rules, thresholds and weights (SIGHUP) without stopping; a layer in
        hand finishes with the old ones. Nothing changes unless all of it is valid (a weights
        file still being copied is refused). Returns the changed settings that need a
        restart."""
        from monitor.vision.segmenter import min_component_px

        assert self.alarms is not None and self.segmenter is not None
        m = cfg.model
        seg = self._new_segmenter(cfg) or self.segmenter
        self.alarms.reload(cfg.alarms)  # raises ConfigError before anything changes
        seg.set_thresholds(m.threshold, m.thresholds, min_component_px(cfg, None))
        if seg is not self.segmenter:
            log.info("now serving model %s (was %s)", seg.info.sha256[:12],
                     self.segmenter.info.sha256[:12])
            self.segmenter = seg  # the worker picks it up with its next layer
            self._set_model_info()
        old = self.cfg
        self.cfg = self.cfg.model_copy(update={
            "alarms": cfg.alarms,
            "model": old.model.model_copy(update={
                "threshold": m.threshold, "thresholds": m.thresholds,
                "min_component_mm2": m.min_component_mm2, "weights": m.weights,
                "sha256": m.sha256}),
        })
        ignored = [k for k in ("watch", "store", "publish", "camera", "regions", "log")
                   if getattr(old, k) != getattr(cfg, k)]
        ignored += [f"model.{k}" for k in ("device", "tile_size", "tile_overlap", "backend",
                                           "cpu_precision")
                    if getattr(old.model, k) != getattr(m, k)]
        if old.alarms.hook.command != cfg.alarms.hook.command:
            ignored.append("alarms.hook.command")  # its runner started with the old one
        return ignored

    def _new_segmenter(self, cfg: Config) -> Segmenter | None:
        """A Segmenter for the weights `cfg` names, if they are not the ones being served:
        loaded, checked and warmed up beside the running one, which the worker keeps using
        meanwhile. WeightsError if the file is incomplete or does not fit the daemon."""
        assert self.segmenter is not None
        m = cfg.model
        sig = None
        try:
            sig = file_signature(m.weights)
            if file_sha256(m.weights) == self.segmenter.info.sha256:
                self._weights_sig = sig
                return None
        except OSError:
            pass  # from_config names the problem
        # Only the weights change here: device, backend and tiling stay as they run (those
        # need a restart, and reload() says so).
        running = self.cfg.model
        new = Segmenter.from_config(cfg.model_copy(update={"model": m.model_copy(update={
            k: getattr(running, k) for k in ("device", "backend", "cpu_precision", "tile_size",
                                             "tile_overlap", "batch_size")})}))
        if new.class_names != self.segmenter.class_names:
            raise WeightsError(
                f"{m.weights}: classes {', '.join(new.class_names)} differ from the running "
                f"model's ({', '.join(self.segmenter.class_names)}); restart to change classes")
        new.warm_up()
        self._weights_sig = sig
        return new

    def _check_weights_file(self) -> None:
        """Say so, once per change, when the weights file on disk is no longer the one being
        served: a new model is taken only on reload, never half-way through a copy. Checked
        with each layer (one stat)."""
        try:
            sig = file_signature(self.cfg.model.weights)
        except OSError:
            sig = None
        if sig != self._weights_sig and sig != self._weights_warned:
            self._weights_warned = sig
            log.warning("weights file %s changed on disk; still serving model %s until a "
                        "reload (SIGHUP, systemctl reload pbf-monitor)", self.cfg.model.weights,
                        self.segmenter.info.sha256[:12] if self.segmenter else "?")

    # ------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        seg = self.segmenter
        return {
            "status": "ready" if self.ready.is_set() else "starting",
            "uptime_s": round(time.time() - self.started_at, 1),
            "layers_ok": self.counts["ok"],
            "layers_error": self.counts["error"],
            "queue": (self._queue.qsize() + self._decoded.qsize() + self._segmented.qsize()
                      + sum(st.pending for st in self.settlers.values())),
            "device": str(seg.device) if seg else None,
            "model_sha256": seg.info.sha256 if seg else None,
            # Why the database refuses writes right now (disk full, locked), else "ok".
            "store": (self.writer.failing if self.writer else None) or "ok",
            "store_queue": self.writer.depth if self.writer else 0,
        }

    # ------------------------------------------------------------ the control endpoint

    def handle_request(self, req: dict[str, Any]) -> dict[str, Any]:
        """Requests on the state endpoint (control thread). MonitorError -> ok: false."""
        cmd = req.get("cmd")
        try:
            if cmd == "state":
                return self._state()
            if cmd == "ack":
                return self._ack(int(req["id"]))
            if cmd in ("mute", "unmute"):
                cls = req.get("class") or None
                return self._mute(str(req["build"]), str(req.get("printer", self.printer)),
                                  cls, mute=cmd == "mute")
            if cmd == "test-alarm":
                return self._test_alarm(str(req.get("severity", "warning")),
                                        bool(req.get("hook", False)))
        except MonitorError as e:
            return {"ok": False, "error": str(e)}
        except (KeyError, ValueError, TypeError) as e:
            return {"ok": False, "error": f"bad request {req!r}: {e!r}"}
        return {"ok": False, "error": f"unknown cmd {cmd!r} (state, ack, mute, unmute, "
                                      f"test-alarm)"}

    def _state(self) -> dict[str, Any]:
        """Open alarms and the last layer of each active build, with the seq they reflect:
        a subscriber that connected first and asks this is consistent from seq + 1 on."""
        from monitor.reports.report import layer_entry

        assert self.reader is not None
        since = time.time() - self.cfg.alarms.stall.active_s
        with Session(self.reader) as s, s.begin():
            seq = store.last_seq(s)
            alarms = [alarm_message(a, printer=p, build=b)
                      for a, p, b in store.list_alarms(s, open_only=True)]
            builds = []
            for printer, build in store.active_builds(s, since):
                bid = store.build_id_of(s, printer, build)
                row = store.last_layer(s, bid) if bid is not None else None
                if row is not None:
                    builds.append({"printer": printer, "build": build,
                                   "last_layer": layer_entry(row)})
        return {"seq": seq, "open_alarms": alarms, "builds": builds, "health": self.health()}

    def _ack(self, alarm_id: int) -> dict[str, Any]:
        assert self.writer is not None and self.alarms is not None
        alarms = self.alarms

        def job(s: Session) -> tuple[dict[str, Any], list[Outgoing]]:
            row = store.acknowledge_alarm(s, alarm_id, time.time())
            build = s.get(store.Build, row.build_id)
            assert build is not None
            key = BuildKey(build.printer, build.name)
            self._ensure_restored(key)
            state = alarms.acknowledge(key, row.rule)
            if state is not None:
                store.put_rule_states(s, build.id, {row.rule: state})
            msg = alarm_message(row, printer=build.printer, build=build.name)
            return msg, store.put_outbox(s, [("alarm", msg)])

        msg, out = self._writer_call(job)
        assert self.publisher is not None
        self.publisher.publish(out)
        log.info("alarm %d acknowledged", alarm_id)
        return {"alarm": {**msg, "seq": out[0].seq}}

    def _mute(self, build: str, printer: str, cls: str | None, *, mute: bool) -> dict[str, Any]:
        assert self.writer is not None and self.alarms is not None
        if cls is not None and self.segmenter and cls not in self.segmenter.class_names:
            raise MonitorError(f"unknown class {cls!r}; the model's classes are "
                               f"{', '.join(self.segmenter.class_names)}")

        def job(s: Session) -> None:
            if mute:
                store.add_mute(s, printer, build, cls, time.time())
            else:
                store.remove_mutes(s, printer, build, cls)

        self._writer_call(job)
        key = BuildKey(printer, build)
        (self.alarms.mute if mute else self.alarms.unmute)(key, cls)
        log.info("%s build %s%s", "muted" if mute else "unmuted", build,
                 f" class {cls}" if cls else "")
        return {"build": build, "printer": printer, "class": cls, "muted": mute}

    def _test_alarm(self, severity: str, run_hook: bool) -> dict[str, Any]:
        assert self.publisher is not None
        msg = {"id": 0, "printer": self.printer, "build": "", "layer": 0, "class": "",
               "rule": RULE_TEST, "severity": severity, "state": "open", "value": 0.0,
               "threshold": 0.0, "cleared_layer": None, "track": None,
               "timestamp": time.time(), "test": True}
        out = self._writer_call(lambda s: store.put_outbox(s, [("alarm", msg)]))
        self.publisher.publish(out)
        if run_hook and self.hook is not None:
            self.hook.submit({**msg, "seq": out[0].seq})
        return {"alarm": {**msg, "seq": out[0].seq}, "hook": run_hook and self.hook is not None}

    def _writer_call(self, job: Callable[[Session], Any]) -> Any:
        """Run a job on the writer thread; its StoreError comes back as a MonitorError."""
        assert self.writer is not None

        def wrapped(s: Session) -> Any:
            try:
                return ("ok", job(s))
            except StoreError as e:  # raised before anything was written
                return ("error", e)

        kind, value = self.writer.call(wrapped, timeout=30)
        if kind == "error":
            raise value
        return value

    # ------------------------------------------------------------ the worker

    def healthy(self, within_s: float) -> bool:
        """Every pipeline stage went round its loop (a layer, or an idle wait) within
        `within_s`, and the threads they rely on are alive: what the systemd watchdog is told.
        A stage stuck on one layer (a hung read, a hung model) stops the pings."""
        now = time.monotonic()
        stages_ok = bool(self._threads) and all(
            t.is_alive() and now - self._beats[name] <= within_s
            for name, t in self._threads.items())
        return stages_ok and self.writer is not None and self.writer.alive

    def _put(self, q: queue.Queue[Any], item: Any, *, until_stop: bool) -> None:
        """Hand an item to the next stage; with until_stop, give up when stopping (the layer
        is not stored, so the rescan at the next start finds it again)."""
        while True:
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                if until_stop and self._stop.is_set():
                    return

    def _load_loop(self) -> None:
        """Stage 1: read and decode files in order, ahead of the model."""
        while not self._stop.is_set():
            self._beats["loader"] = time.monotonic()
            try:
                cand = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                item = self._load(cand)
            except Exception as e:  # never let one layer stop the daemon
                log.exception("unexpected failure on %s", cand.path)
                item = functools.partial(self._finish_error, cand, None,
                                         f"internal error: {e!r}")
            if item is not None:
                self._put(self._decoded, item, until_stop=True)

    def _work(self) -> None:
        """Stage 2: the model. A backlog (a restart, a burst) goes through it together, up to
        batch_size layers, which keeps a GPU busy; on a CPU batch_size is 1."""
        held: _Loaded | _Outcome | None = None
        while not self._stop.is_set():
            self._beats["worker"] = time.monotonic()
            try:
                first = held or self._decoded.get(timeout=0.2)
            except queue.Empty:
                continue
            held = None
            if not isinstance(first, _Loaded):
                self._put(self._segmented, first, until_stop=False)
                continue
            batch = [first]
            assert self.segmenter is not None
            while len(batch) < self.segmenter.batch_size:
                try:
                    nxt = self._decoded.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, _Loaded):
                    held = nxt  # an outcome keeps its place: after this batch
                    break
                batch.append(nxt)
            self._infer(batch)
        if held is not None:
            self._put(self._segmented, held, until_stop=False)

    def _analyse_loop(self) -> None:
        """Stage 3: statistics, alarms, store and publish, in layer order; drains what the
        model finished before the worker stopped."""
        while True:
            self._beats["analyser"] = time.monotonic()
            self._guarded_call(self._check_stalls)
            try:
                item = self._segmented.get(timeout=0.2)
            except queue.Empty:
                if self._stop.is_set() and not self._threads["worker"].is_alive():
                    return
                continue
            if isinstance(item, _Segmented):
                self._guarded(item.loaded.cand, self._analyse, item.model, item.loaded,
                              item.seg)
            else:
                self._guarded_call(item)

    @staticmethod
    def _guarded_call(fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:
            log.exception("failure in the pipeline; continuing")

    def _guarded(self, cand: Candidate, step: Callable[..., T], *args: Any) -> T | None:
        """step(*args) for one layer; an unexpected failure becomes that layer's error record
        (never a stopped daemon, never a lost layer) and None."""
        try:
            return step(*args)
        except Exception as e:
            log.exception("unexpected failure on %s", cand.path)
            try:
                self._finish(cand, None, self._error_record(cand, f"internal error: {e!r}"))
            except Exception:
                log.exception("could not even record the failure of %s", cand.path)
        return None

    def _error_record(self, cand: Candidate, reason: str,
                      facts: _Facts | None = None) -> LayerRecord:
        assert self.segmenter is not None
        now = time.time()
        f = facts or _Facts(None, None, None)
        return LayerRecord(
            printer=cand.printer, build=cand.key.build, layer=cand.key.layer, status="error",
            error=reason, image_path=str(cand.path), image_size=f.size,
            image_mtime_ns=f.mtime_ns, image_sha256=f.sha256,
            model_sha256=self.segmenter.info.sha256, detected_at=cand.detected_at,
            processed_at=now, total_ms=(now - cand.detected_at) * 1000.0,
        )

    def _finish_error(self, cand: Candidate, sig: tuple[int, int] | None, reason: str,
                      facts: _Facts | None = None) -> None:
        self._finish(cand, sig, self._error_record(cand, reason, facts))

    def _infer(self, batch: list[_Loaded]) -> None:
        """Run the model on decoded layers; hand each result (or its failure) on, in order."""
        assert self.segmenter is not None
        model = self.segmenter  # the same one throughout, even if a reload swaps it
        self._check_weights_file()
        failpoints.reach("infer")
        if self.metrics is not None:
            self.metrics.batch.observe(len(batch))
        try:
            segs = model.predict_many([x.gray for x in batch], probs=False)
        except Exception as e:
            log.exception("the model failed on %d layer(s)", len(batch))
            for x in batch:
                self._put(self._segmented, functools.partial(
                    self._finish_error, x.cand, None, f"internal error: {e!r}"),
                    until_stop=False)
            return
        for x, seg in zip(batch, segs, strict=True):
            self._put(self._segmented, _Segmented(model, x, seg), until_stop=False)

    def _load(self, cand: Candidate) -> _Loaded | _Outcome | None:
        """The decoded layer; or its outcome (an error record, written by the analyser in
        order); or None (a skip, or a retry while the file is still being written)."""
        printer = self.printers[cand.printer]
        settler = self.settlers[cand.printer]
        w = printer.watch
        t0 = time.perf_counter()
        path = cand.path
        try:
            # O_NONBLOCK: a FIFO named like a layer must not hang the worker on open; what is
            # opened is then checked through its descriptor, so it cannot change underneath.
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC),
                           "rb") as f:
                st = os.fstat(f.fileno())
                if stat.S_ISDIR(st.st_mode):
                    log.info("skipping %s: a folder named like an image", path)
                    return None
                if not stat.S_ISREG(st.st_mode):
                    raise ImageError("not a regular file (a pipe, socket or device)")
                if st.st_size > w.max_file_mb * 1e6:
                    raise ImageError(f"file is {st.st_size / 1e6:.0f} MB, over "
                                     f"watch.max_file_mb ({w.max_file_mb:g})")
                data = f.read()
        except FileNotFoundError:
            return functools.partial(self._finish_error, cand, None,
                                     "file disappeared before it could be read")
        except ImageError as e:
            return functools.partial(self._finish_error, cand, None, str(e))
        except OSError as e:
            return functools.partial(self._finish_error, cand, None,
                                     f"cannot read file: {e.strerror or e}")
        failpoints.reach("decode")
        sig = (len(data), st.st_mtime_ns)
        facts = _Facts(len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())
        try:
            gray = decode(data, max_pixels=w.max_pixels)
        except ImageError as e:
            try:
                now_st = os.stat(path)
                changed = (now_st.st_size, now_st.st_mtime_ns) != sig
            except OSError:
                changed = False
            if changed or cand.attempts < w.decode_retries:
                # Probably still being written: look again rather than record an error.
                settler.retry(cand, delay_s=w.retry_delay_s, changed=changed)
                return None
            return functools.partial(self._finish_error, cand, sig, str(e), facts)
        return _Loaded(cand, gray, sig, facts, (time.perf_counter() - t0) * 1000.0)

    def _analyse(self, model: Segmenter, x: _Loaded, seg: Segmentation) -> None:
        """Statistics, alarms, then store and publish, for one segmented layer."""
        assert self.alarms is not None
        cand, printer = x.cand, self.printers[x.cand.printer]
        masks, regions = seg.masks, None
        px, max_comp = printer.camera.pixel_size_mm, self.cfg.store.max_components
        if self.regions:
            br = self.regions.for_build(cand.key.build, masks.shape[1:])
            masks = apply_ignore(masks, br)
            regions = region_stats(masks, model.class_names, br, pixel_size_mm=px,
                                   max_components=max_comp)
        # Ignore regions change the masks: then the filter's components no longer apply.
        stats = layer_stats(masks, model.class_names, pixel_size_mm=px,
                            max_components=max_comp, found=None if self.regions else seg.found)
        key = BuildKey(cand.printer, cand.key.build)
        self._ensure_restored(key)
        verdict = self.alarms.evaluate(key, cand.key.layer, stats, regions)
        now = time.time()
        rec = LayerRecord(
            printer=cand.printer, build=cand.key.build, layer=cand.key.layer, status="ok",
            error=None, image_path=str(cand.path), model_sha256=model.info.sha256,
            detected_at=cand.detected_at, processed_at=now, decode_ms=x.decode_ms,
            infer_ms=seg.infer_ms, total_ms=(now - cand.detected_at) * 1000.0, stats=stats,
            image_size=x.facts.size, image_mtime_ns=x.facts.mtime_ns,
            image_sha256=x.facts.sha256, regions=regions, classes=model.class_names,
        )
        self._finish(cand, x.sig, rec, verdict)
        if self.cfg.store.maps:
            self._store_map_later(rec, x.gray, masks)

    def _store_map_later(self, rec: LayerRecord, gray: np.ndarray, masks: np.ndarray) -> None:
        """Encode the layer's defect map off the latency path (its own thread, started once
        the layer is committed and handed to the publisher, so the two do not compete for the
        CPU) and attach it in a later transaction."""
        assert self.writer is not None
        writer, max_side = self.writer, self.cfg.store.map_max_side
        if writer.failing is not None:
            # Maps are pictures for reports; while writes fail (a full disk) they would only
            # pile up in memory beside the layers, which matter more.
            log.info("layer %s/%d: no defect map while the database is failing", rec.build,
                     rec.layer)
            return

        def encode() -> None:
            try:
                m = encode_map(gray, masks, max_side=max_side)
            except Exception:
                log.exception("layer %s/%d: defect map not stored", rec.build, rec.layer)
                return
            writer.submit(lambda s: store.put_map(s, rec, m))

        pool = self._map_pool

        def start() -> None:
            try:
                pool.submit(encode)
            except RuntimeError:  # shut down: stopping took longer than the writer
                log.info("layer %s/%d: no defect map, the daemon is stopping", rec.build,
                         rec.layer)

        writer.then(start)

    def _ensure_restored(self, key: BuildKey) -> None:
        """A build seen for the first time since start: adopt its alarm state from the DB."""
        assert self.alarms is not None and self.reader is not None
        if not self.alarms.known(key):
            with Session(self.reader) as s:
                self._restore(s, key)

    def _finish(self, cand: Candidate, sig: tuple[int, int] | None, rec: LayerRecord,
                verdict: LayerAlarms | None = None) -> None:
        assert self.alarms is not None
        self.counts[rec.status] += 1
        if rec.status == "error":
            log.warning("layer %s/%d: %s (%s)", rec.build, rec.layer, rec.error, rec.image_path)
        else:
            log.info("layer %s/%d ok in %.0f ms", rec.build, rec.layer, rec.total_ms or 0)
        if self.metrics is not None:
            self.metrics.layers.labels(rec.status).inc()
            if rec.infer_ms is not None:
                self.metrics.inference.observe(rec.infer_ms / 1000.0)
            if rec.total_ms is not None:
                self.metrics.latency.observe(rec.total_ms / 1000.0)
        key = BuildKey(rec.printer, rec.build)
        self._ensure_restored(key)
        events = self.alarms.arrival(key, rec.layer, cand.detected_at)
        self._commit(rec, events, verdict)
        self.settlers[cand.printer].done(cand, sig)

    def _commit(self, rec: LayerRecord, events: list[AlarmEvent],
                verdict: LayerAlarms | None = None) -> None:
        """Store a layer with its alarm state, tracks and messages in one transaction."""
        assert self.writer is not None and self.publisher is not None
        max_comp = self.cfg.store.max_components
        events = events + (verdict.events if verdict else [])
        tracks = verdict.tracks if verdict else None

        def job(s: Session) -> list[Outgoing]:
            build_id, replaced = store.put_layer(
                s, rec, max_components=max_comp,
                tracks=tracks.assignments if tracks else None)
            if verdict is not None and verdict.evaluated:
                build = s.get(store.Build, build_id)
                assert build is not None
                build.first_layer = verdict.first_layer
                build.last_evaluated_layer = max(build.last_evaluated_layer or rec.layer,
                                                 rec.layer)
                store.put_rule_states(s, build_id, verdict.rule_states)
                if tracks is not None:
                    store.put_tracks(s, build_id, [*tracks.touched, *tracks.ended])
            msgs: list[tuple[str, dict[str, Any]]] = [
                ("layer", self._layer_payload(rec, replaced))]
            msgs += self._alarm_rows(s, build_id, events, rec.processed_at)
            out = store.put_outbox(s, msgs)
            failpoints.reach("write")
            return out

        def fallback(s: Session, error: Exception) -> list[Outgoing]:
            """The layer could not be stored as it is: store that, so it is not lost."""
            failed = dataclasses.replace(
                rec, status="error", stats=None, regions=None,
                error=f"could not store the layer's results: {error!r}"[:2000])
            _, replaced = store.put_layer(s, failed)
            return store.put_outbox(s, [("layer", self._layer_payload(failed, replaced))])

        self.writer.submit(job, self._published(events), fallback=fallback)

    def _layer_payload(self, rec: LayerRecord, replaced: bool) -> dict[str, Any]:
        msg = layer_message(rec, replaced=replaced)
        if rec.regions:
            msg["regions"] = {name: st.summary() for name, st in rec.regions.items()}
        return msg

    def _alarm_rows(self, s: Session, build_id: int, events: list[AlarmEvent], now: float
                    ) -> list[tuple[str, dict[str, Any]]]:
        msgs: list[tuple[str, dict[str, Any]]] = []
        for ev in events:
            for row in store.apply_alarm(s, build_id, ev, now):
                msgs.append(("alarm", alarm_message(row, printer=ev.printer, build=ev.build)))
        return msgs

    def _published(self, events: list[AlarmEvent]) -> Callable[[list[Outgoing]], None]:
        """After the commit: publish, and run the hook for alarms that opened."""
        assert self.publisher is not None
        publisher, hook = self.publisher, self.hook
        severities = self.cfg.alarms.hook.severities

        metrics = self.metrics

        def done(out: list[Outgoing]) -> None:
            failpoints.reach("publish")
            publisher.publish(out)
            if metrics is not None:
                for m in out:
                    if m.topic == "alarm" and m.payload.get("state") == "open":
                        metrics.alarms.labels(m.payload.get("class") or "",
                                              m.payload.get("severity", "")).inc()
            if hook is not None:
                for m in out:
                    if (m.topic == "alarm" and m.payload.get("state") == "open"
                            and m.payload.get("severity") in severities):
                        hook.submit({**m.payload, "seq": m.seq})

        return done

    def _commit_events(self, events: list[AlarmEvent]) -> None:
        """Alarm transitions without a layer (stalls)."""
        assert self.writer is not None
        if not events:
            return
        now = time.time()

        def job(s: Session) -> list[Outgoing]:
            msgs: list[tuple[str, dict[str, Any]]] = []
            for ev in events:
                bid = store.build_id_of(s, ev.printer, ev.build)
                if bid is not None:
                    msgs += self._alarm_rows(s, bid, [ev], now)
            return store.put_outbox(s, msgs)

        self.writer.submit(job, self._published(events))

    def _prune_maps(self) -> None:
        """Retention of defect maps, at start and every 10 minutes: by age, and the oldest
        first while the state disk is short of space. Statistics and alarms are kept."""
        import shutil

        st = self.cfg.store
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + 600.0
        assert self.writer is not None
        try:
            free_mb = shutil.disk_usage(self.cfg.state_dir).free / 2**20
        except OSError:
            free_mb = float("inf")
        short = st.maps_min_free_mb > 0 and free_mb < st.maps_min_free_mb

        def job(s: Session) -> None:
            if st.maps_keep_days > 0:
                n = store.prune_maps(s, older_than=now - st.maps_keep_days * 86400.0)
                if n:
                    log.info("deleted %d defect map(s) older than %g days", n,
                             st.maps_keep_days)
            if short:
                n = store.prune_oldest_maps(s, fraction=0.1)
                log.warning("state disk has %.0f MB free (store.maps_min_free_mb %g): deleted "
                            "the oldest %d defect map(s)", free_mb, st.maps_min_free_mb, n)

        self.writer.submit(job)

    def _check_stalls(self) -> None:
        assert self.alarms is not None
        self._prune_maps()
        now = time.time()
        if now >= self._next_stall_check:
            self._next_stall_check = now + 1.0
            self._commit_events(self.alarms.check_stalls(now))
