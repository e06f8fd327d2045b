"""SIGHUP: new alarm rules, thresholds and weights without stopping (caller's thread)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from monitor.config import Config
from monitor.daemon.analyser import Analyser
from monitor.daemon.items import Reload
from monitor.daemon.worker import Worker
from monitor.errors import WeightsError
from monitor.vision.model import file_sha256, file_signature
from monitor.vision.segmenter import Segmenter, min_component_px, outside_thresholds

log = logging.getLogger(__name__)

RELOADABLE = ("alarms", "model.weights", "model.sha256", "model.threshold",
              "model.thresholds", "model.min_component_mm2")


class Reloader:
    """Holds the config in force; the worker and the analyser take their parts of a new one."""

    def __init__(self, cfg: Config, *, worker: Worker, analyser: Analyser,
                 on_model: Callable[[Segmenter], None]) -> None:
        self.cfg = cfg
        self.worker = worker
        self.analyser = analyser
        self.on_model = on_model

    def reload(self, cfg: Config) -> list[str]:
        """Take new alarm rules, thresholds and weights; a layer in hand finishes with the old
        ones. Nothing changes unless all of it is valid (a weights file still being copied is
        refused). Returns the changed settings that need a restart."""
        m = cfg.model
        running = self.worker.model
        seg = self._new_segmenter(cfg, running) or running
        self.analyser.ask(Reload(cfg.alarms))  # ConfigError before anything changes
        seg.set_thresholds(m.threshold, m.thresholds, min_component_px(cfg, None),
                           outside_thresholds(cfg, None))
        if seg is not running:
            log.info("now serving model %s (was %s)", seg.info.sha256[:12],
                     running.info.sha256[:12])
            self.worker.swap(seg)  # the worker picks it up with its next layer
            self.on_model(seg)
        self.worker.weights.path = m.weights
        old = self.cfg
        self.cfg = old.model_copy(update={
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

    def _new_segmenter(self, cfg: Config, running: Segmenter) -> Segmenter | None:
        """A Segmenter for the weights `cfg` names, if they are not the ones being served:
        loaded, checked and warmed up beside the running one, which the worker keeps using
        meanwhile. WeightsError if the file is incomplete or does not fit the daemon."""
        m = cfg.model
        sig = None
        try:
            sig = file_signature(m.weights)
            if file_sha256(m.weights) == running.info.sha256:
                self.worker.weights.served = sig
                return None
        except OSError:
            pass  # from_config names the problem
        # Only the weights change here: device, backend and tiling stay as they run (those
        # need a restart, and reload() says so).
        keep = self.cfg.model
        new = Segmenter.from_config(cfg.model_copy(update={"model": m.model_copy(update={
            k: getattr(keep, k) for k in ("device", "backend", "cpu_precision", "tile_size",
                                          "tile_overlap", "batch_size")})}))
        if new.class_names != running.class_names:
            raise WeightsError(
                f"{m.weights}: classes {', '.join(new.class_names)} differ from the running "
                f"model's ({', '.join(running.class_names)}); restart to change classes")
        new.warm_up()
        self.worker.weights.served = sig
        return new
