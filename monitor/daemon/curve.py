"""CURVE for the daemon's ZeroMQ endpoints: the server keys from [publish], and the one
context and ZAP authenticator that serve both the PUB socket and the state endpoint."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from monitor.config import Config

log = logging.getLogger(__name__)


def curve_server(cfg: Config) -> Any:
    """The CurveServer keys from [publish], or None when CURVE is off."""
    from monitor.daemon.security import CurveServer

    p = cfg.publish
    if p.curve_secret_key is None or p.curve_authorized_dir is None:
        return None
    return CurveServer(p.curve_secret_key, p.curve_authorized_dir)


def start_curve(cfg: Config, undo: list[Callable[[], None]]) -> tuple[Any, Any] | None:
    """With CURVE on: a context and its started ZAP authenticator (their stops pushed on
    `undo`); None with CURVE off."""
    curve = curve_server(cfg)
    if curve is None:
        return None
    import zmq

    from monitor.daemon.security import ServerAuth

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    undo.append(lambda: ctx.term())
    auth = ServerAuth(ctx, curve.authorized_dir)
    auth.start()
    undo.append(auth.stop)
    log.info("CURVE on: clients must hold a key listed in %s", curve.authorized_dir)
    return ctx, auth
