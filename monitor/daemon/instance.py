"""One daemon per state folder and database: an exclusive lock held for the daemon's life."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from pathlib import Path

from monitor.errors import StoreError

LOCK_NAME = "pbf-monitor.lock"


class InstanceLocked(StoreError):
    """Another daemon holds the state folder or the database."""


def lock_paths(state_dir: Path, store_url: str) -> list[Path]:
    """The lock files: the state folder's, and one beside a SQLite database kept elsewhere."""
    paths = [state_dir / LOCK_NAME]
    if store_url.startswith("sqlite:///"):
        db = Path(store_url.removeprefix("sqlite:///"))
        beside = db.with_name(db.name + ".lock")
        if db.parent.resolve() != state_dir.resolve():
            paths.append(beside)
    return paths


class InstanceLock:
    """flock(2) on each path, taken at start and released at exit (or by the kernel on a crash).

    flock and not a pid file: a kill -9 leaves no stale lock, so a restart never needs a
    hand to clean up. The holder's pid and host are written into the file to name it.
    """

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self._fds: list[int] = []

    def acquire(self) -> None:
        try:
            for path in self._paths:
                self._fds.append(self._take(path))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Idempotent; closing the descriptor drops the lock."""
        while self._fds:
            os.close(self._fds.pop())

    @staticmethod
    def _take(path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StoreError(f"{path}: cannot create the instance lock: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise InstanceLocked(
                f"{path}: another pbf-monitor daemon holds this lock ({holder}); stop it, or "
                "give this one its own store.state_dir and database") from None
        except OSError as e:
            os.close(fd)
            raise StoreError(f"{path}: cannot lock: {e.strerror}") from e
        with contextlib.suppress(OSError):  # the name is a courtesy; the flock is the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        return fd


def holder(paths: list[Path]) -> str | None:
    """Who holds one of these locks (a running daemon: "pid 12 on host"), else None.

    Creates nothing: a lock file that is not there is not held. The probe is a shared flock
    held for a moment, so a daemon starting in that same moment would be refused once.
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
        except OSError:
            continue  # a file system without flock: the daemon could not have locked it
        finally:
            os.close(fd)  # drops the probe's lock
    return None


def claim_state_dir(state_dir: Path, store_url: str) -> InstanceLock:
    """Check the state folder is writable, then take the instance lock (held on return)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe = state_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StoreError(f"{state_dir}: state directory is not writable "
                         f"({e.strerror or e}); set store.state_dir") from e
    lock = InstanceLock(lock_paths(state_dir, store_url))
    lock.acquire()
    return lock
