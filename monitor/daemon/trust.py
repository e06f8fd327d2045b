"""The served weights' trust on each printer's camera (monitor.alarms.trust), worked out
when weights load and when the config is reloaded, and logged when it changes."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from monitor.alarms.trust import ModelTrust, model_trust
from monitor.config import PrinterConfig
from monitor.vision.segmenter import Segmenter


def fleet_trust(model: Segmenter, printers: Mapping[str, PrinterConfig], *,
                trust_unadapted: bool) -> dict[str, ModelTrust]:
    """printer -> trust in the model on its camera."""
    return {name: model_trust(model.info.adapted_cameras, p.camera.id,
                              trust_unadapted=trust_unadapted)
            for name, p in printers.items()}


def log_trust(trust: Mapping[str, ModelTrust], log: logging.Logger) -> None:
    """Say, per printer, why the model is not trusted (warning) or trusted anyway (info);
    on the caller's logger."""
    for name, t in trust.items():
        who = f"printer {name}: " if name else ""
        if not t.trusted:
            log.warning("%smodel not trusted on this camera: %s", who, t.reason)
        elif t.reason:
            log.info("%s%s", who, t.reason)


def untrusted(trust: Mapping[str, ModelTrust]) -> frozenset[str]:
    """The printers whose alarms from defect classes are capped (the engine's `untrusted`)."""
    return frozenset(n for n, t in trust.items() if not t.trusted)
