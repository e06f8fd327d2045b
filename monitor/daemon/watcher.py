"""Finding complete layer images: watchdog events, a settle check, and rescans.

The watchdog handler only enqueues (an exception in a handler kills the observer thread). The
Settler thread decides when a file is complete: at once after close-after-write or a rename
into place, otherwise once its size and mtime have not changed for ``settle_s`` (writers that
keep files open, polling on network shares). Rescans at start and periodically compare the
folder with the database, so files missed while the daemon was down or when inotify
overflowed are still processed.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from monitor.config import WatchConfig
from monitor.errors import ImageError
from monitor.records import storable

log = logging.getLogger(__name__)

DEFAULT_BUILD = "default"
_DIGITS = re.compile(r"\d+")
_DECIMAL = re.compile(r"\d+(?:\.\d+)?")
# watch.layer_from -> mm per unit of the number in the name (None: the number is the layer)
HEIGHT_UNITS_MM = {"number": None, "height_um": 0.001, "height_mm": 1.0}


@dataclass(frozen=True, order=True)
class LayerKey:
    build: str
    layer: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "build", storable(self.build))  # a folder that is not UTF-8


def parse_layer_path(
    rel: PurePath,
    pattern: re.Pattern[str] | None,
    *,
    layer_from: str = "number",
    layer_thickness_mm: float = 0.05,
) -> LayerKey | None:
    """Build and layer from a path relative to the watch dir; None if not a layer.

    The number is the pattern's `layer` group, else the last run of digits in the file name
    (a decimal one, `12.03`, for heights). With `layer_from` a height (`height_um`,
    `height_mm`), the layer is round(height / layer_thickness_mm): `part_012030.png` with
    30 um layers is layer 401.
    """
    unit_mm = HEIGHT_UNITS_MM[layer_from]
    if pattern is not None:
        m = pattern.search(rel.as_posix())
        if not m:
            return None
        build, raw = m.group("build") or DEFAULT_BUILD, m.group("layer")
    else:
        numbers = (_DIGITS if unit_mm is None else _DECIMAL).findall(rel.stem)
        if not numbers:
            return None
        build = rel.parts[0] if len(rel.parts) > 1 else DEFAULT_BUILD
        raw = numbers[-1]
    try:
        if unit_mm is None:
            return LayerKey(build, int(raw))
        return LayerKey(build, round(float(raw) * unit_mm / layer_thickness_mm))
    except (TypeError, ValueError):
        return None


@dataclass
class Candidate:
    """A file on its way to the worker."""

    path: Path
    key: LayerKey
    detected_at: float
    attempts: int = 0
    sig: tuple[int, int] | None = None  # (size, mtime_ns) when last looked at
    stable_since: float = 0.0
    complete: bool = False  # a close or rename says the writer is done
    not_before: float = 0.0
    printer: str = ""  # which printer's folder it came from (fleets)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None if it is not there."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def inside(path: str | Path, root: Path) -> bool:
    """Whether path, with every symlink resolved, lies in the watch folder root."""
    real = Path(os.path.realpath(path))
    return real.is_relative_to(os.path.realpath(root))


def check_opened_inside(fd: int, path: Path, root: Path) -> None:
    """Refuse a layer file whose opened descriptor is not a file of the watch folder (a
    symlink to /etc/passwd or /proc/self/environ). Checks what was opened, not the name,
    so a link swapped between the check and the open cannot slip through.

    Raises:
        ImageError: saying where it leads.
    """
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")  # what the descriptor really is (Linux)
    except OSError:
        real = os.path.realpath(path)
    if not Path(real).is_relative_to(os.path.realpath(root)):
        raise ImageError(f"leads outside the watch folder (to {real}); refused unread")


def _special(path: Path, root: Path) -> bool:
    """A name that does not hold layer content of its own: a pipe, socket or device, or a
    symlink out of the watch folder. It gets one error record, never a re-read."""
    try:
        st = path.stat()
    except OSError:
        return path.is_symlink()  # dangling or a loop: judged by the link itself
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return True
    return path.is_symlink() and not inside(path, root)


def _signature(path: Path, root: Path | None = None) -> tuple[int, int] | None:
    """(size, mtime_ns) of the content; of the link itself for a symlink leading out of
    root (its target is never read, and /proc files change under every look)."""
    try:
        st = path.stat()
        if root is not None and path.is_symlink() and not inside(path, root):
            st = path.lstat()
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


class _Handler(FileSystemEventHandler):
    """Only enqueues: any work here would run on, and could kill, the observer thread."""

    def __init__(self, sink: Callable[[str, str], None]) -> None:
        self._sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileClosedEvent):
            self._sink("closed", os.fsdecode(event.src_path))
        elif isinstance(event, FileMovedEvent):
            self._sink("gone", os.fsdecode(event.src_path))
            self._sink("moved", os.fsdecode(event.dest_path))
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._sink("changed", os.fsdecode(event.src_path))
        elif isinstance(event, DirCreatedEvent):
            self._sink("dir", os.fsdecode(event.src_path))
        elif isinstance(event, DirMovedEvent):
            self._sink("dir", os.fsdecode(event.dest_path))


class Settler:
    """Turns file events and rescans into complete, ordered layer candidates for the worker."""

    def __init__(
        self,
        cfg: WatchConfig,
        ready: queue.Queue[Candidate],
        *,
        known: Callable[[], dict[str, tuple[int | None, int | None]]],
        on_skip: Callable[[Path, str], None] | None = None,
        printer: str = "",
        layer_thickness_mm: float = 0.05,
    ) -> None:
        self.cfg = cfg
        self.layer_thickness_mm = layer_thickness_mm  # for watch.layer_from heights
        self.printer = printer
        self.root = cfg.dir
        self.pattern = re.compile(cfg.pattern) if cfg.pattern else None
        self._ready = ready
        self._known = known
        self._on_skip = on_skip
        self._events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._pending: dict[Path, Candidate] = {}
        # Signatures of files already handed over, so late events for them are not repeats.
        self._handled: OrderedDict[Path, tuple[int, int] | None] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._observer_lock = threading.Lock()
        self._root_id: tuple[int, int] | None = None
        self._next_root_check = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"settler-{printer}" if printer else "settler")
        self._observer: BaseObserver | None = None
        self._next_rescan = 0.0
        self.rescans = 0
        self._rescan_requested = threading.Event()

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self._observer_lock:
            self._arm()
        # Rescan after the observer runs, so a file written in between is seen by one of them.
        self._rescan_requested.set()
        self._thread.start()
        log.info("watching %s (%s%s)", self.root, "polling" if self.cfg.polling else "inotify",
                 f", pattern {self.cfg.pattern!r}" if self.cfg.pattern else "")

    def _arm(self) -> None:
        """Start an observer on the root (caller holds the observer lock)."""
        observer: BaseObserver = (
            PollingObserver(timeout=self.cfg.poll_interval_s) if self.cfg.polling else Observer()
        )
        observer.schedule(_Handler(self.notify), str(self.root), recursive=self.cfg.recursive)
        observer.start()
        self._observer = observer
        self._root_id = _identity(self.root)

    def _check_root(self) -> None:
        """The watch folder deleted and made again is a new inode that the old inotify watch
        does not see: watch the new one, and rescan it."""
        now = _identity(self.root)
        if now == self._root_id:
            return
        if now is None:
            log.warning("watch folder %s is gone; waiting for it to come back", self.root)
            self._root_id = None
            return
        with self._observer_lock:
            if self._stop.is_set():
                return
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(10)
            self._arm()
        log.warning("watch folder %s is back: watching it again", self.root)
        self._rescan_requested.set()

    def stop(self) -> None:
        """Stop the observer and the settle thread. Idempotent."""
        self._stop.set()
        self._wake.set()
        with self._observer_lock:
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(10)
                self._observer = None
        if self._thread.is_alive():
            self._thread.join(10)

    def notify(self, kind: str, path: str) -> None:
        self._events.put((kind, path))
        self._wake.set()  # a closed file goes to the worker now, not at the next tick

    def request_rescan(self) -> None:
        self._rescan_requested.set()

    def retry(self, cand: Candidate, *, delay_s: float, changed: bool) -> None:
        """Put a candidate back: after a delay if unchanged, or to settle again if changed."""
        cand.attempts += 0 if changed else 1
        cand.complete = not changed and cand.complete
        cand.not_before = time.monotonic() + (0.0 if changed else delay_s)
        cand.stable_since = time.monotonic()
        cand.sig = None
        with self._lock:
            self._pending[cand.path] = cand

    def done(self, cand: Candidate, sig: tuple[int, int] | None) -> None:
        """The worker finished a file whose content had this signature (None: it has no
        content of its own, or it vanished)."""
        if sig is None and _special(cand.path, self.root):
            # A FIFO or device: its stable signature, so rescans do not record it again.
            sig = _signature(cand.path, self.root)
        with self._lock:
            self._handled[cand.path] = sig
            self._handled.move_to_end(cand.path)
            while len(self._handled) > 100_000:
                self._handled.popitem(last=False)

    @property
    def pending(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------ classification

    def key_for(self, path: Path) -> LayerKey | None:
        """The layer a path holds, or None (logged) if it is not a layer image."""
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return None
        if any(part.startswith(".") for part in rel.parts):
            return None  # hidden files, and the temp names many writers use
        if path.suffix.lower() not in self.cfg.extensions:
            return None
        key = parse_layer_path(rel, self.pattern, layer_from=self.cfg.layer_from,
                               layer_thickness_mm=self.layer_thickness_mm)
        if key is None and self._on_skip:
            self._on_skip(path, "no layer number in the file name"
                          if self.pattern is None else "does not match watch.pattern")
        return key

    # ------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if time.monotonic() >= self._next_root_check:
                    self._next_root_check = time.monotonic() + 1.0
                    self._check_root()
                self._drain_events()
                if self._rescan_requested.is_set() or (
                    self.cfg.rescan_interval_s and time.monotonic() >= self._next_rescan
                ):
                    self._rescan_requested.clear()
                    self._rescan()
                self._promote()
            except Exception:  # keep watching whatever one file or the database did
                log.exception("settler loop failed; continuing")
            self._wake.wait(0.05)
            self._wake.clear()

    def _drain_events(self) -> None:
        now = time.time()
        while True:
            try:
                kind, raw = self._events.get_nowait()
            except queue.Empty:
                return
            path = Path(raw)
            if kind == "gone":
                with self._lock:
                    self._pending.pop(path, None)
                continue
            if kind == "dir":
                # Files can land in a new folder before its watch is armed: scan it.
                for f in self._walk(path):
                    self._add(f, now, complete=False)
                continue
            self._add(path, now, complete=kind in ("closed", "moved"))

    def _add(self, path: Path, now: float, *, complete: bool) -> None:
        with self._lock:
            cand = self._pending.get(path)
            if cand is not None:
                cand.complete = cand.complete or complete
                return
        if path.is_dir():
            return
        key = self.key_for(path)
        if key is None:
            return
        with self._lock:
            if path in self._handled:
                current = _signature(path, self.root)
                if current is None or self._handled[path] == current:
                    return  # a late event for content already handed over, or a file gone
            self._pending[path] = Candidate(path, key, now, complete=complete,
                                            printer=self.printer,
                                            stable_since=time.monotonic())

    def _walk(self, top: Path) -> Iterator[Path]:
        # followlinks=False: a symlink loop must not hang the scan.
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if not self.cfg.recursive and Path(dirpath) != self.root:
                dirnames[:] = []
                continue
            for name in filenames:
                yield Path(dirpath) / name

    def _rescan(self) -> None:
        known = self._known()
        now = time.time()
        found = 0
        for path in self._walk(self.root):
            sig = _signature(path, self.root)
            if sig is None:
                continue
            stored = known.get(storable(str(path)))
            if stored is not None and (stored == sig or _special(path, self.root)):
                continue  # recorded; a pipe, device or link out has no content to re-read
            with self._lock:
                if path in self._pending or self._handled.get(path) == sig:
                    continue
            before = len(self._pending)
            self._add(path, now, complete=False)
            found += len(self._pending) - before
        if found:
            log.info("rescan found %d unprocessed image(s)", found)
        self._next_rescan = time.monotonic() + self.cfg.rescan_interval_s
        self.rescans += 1

    def _promote(self) -> None:
        """Hand complete candidates to the worker, in build and layer order."""
        mono, wall = time.monotonic(), time.time()
        ready: list[Candidate] = []
        with self._lock:
            for path, cand in list(self._pending.items()):
                if mono < cand.not_before:
                    continue
                sig = _signature(path, self.root)
                if sig is None:
                    # Gone before we read it: the worker records the error for the layer, and
                    # late events about the vanished file are not news.
                    ready.append(self._pending.pop(path))
                    self._handled[path] = None
                    self._handled.move_to_end(path)
                    continue
                if sig != cand.sig:
                    cand.sig = sig
                    cand.stable_since = mono
                    # mtime tells how long an untouched file found by a rescan has been still.
                    age = wall - sig[1] / 1e9
                    if not cand.complete and age < self.cfg.settle_s:
                        continue
                empty = sig[0] == 0
                settled = mono - cand.stable_since >= self.cfg.settle_s or (
                    wall - sig[1] / 1e9 >= self.cfg.settle_s
                )
                # An empty file that was closed may be re-opened for writing: let it settle.
                if (cand.complete and not empty) or settled:
                    ready.append(self._pending.pop(path))
                    self._handled[path] = sig  # late events for this content are not news
                    self._handled.move_to_end(path)
        for cand in sorted(ready, key=lambda c: c.key):
            while not self._stop.is_set():
                try:
                    self._ready.put(cand, timeout=0.5)
                    break
                except queue.Full:
                    continue
