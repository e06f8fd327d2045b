"""What travels between the daemon's stages: a layer loaded, segmented or failed, and the
requests the analyser takes beside layers. Data only; no stage reaches another through them.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from monitor.config import AlarmsConfig
from monitor.daemon.watcher import Candidate
from monitor.vision.segmenter import Segmentation


class Facts(NamedTuple):
    """What is known about an image file's content."""

    size: int | None
    mtime_ns: int | None
    sha256: str | None


NO_FACTS = Facts(None, None, None)


@dataclass(frozen=True)
class Loaded:
    """A layer read and decoded, waiting for the model."""

    cand: Candidate
    gray: np.ndarray  # (H, W) as decoded
    sig: tuple[int, int]  # (size, mtime_ns) of what was read
    facts: Facts
    decode_ms: float
    # the layer's slice and printed area, being prepared beside the model (daemon/parts.py)
    geometry: Future[Any] | None = None


@dataclass(frozen=True)
class Segmented:
    """A layer through the model, waiting for its statistics."""

    loaded: Loaded
    seg: Segmentation
    class_names: tuple[str, ...]
    model_sha256: str


@dataclass(frozen=True)
class Failed:
    """A layer whose outcome is an error record, decided before the model; the worker stamps
    the model it would have gone through."""

    cand: Candidate
    sig: tuple[int, int] | None
    reason: str
    facts: Facts = NO_FACTS
    model_sha256: str = ""


@dataclass(frozen=True)
class Ack:
    """An operator acknowledged alarm `alarm_id` (state endpoint)."""

    alarm_id: int
    reply: Future[dict[str, Any]] = field(default_factory=Future)


@dataclass(frozen=True)
class Mute:
    """Mute (or unmute) a build, or one class of it (state endpoint)."""

    printer: str
    build: str
    class_name: str | None
    mute: bool
    reply: Future[dict[str, Any]] = field(default_factory=Future)


@dataclass(frozen=True)
class Reload:
    """New alarm rules (SIGHUP); the reply fails with ConfigError if they do not fit."""

    alarms: AlarmsConfig
    reply: Future[dict[str, Any]] = field(default_factory=Future)


Request = Ack | Mute | Reload
Decoded = Loaded | Failed  # loader -> worker
Analysable = Segmented | Failed | Request  # worker (and the control thread) -> analyser
