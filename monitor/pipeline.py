"""The daemon: watch -> decode -> segment -> statistics -> alarms -> store -> publish.

Each resource has one owner thread: the settler (files), the worker (the model), the store
writer (the database) and the publisher (the ZeroMQ socket). They talk through queues.
``start()`` brings them up in order and ``stop()`` takes them down in reverse, finishing the
layer in hand and flushing the store before the socket closes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor import store
from monitor.alarms import AlarmEvent, AreaFractionRules
from monitor.config import Config
from monitor.errors import ImageError, StoreError
from monitor.imaging import decode
from monitor.publisher import Publisher, alarm_message, layer_message
from monitor.segmenter import Segmenter
from monitor.stats import layer_stats
from monitor.store import LayerRecord, Outgoing, StoreWriter
from monitor.watcher import Candidate, Settler

log = logging.getLogger(__name__)


class _Facts(NamedTuple):
    """What is known about an image file's content."""

    size: int | None
    mtime_ns: int | None
    sha256: str | None


class Daemon:
    """pbf-monitor's long-running process, usable in-process (tests, demo) or from the CLI."""

    def __init__(self, cfg: Config, *, printer: str = "") -> None:
        self.cfg = cfg
        self.printer = printer
        self.ready = threading.Event()
        self.started_at = time.time()
        self.counts = {"ok": 0, "error": 0}
        self._queue: queue.Queue[Candidate] = queue.Queue(maxsize=cfg.watch.queue_size)
        self._stop = threading.Event()
        self._stack: list[Callable[[], None]] = []
        self._worker: threading.Thread | None = None
        self.engine: Engine | None = None
        self.reader: Engine | None = None
        self.segmenter: Segmenter | None = None
        self.writer: StoreWriter | None = None
        self.publisher: Publisher | None = None
        self.settler: Settler | None = None
        self.alarms: AreaFractionRules | None = None

    # ------------------------------------------------------------ start / stop

    def start(self) -> None:
        """Bring everything up in order; on failure, undo what was started and re-raise."""
        try:
            for step in (self._init_store, self._init_segmenter, self._init_alarms,
                         self._start_writer, self._start_publisher, self._start_worker,
                         self._start_settler):
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
        m = self.cfg.model
        self.segmenter = Segmenter(
            m.weights, device=m.device, tile_size=m.tile_size, tile_overlap=m.tile_overlap,
            threshold=m.threshold, thresholds=m.thresholds, expected_sha256=m.sha256,
        )
        self.segmenter.warm_up()

    def _init_alarms(self) -> None:
        assert self.segmenter is not None and self.reader is not None
        self.alarms = AreaFractionRules(
            self.cfg.alarms.area_fraction, severity=self.cfg.alarms.severity,
            class_names=self.segmenter.class_names,
        )
        with Session(self.reader) as s:
            self.alarms.restore(store.open_alarm_keys(s))

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
        )

        def outbox(s: Session) -> tuple[int, list[Outgoing]]:
            store.prune_outbox(s)
            return store.last_seq(s), store.pending_outbox(s)

        last, pending = writer.call(outbox)
        self.publisher.start(last_seq=last - len(pending))
        self._stack.append(self.publisher.stop)
        if pending:
            log.info("re-sending %d message(s) committed but not published before", len(pending))
            self.publisher.publish(pending)

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="worker", daemon=True)
        self._worker.start()

        def join() -> None:
            assert self._worker is not None
            self._worker.join(60)

        self._stack.append(join)

    def _start_settler(self) -> None:
        self.settler = Settler(
            self.cfg.watch, self._queue, known=self._known_images,
            on_skip=lambda path, why: log.info("skipping %s: %s", path, why),
        )
        self.settler.start()
        self._stack.append(self.settler.stop)

    def _known_images(self) -> dict[str, tuple[int | None, int | None]]:
        assert self.reader is not None
        with Session(self.reader) as s:
            return store.known_images(s)

    # ------------------------------------------------------------ health

    def health(self) -> dict[str, Any]:
        seg = self.segmenter
        return {
            "status": "ready" if self.ready.is_set() else "starting",
            "uptime_s": round(time.time() - self.started_at, 1),
            "layers_ok": self.counts["ok"],
            "layers_error": self.counts["error"],
            "queue": self._queue.qsize() + (self.settler.pending if self.settler else 0),
            "device": str(seg.device) if seg else None,
            "model_sha256": seg.info.sha256 if seg else None,
        }

    # ------------------------------------------------------------ the worker

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                cand = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self._process(cand)
            except Exception as e:  # never let one layer stop the daemon
                log.exception("unexpected failure on %s", cand.path)
                self._commit(self._error_record(cand, f"internal error: {e!r}"), [])

    def _error_record(self, cand: Candidate, reason: str,
                      facts: _Facts | None = None) -> LayerRecord:
        assert self.segmenter is not None
        now = time.time()
        f = facts or _Facts(None, None, None)
        return LayerRecord(
            printer=self.printer, build=cand.key.build, layer=cand.key.layer, status="error",
            error=reason, image_path=str(cand.path), image_size=f.size,
            image_mtime_ns=f.mtime_ns, image_sha256=f.sha256,
            model_sha256=self.segmenter.info.sha256, detected_at=cand.detected_at,
            processed_at=now, total_ms=(now - cand.detected_at) * 1000.0,
        )

    def _process(self, cand: Candidate) -> None:
        assert self.segmenter is not None and self.settler is not None
        assert self.alarms is not None
        w = self.cfg.watch
        t0 = time.perf_counter()
        path = cand.path
        try:
            st = path.stat()
            if st.st_size > w.max_file_mb * 1e6:
                raise ImageError(f"file is {st.st_size / 1e6:.0f} MB, over watch.max_file_mb "
                                 f"({w.max_file_mb:g})")
            data = path.read_bytes()
        except FileNotFoundError:
            self._finish(cand, None, self._error_record(
                cand, "file disappeared before it could be read"))
            return
        except IsADirectoryError:
            log.info("skipping %s: a folder named like an image", path)
            return
        except ImageError as e:
            self._finish(cand, None, self._error_record(cand, str(e)))
            return
        except OSError as e:
            self._finish(cand, None, self._error_record(
                cand, f"cannot read file: {e.strerror or e}"))
            return
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
                self.settler.retry(cand, delay_s=w.retry_delay_s, changed=changed)
                return
            self._finish(cand, sig, self._error_record(cand, str(e), facts))
            return
        decode_ms = (time.perf_counter() - t0) * 1000.0
        seg = self.segmenter.predict(gray)
        stats = layer_stats(seg.masks, self.segmenter.class_names,
                            pixel_size_mm=self.cfg.camera.pixel_size_mm,
                            max_components=self.cfg.store.max_components)
        events = self.alarms.evaluate(self.printer, cand.key.build, cand.key.layer, stats)
        now = time.time()
        rec = LayerRecord(
            printer=self.printer, build=cand.key.build, layer=cand.key.layer, status="ok",
            error=None, image_path=str(path), model_sha256=self.segmenter.info.sha256,
            detected_at=cand.detected_at, processed_at=now, decode_ms=decode_ms,
            infer_ms=seg.infer_ms, total_ms=(now - cand.detected_at) * 1000.0, stats=stats,
            image_size=facts.size, image_mtime_ns=facts.mtime_ns, image_sha256=facts.sha256,
        )
        self._finish(cand, sig, rec, events)

    def _finish(self, cand: Candidate, sig: tuple[int, int] | None, rec: LayerRecord,
                events: list[AlarmEvent] | None = None) -> None:
        assert self.settler is not None
        self.counts[rec.status] += 1
        if rec.status == "error":
            log.warning("layer %s/%d: %s (%s)", rec.build, rec.layer, rec.error, rec.image_path)
        else:
            log.info("layer %s/%d ok in %.0f ms", rec.build, rec.layer, rec.total_ms or 0)
        self._commit(rec, events or [])
        self.settler.done(cand, sig)

    def _commit(self, rec: LayerRecord, events: list[AlarmEvent]) -> None:
        assert self.writer is not None and self.publisher is not None
        max_comp = self.cfg.store.max_components

        def job(s: Session) -> list[Outgoing]:
            build_id, replaced = store.put_layer(s, rec, max_components=max_comp)
            msgs: list[tuple[str, dict[str, Any]]] = [("layer", layer_message(rec,
                                                                            replaced=replaced))]
            for ev in events:
                for row in store.apply_alarm(s, build_id, ev, rec.processed_at):
                    msgs.append(("alarm", alarm_message(row, printer=rec.printer,
                                                        build=rec.build)))
            return store.put_outbox(s, msgs)

        self.writer.submit(job, self.publisher.publish)
