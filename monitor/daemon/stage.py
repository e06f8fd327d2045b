"""A pipeline stage: one thread with its own loop, a heartbeat, and hand-off to the next."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Stage:
    """Subclasses implement ``_loop``: go round while ``stop`` is clear, calling ``_beat()``."""

    def __init__(self, name: str, *, stop: threading.Event) -> None:
        self.name = name
        self.stop_event = stop
        self.beat = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def _loop(self) -> None:
        raise NotImplementedError

    def _beat(self) -> None:
        self.beat = time.monotonic()

    def start(self) -> None:
        self._beat()
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def handoff(self, q: queue.Queue[Any], item: object, *, until_stop: bool) -> None:
        """Hand an item to the next stage; with until_stop, give up when stopping (the layer
        is not stored, so the rescan at the next start finds it again)."""
        while True:
            try:
                q.put(item, timeout=0.2)
                return
            except queue.Full:
                if until_stop and self.stop_event.is_set():
                    return
