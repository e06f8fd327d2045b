"""Named moments in a layer's life where a fault-injection test can freeze the daemon.

``PBF_MONITOR_FAILPOINT=<name>[@<n>]`` makes the process stop itself (SIGSTOP) the n-th time
(default the first) it reaches that point; the test then kills it with SIGKILL at exactly that
moment, which a timer cannot do reliably. Unset, as in production, ``reach`` costs one
comparison. Points: decode (bytes read, not decoded), infer (decoded, before the model),
write (the layer's transaction open, not committed), publish (committed, not handed to the
socket), sent (on the socket, not yet marked sent in the outbox).
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = ("decode", "infer", "write", "publish", "sent")
_ENV = "PBF_MONITOR_FAILPOINT"


def _parse(spec: str) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition("@")
    if name not in POINTS:
        raise ValueError(f"{_ENV}={spec!r}: unknown point (one of {', '.join(POINTS)})")
    return name, int(count or "1")


_armed = _parse(os.environ.get(_ENV, ""))
_hits = 0
_lock = threading.Lock()


def reach(name: str) -> None:
    """Mark that a layer got to `name`; freezes the process if a test armed this point."""
    global _hits
    if _armed is None or _armed[0] != name:
        return
    with _lock:
        _hits += 1
        if _hits != _armed[1]:
            return
    os.kill(os.getpid(), signal.SIGSTOP)
