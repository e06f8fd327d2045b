"""Stage 1, the loader thread: reads and decodes layer files in order, ahead of the model."""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Mapping

from monitor.config import WatchConfig
from monitor.daemon import failpoints
from monitor.daemon.items import Decoded, Facts, Failed, Loaded
from monitor.daemon.parts import GeometryAhead
from monitor.daemon.stage import Stage
from monitor.daemon.watcher import Candidate, Settler, check_opened_inside
from monitor.errors import ImageError
from monitor.vision.imaging import decode

log = logging.getLogger(__name__)


class Loader(Stage):
    """Candidates (from the settlers) -> Loaded or Failed (to the worker), in order."""

    def __init__(self, *, inbox: queue.Queue[Candidate], outbox: queue.Queue[Decoded],
                 watch: Mapping[str, WatchConfig], settlers: Mapping[str, Settler],
                 stop: threading.Event, geometry: GeometryAhead | None = None) -> None:
        super().__init__("loader", stop=stop)
        self.inbox, self.outbox = inbox, outbox
        self.watch = watch  # printer -> its [watch] settings
        self.settlers = settlers
        self.geometry = geometry  # prepares each layer's slice and printed area beside the model

    def _loop(self) -> None:
        while not self.stop_event.is_set():
            self._beat()
            try:
                cand = self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                item = self.load(cand)
            except Exception as e:  # never let one layer stop the daemon
                log.exception("unexpected failure on %s", cand.path)
                item = Failed(cand, None, f"internal error: {e!r}")
            if item is not None:
                self.handoff(self.outbox, item, until_stop=True)

    def load(self, cand: Candidate) -> Decoded | None:
        """The decoded layer; or its failure (an error record, written by the analyser in
        order); or None (a skip, or a retry while the file is still being written)."""
        w = self.watch[cand.printer]
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
                check_opened_inside(f.fileno(), path, w.dir)
                if st.st_size > w.max_file_mb * 1e6:
                    raise ImageError(f"file is {st.st_size / 1e6:.0f} MB, over "
                                     f"watch.max_file_mb ({w.max_file_mb:g})")
                data = f.read()
        except FileNotFoundError:
            return Failed(cand, None, "file disappeared before it could be read")
        except ImageError as e:
            return Failed(cand, None, str(e))
        except OSError as e:
            return Failed(cand, None, f"cannot read file: {e.strerror or e}")
        failpoints.reach("decode")
        sig = (len(data), st.st_mtime_ns)
        facts = Facts(len(data), st.st_mtime_ns, hashlib.sha256(data).hexdigest())
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
                self.settlers[cand.printer].retry(cand, delay_s=w.retry_delay_s,
                                                  changed=changed)
                return None
            return Failed(cand, sig, str(e), facts)
        geometry = None if self.geometry is None else self.geometry.submit(
            cand.printer, cand.key.build, cand.key.layer, path=cand.path, gray=gray)
        return Loaded(cand, gray, sig, facts, (time.perf_counter() - t0) * 1000.0, geometry)
