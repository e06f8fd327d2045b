"""The daemon's health: the state endpoint's and metrics' report, and the systemd watchdog's
yes or no."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

from monitor.daemon.stage import Stage
from monitor.store.writer import StoreWriter
from monitor.vision.segmenter import Segmenter


def health_report(*, ready: bool, started_at: float, counts: Mapping[str, int], queue: int,
                  segmenter: Segmenter | None, writer: StoreWriter | None,
                  serving: Mapping[str, Any], mqtt: Any,
                  trust: Mapping[str, Any]) -> dict[str, Any]:
    """What `state` answers: readiness, counts, queue depths, model, store and endpoints."""
    seg = segmenter
    return {
        "status": "ready" if ready else "starting",
        "uptime_s": round(time.time() - started_at, 1),
        "layers_ok": counts["ok"],
        "layers_error": counts["error"],
        "queue": queue,
        "device": str(seg.device) if seg else None,
        "model_sha256": seg.info.sha256 if seg else None,
        # False: defect-class alarms are capped at warning and run no hook (reason says
        # why; per printer in a fleet)
        "model_trusted": all(t.trusted for t in trust.values()),
        "model_trust_reason": "; ".join(
            (f"{n}: {t.reason}" if n else t.reason)
            for n, t in trust.items() if t.reason) or None,
        # Why the database refuses writes right now (disk full, locked, its file deleted
        # under us), else "ok".
        "store": (writer and (writer.failing or writer.file_problem)) or "ok",
        "store_queue": writer.depth if writer else 0,
        "endpoints": {name: bool(x.alive) for name, x in serving.items()},
        **({"mqtt": "connected" if mqtt.connected else "disconnected",
            "mqtt_dropped": mqtt.dropped} if mqtt is not None else {}),
    }


def is_healthy(*, stages: tuple[Stage, ...], writer: StoreWriter | None, plant_alive: bool,
               serving: Iterable[Any], within_s: float) -> bool:
    """Every pipeline stage went round its loop (a layer, or an idle wait) within
    `within_s`, and the threads they rely on are alive: what the systemd watchdog is told.
    A stage stuck on one layer (a hung read, a hung model) stops the pings."""
    now = time.monotonic()
    stages_ok = bool(stages) and all(
        st.alive and now - st.beat <= within_s for st in stages)
    return (stages_ok and writer is not None and writer.alive
            and writer.file_problem is None
            and plant_alive
            and all(x.alive for x in serving))
