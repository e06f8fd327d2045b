"""The systemd notify protocol: one datagram per state change to $NOTIFY_SOCKET.

Without systemd (no NOTIFY_SOCKET) every call is a no-op, so the daemon runs the same by hand.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    return "\0" + addr[1:] if addr.startswith("@") else addr  # '@': the abstract namespace


def notify(*fields: str) -> bool:
    """Send e.g. notify("READY=1", "STATUS=watching"); False when not under systemd."""
    addr = _address()
    if addr is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto("\n".join(fields).encode(), addr)
    return True


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when it expects none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None
