"""Defect maps: encoded on their own thread once their layer is committed (off the latency
path), attached in a later transaction; and their retention, by age and by free disk space.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from monitor.config import StoreConfig
from monitor.records import LayerRecord
from monitor.reports.maps import encode_map
from monitor.store import writes
from monitor.store.writer import StoreWriter

log = logging.getLogger(__name__)


class MapMaker:
    """Owns the one-thread pool that encodes maps; the writer stores them."""

    def __init__(self, cfg: StoreConfig, *, state_dir: Path, writer: StoreWriter) -> None:
        self.cfg = cfg
        self.state_dir = state_dir
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maps")
        self._next_prune = 0.0

    def stop(self) -> None:
        """A map starts once its layer is committed: let the writer reach the last ones."""
        reached = threading.Event()
        if self.writer.alive:
            self.writer.then(reached.set)
            reached.wait(30)
        self._pool.shutdown(wait=True)

    def later(self, rec: LayerRecord, gray: np.ndarray, masks: np.ndarray) -> None:
        """Encode the layer's defect map once the layer is committed and handed to the
        publisher (so the two do not compete for the CPU), and attach it."""
        writer, max_side = self.writer, self.cfg.map_max_side
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
            writer.submit(lambda s: writes.put_map(s, rec, m))

        def start() -> None:
            try:
                self._pool.submit(encode)
            except RuntimeError:  # shut down: stopping took longer than the writer
                log.info("layer %s/%d: no defect map, the daemon is stopping", rec.build,
                         rec.layer)

        writer.then(start)

    def prune_if_due(self) -> None:
        """Retention, at start and every 10 minutes: by age, and the oldest first while the
        state disk is short of space. Statistics and alarms are kept."""
        st = self.cfg
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + 600.0
        try:
            free_mb = shutil.disk_usage(self.state_dir).free / 2**20
        except OSError:
            free_mb = float("inf")
        short = st.maps_min_free_mb > 0 and free_mb < st.maps_min_free_mb

        def job(s: Session) -> None:
            if st.maps_keep_days > 0:
                n = writes.prune_maps(s, older_than=now - st.maps_keep_days * 86400.0)
                if n:
                    log.info("deleted %d defect map(s) older than %g days", n,
                             st.maps_keep_days)
            if short:
                n = writes.prune_oldest_maps(s, fraction=0.1)
                log.warning("state disk has %.0f MB free (store.maps_min_free_mb %g): deleted "
                            "the oldest %d defect map(s)", free_mb, st.maps_min_free_mb, n)

        self.writer.submit(job)
