"""Stage 2, the worker thread: owns the model, and runs it on decoded layers in order.

A backlog (a restart, a burst) goes through the model together, up to batch_size layers,
which keeps a GPU busy; on a CPU batch_size is 1. A reload hands the worker a new model,
which it takes with its next batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
from pathlib import Path

from monitor.config import Config
from monitor.daemon import failpoints
from monitor.daemon.items import Analysable, Decoded, Failed, Loaded, Segmented
from monitor.daemon.metrics import Metrics
from monitor.daemon.stage import Stage
from monitor.vision.model import file_signature
from monitor.vision.segmenter import Segmenter

log = logging.getLogger(__name__)


class WeightsWatch:
    """Says so, once per change, when the weights file on disk is no longer the one being
    served: a new model is taken only on reload, never half-way through a copy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.served: tuple[int, int, int] | None = None  # the signature of the file served
        self._warned: tuple[int, int, int] | None = None

    def check(self, serving_sha256: str) -> None:
        """Checked with each layer (one stat)."""
        try:
            sig = file_signature(self.path)
        except OSError:
            sig = None
        if sig != self.served and sig != self._warned:
            self._warned = sig
            log.warning("weights file %s changed on disk; still serving model %s until a "
                        "reload (SIGHUP, systemctl reload pbf-monitor)", self.path,
                        serving_sha256[:12])


class Worker(Stage):
    """Loaded -> Segmented (to the analyser); Failed passes through in its place."""

    def __init__(self, *, model: Segmenter, weights: WeightsWatch, metrics: Metrics,
                 inbox: queue.Queue[Decoded], outbox: queue.Queue[Analysable],
                 stop: threading.Event) -> None:
        super().__init__("worker", stop=stop)
        self.model = model
        self.weights = weights
        self.metrics = metrics
        self.inbox, self.outbox = inbox, outbox

    def swap(self, model: Segmenter) -> None:
        """Serve `model` from the next batch on (a reload; any thread)."""
        self.model = model

    def _loop(self) -> None:
        held: Failed | None = None
        while not self.stop_event.is_set():
            self._beat()
            try:
                first = held or self.inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            held = None
            model = self.model  # the same one for the whole batch, even if a reload swaps it
            if isinstance(first, Failed):
                self._pass(first, model)
                continue
            batch = [first]
            while len(batch) < model.batch_size:
                try:
                    nxt = self.inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(nxt, Failed):
                    held = nxt  # a failure keeps its place: after this batch
                    break
                batch.append(nxt)
            self._infer(model, batch)
        if held is not None:
            self._pass(held, self.model)

    def _pass(self, item: Failed, model: Segmenter) -> None:
        self.handoff(self.outbox, dataclasses.replace(item, model_sha256=model.info.sha256),
                     until_stop=False)

    def _infer(self, model: Segmenter, batch: list[Loaded]) -> None:
        """Run the model on decoded layers; hand each result (or its failure) on, in order."""
        self.weights.check(model.info.sha256)
        failpoints.reach("infer")
        self.metrics.batch.observe(len(batch))
        try:
            segs = model.predict_many([x.gray for x in batch], probs=False)
        except Exception as e:
            log.exception("the model failed on %d layer(s)", len(batch))
            for x in batch:
                self._pass(Failed(x.cand, None, f"internal error: {e!r}"), model)
            return
        for x, seg in zip(batch, segs, strict=True):
            self.handoff(self.outbox, Segmented(x, seg, model.class_names, model.info.sha256),
                         until_stop=False)


def load_model(cfg: Config) -> tuple[Segmenter, WeightsWatch]:
    """The configured model, warmed up, and the watch on its weights file."""
    weights = WeightsWatch(cfg.model.weights)
    with contextlib.suppress(OSError):  # from_config names the problem
        weights.served = file_signature(cfg.model.weights)
    model = Segmenter.from_config(cfg)
    model.warm_up()
    return model, weights
