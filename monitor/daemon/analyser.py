"""Stage 3, the analyser thread: statistics, alarms, then commit, in layer order.

It alone owns the alarm engine: layers, stall checks, acks, mutes and reloads of the rules
reach the engine in order through its queue, so the engine needs no lock. It drains what the
model finished before the worker stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.alarms.engine import AlarmEngine
from monitor.alarms.regions import Regions, apply_ignore, region_stats
from monitor.config import Config
from monitor.daemon.committer import Committer, wait
from monitor.daemon.items import Ack, Analysable, Failed, Mute, Reload, Request, Segmented
from monitor.daemon.maps import MapMaker
from monitor.daemon.metrics import Metrics
from monitor.daemon.parts import GeometryAhead, LayerParts, PartMeter, check_outside_classes
from monitor.daemon.stage import Stage
from monitor.daemon.watcher import Candidate, Settler
from monitor.errors import MonitorError
from monitor.geometry.reading import BRIGHT, MISPRINT
from monitor.records import AlarmEvent, BuildKey, LayerAlarms, LayerRecord
from monitor.store import queries, writes
from monitor.vision.stats import Found, layer_stats

log = logging.getLogger(__name__)


def new_engine(cfg: Config, *, class_names: tuple[str, ...], regions: Regions,
               cameras: Mapping[str, tuple[float, float]], reader: Engine) -> AlarmEngine:
    """The alarm engine with the mutes, and the state of each printer's newest recent
    build, from the database (before the analyser takes it over)."""
    cam = cfg.camera
    check_outside_classes(cfg, class_names)
    engine = AlarmEngine(cfg.alarms, class_names=class_names, part_regions=regions.part_names,
                         pixel_size_mm=cam.pixel_size_mm,
                         layer_thickness_mm=cam.layer_thickness_mm, cameras=cameras)
    with Session(reader) as s:
        for printer, build, cls in queries.all_mutes(s):
            engine.mute(BuildKey(printer, build), cls)
        # The newest recent build of each printer is watched for stalls from the start,
        # so a machine that stopped while the daemon was down still raises the alarm.
        seen: set[str] = set()
        since = time.time() - cfg.alarms.stall.active_s
        for printer, build in queries.active_builds(s, since):
            if printer not in seen:
                seen.add(printer)
                _restore(engine, s, BuildKey(printer, build))
    return engine


def _restore(engine: AlarmEngine, s: Session, key: BuildKey) -> None:
    state = queries.load_engine_state(s, key.printer, key.build)
    if state is not None:
        engine.restore_build(key, state)


class Analyser(Stage):
    """Segmented and Failed layers, and requests -> records committed through the committer."""

    def __init__(self, *, engine: AlarmEngine, regions: Regions, cfg: Config,
                 pixel_size_mm: Mapping[str, float], reader: Engine, committer: Committer,
                 maps: MapMaker, settlers: Mapping[str, Settler], metrics: Metrics,
                 counts: dict[str, int], inbox: queue.Queue[Analysable], upstream: Stage,
                 stop: threading.Event, parts: Mapping[str, PartMeter] | None = None,
                 geometry: GeometryAhead | None = None) -> None:
        super().__init__("analyser", stop=stop)
        self.engine = engine
        self.regions = regions
        self.max_components = cfg.store.max_components
        self.store_maps = cfg.store.maps
        self.pixel_size_mm = pixel_size_mm  # printer -> its camera's
        self.reader = reader
        self.committer = committer
        self.maps = maps
        self.settlers = settlers
        self.metrics = metrics
        self.counts = counts  # "ok"/"error" -> layers, written here only
        self.inbox = inbox
        self.upstream = upstream
        self.dashboard_url = cfg.alarms.dashboard_url
        self.parts = dict(parts or {})  # printer -> its nominal slices ([geometry] nominal)
        self.geometry = geometry  # places the next layer's slice once this one is done
        # When the last layer of each active build arrived: a copy for the metrics thread.
        self.last_arrivals: dict[str, float] = engine.last_arrivals()
        self._next_stall_check = 0.0

    def ask(self, req: Request) -> dict[str, Any]:
        """Hand a request to the analyser and wait for its reply (another thread)."""
        if not self.alive:
            raise MonitorError("the daemon is stopping")
        self.handoff(self.inbox, req, until_stop=True)
        return wait(req.reply)

    def _loop(self) -> None:
        while True:
            self._beat()
            _guarded_call(self._tick)
            try:
                item = self.inbox.get(timeout=0.2)
            except queue.Empty:
                if self.stop_event.is_set() and not self.upstream.alive:
                    return
                continue
            if isinstance(item, Segmented):
                self._guarded(item.loaded.cand, item.model_sha256, self._analyse, item)
            elif isinstance(item, Failed):
                self._guarded(item.cand, item.model_sha256, self._fail, item)
            else:
                self._request(item)
            self.last_arrivals = self.engine.last_arrivals()

    def _tick(self) -> None:
        self.maps.prune_if_due()
        now = time.time()
        if now >= self._next_stall_check:
            self._next_stall_check = now + 1.0
            self.committer.events(self.engine.check_stalls(now))
            self.last_arrivals = self.engine.last_arrivals()

    # ------------------------------------------------------------ layers

    def _analyse(self, item: Segmented) -> None:
        """Statistics, alarms, then store and publish, for one segmented layer."""
        x, seg, names = item.loaded, item.seg, item.class_names
        cand = x.cand
        masks, regions, loose = seg.masks, None, seg.loose
        found: dict[int, Found] | None = seg.found
        px = self.pixel_size_mm[cand.printer]
        br = self.regions.for_build(cand.key.build, masks.shape[1:]) if self.regions else None
        if br is not None:
            masks = apply_ignore(masks, br)
            if br.ignore is not None:
                loose = {i: m & ~br.ignore for i, m in loose.items()}
            found = None  # the filter's components no longer apply
        measured = self._measure_parts(item, masks, loose,
                                       br.ignore if br is not None else None)
        if measured is not None and measured.masks is not None:
            # read against the slice (monitor.geometry.reading): components changed
            masks = measured.masks
            found = found and {i: f for i, f in found.items()
                               if names[i] not in BRIGHT and names[i] != MISPRINT
                               and i not in seg.loose}
        if br is not None:
            regions = region_stats(masks, names, br, pixel_size_mm=px,
                                   max_components=self.max_components)
        stats = layer_stats(masks, names, pixel_size_mm=px, max_components=self.max_components,
                            found=found)
        zone_stats = None
        if measured is not None and self.engine.wants_parts_zone:
            zone_stats = measured.zone_stats(masks, names, pixel_size_mm=px,
                                             max_components=self.max_components)
        key = BuildKey(cand.printer, cand.key.build)
        self._ensure_restored(key)
        verdict = self.engine.evaluate(key, cand.key.layer, stats, regions,
                                       parts=measured.parts if measured is not None else None,
                                       parts_zone=zone_stats,
                                       locate=measured.part_at if measured else None)
        verdict = dataclasses.replace(verdict, events=[
            self._where(e, px, measured) for e in verdict.events])
        now = time.time()
        rec = LayerRecord(
            printer=cand.printer, build=cand.key.build, layer=cand.key.layer, status="ok",
            error=None, image_path=str(cand.path), model_sha256=item.model_sha256,
            detected_at=cand.detected_at, processed_at=now, decode_ms=x.decode_ms,
            infer_ms=seg.infer_ms, total_ms=(now - cand.detected_at) * 1000.0, stats=stats,
            image_size=x.facts.size, image_mtime_ns=x.facts.mtime_ns,
            image_sha256=x.facts.sha256, regions=regions, classes=names,
            parts=measured.parts if measured is not None else (),
        )
        self._finish(cand, x.sig, rec, verdict)
        if self.store_maps:
            self.maps.later(rec, x.gray, masks)
        if self.geometry is not None and measured is not None:
            h, w = x.gray.shape[:2]
            self.geometry.prefetch(cand.printer, cand.key.build, cand.key.layer, (w, h))

    def _where(self, ev: AlarmEvent, px: float, measured: LayerParts | None) -> AlarmEvent:
        """An opening alarm with what to look at: the part it is on, its position on the
        plate in mm, and the link to the layer's overlay."""
        if ev.action != "open":
            return ev
        pos_mm, part = None, ev.part
        if ev.position_px is not None:
            x, y = ev.position_px
            if measured is not None and measured.calibration is not None:
                mm = measured.calibration.image_to_mm([[x, y]])[0]
                pos_mm = (float(mm[0]), float(mm[1]))
            else:
                pos_mm = (x * px, y * px)
            if part is None and measured is not None:
                part = measured.part_at(x, y)
        return dataclasses.replace(ev, position_mm=pos_mm, part=part,
                                   url=overlay_url(self.dashboard_url, ev))

    def _measure_parts(self, item: Segmented, masks: np.ndarray,
                       loose: Mapping[int, np.ndarray], ignore: np.ndarray | None
                       ) -> LayerParts | None:
        """The layer against its nominal slice; None without one (analysed as before)."""
        cand = item.loaded.cand
        meter = self.parts.get(cand.printer)
        if meter is None:
            return None
        try:
            ahead = item.loaded.geometry
            if ahead is None:
                return meter.measure(cand.key.build, cand.key.layer, path=cand.path,
                                     gray=item.loaded.gray, masks=masks,
                                     class_names=item.class_names, loose=loose,
                                     ignore=ignore)
            prep = ahead.result()  # prepared while the model ran
            return None if prep is None else meter.finish(prep, masks, item.class_names, loose,
                                                          ignore=ignore)
        except Exception:  # a geometry failure must not cost the layer its statistics
            log.exception("layer %s/%d: part statistics failed; analysed without them",
                          cand.key.build, cand.key.layer)
            return None

    def _fail(self, item: Failed) -> None:
        self._finish(item.cand, item.sig, _error_record(item, item.model_sha256))

    def _guarded(self, cand: Candidate, model_sha256: str, step: Callable[[Any], None],
                 item: Segmented | Failed) -> None:
        """step(item) for one layer; an unexpected failure becomes that layer's error record
        (never a stopped daemon, never a lost layer)."""
        try:
            step(item)
        except Exception as e:
            log.exception("unexpected failure on %s", cand.path)
            try:
                failed = Failed(cand, None, f"internal error: {e!r}")
                self._finish(cand, None, _error_record(failed, model_sha256))
            except Exception:
                log.exception("could not even record the failure of %s", cand.path)

    def _ensure_restored(self, key: BuildKey) -> None:
        """A build seen for the first time since start: adopt its alarm state from the DB."""
        if not self.engine.known(key):
            with Session(self.reader) as s:
                _restore(self.engine, s, key)

    def _finish(self, cand: Candidate, sig: tuple[int, int] | None, rec: LayerRecord,
                verdict: LayerAlarms | None = None) -> None:
        self.counts[rec.status] += 1
        if rec.status == "error":
            log.warning("layer %s/%d: %s (%s)", rec.build, rec.layer, rec.error, rec.image_path)
        else:
            log.info("layer %s/%d ok in %.0f ms", rec.build, rec.layer, rec.total_ms or 0)
        self.metrics.layers.labels(rec.status).inc()
        if rec.infer_ms is not None:
            self.metrics.inference.observe(rec.infer_ms / 1000.0)
        if rec.total_ms is not None:
            self.metrics.latency.observe(rec.total_ms / 1000.0)
        key = BuildKey(rec.printer, rec.build)
        self._ensure_restored(key)
        events = self.engine.arrival(key, rec.layer, cand.detected_at)
        self.committer.layer(rec, events, verdict)
        self.settlers[cand.printer].done(cand, sig)

    # ------------------------------------------------------------ requests

    def _request(self, req: Request) -> None:
        try:
            if isinstance(req, Ack):
                self._ack(req)
            elif isinstance(req, Mute):
                self._mute(req)
            else:
                self._reload(req)
        except Exception as e:  # the control thread says why; the analyser goes on
            req.reply.set_exception(e)

    def _ack(self, req: Ack) -> None:
        with Session(self.reader) as s:
            alarm = queries.alarm_by_id(s, req.alarm_id)
        state = None
        if alarm is not None and alarm.state == "open":  # else the commit says why not
            key = BuildKey(alarm.printer, alarm.build)
            self._ensure_restored(key)
            state = self.engine.acknowledge(key, alarm.rule)
        self.committer.ack(req.alarm_id, state, req.reply)

    def _mute(self, req: Mute) -> None:
        names = self.engine.class_names
        if req.class_name is not None and req.class_name not in names:
            raise MonitorError(f"unknown class {req.class_name!r}; the model's classes are "
                               f"{', '.join(names)}")
        with Session(self.reader) as s:
            if queries.build_id_of(s, req.printer, req.build) is None:
                raise writes.no_build(req.printer, req.build)
        key = BuildKey(req.printer, req.build)
        (self.engine.mute if req.mute else self.engine.unmute)(key, req.class_name)
        self.committer.mute(req.printer, req.build, req.class_name, mute=req.mute,
                            reply=req.reply)

    def _reload(self, req: Reload) -> None:
        self.engine.reload(req.alarms)  # ConfigError before anything changes
        req.reply.set_result({})


def overlay_url(base: str, ev: AlarmEvent) -> str | None:
    """The dashboard's page of the alarm's layer; None without [alarms] dashboard_url."""
    if not base:
        return None
    q = {"build": ev.build, "layer": str(ev.layer)}
    if ev.printer:
        q = {"printer": ev.printer, **q}
    return f"{base}{'&' if '?' in base else '?'}{urlencode(q)}"


def _error_record(item: Failed, model_sha256: str) -> LayerRecord:
    cand, f = item.cand, item.facts
    now = time.time()
    return LayerRecord(
        printer=cand.printer, build=cand.key.build, layer=cand.key.layer, status="error",
        error=item.reason, image_path=str(cand.path), image_size=f.size,
        image_mtime_ns=f.mtime_ns, image_sha256=f.sha256, model_sha256=model_sha256,
        detected_at=cand.detected_at, processed_at=now,
        total_ms=(now - cand.detected_at) * 1000.0,
    )


def _guarded_call(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:
        log.exception("failure in the pipeline; continuing")
