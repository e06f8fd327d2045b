"""The alarm action hook: a command run on alarms, e.g. to pause the machine.

The command is an argument list run without a shell; the alarm is passed as JSON on stdin and
in ``PBF_ALARM_*`` environment variables. It runs on its own thread with a timeout, so a slow
or failing command is logged and never holds up the pipeline; if alarms arrive faster than
the command runs, the excess is dropped with an error in the log.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from monitor.config import HookConfig

log = logging.getLogger(__name__)

_STOP = object()
STDERR_TAIL = 4096  # bytes of a hook's stderr kept for the log; the rest is read and dropped


class HookRunner:
    """Owns the hook's subprocesses: one at a time, in order."""

    def __init__(self, command: Sequence[str], *, timeout_s: float = 10.0,
                 max_pending: int = 100) -> None:
        self.command = list(command)
        self.timeout_s = timeout_s
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="alarm-hook", daemon=True)
        self.runs = 0
        self.failures = 0
        self.finished = 0  # alarms whose hook has run to its end (or failed to start)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False

    def start(self) -> None:
        self._started = True
        self._thread.start()

    def submit(self, alarm: dict[str, Any]) -> None:
        """Queue one alarm for the hook; never blocks."""
        try:
            self._q.put_nowait(alarm)
        except queue.Full:
            self.failures += 1
            log.error("alarm hook: %d alarms waiting; dropping alarm %s", self._q.qsize(),
                      alarm.get("id"))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                self._call(item)
            except Exception:  # one alarm's hook must never end the runner
                self.failures += 1
                log.exception("alarm hook %s: failed for alarm %s", self.command[0],
                              item.get("id") if isinstance(item, dict) else None)
            self.finished += 1

    @property
    def alive(self) -> bool:
        """The runner's thread is up (or not started yet): part of the daemon's health."""
        return not self._started or self._thread.is_alive()

    def _call(self, alarm: dict[str, Any]) -> None:
        env = {**os.environ}
        for k in ("id", "printer", "build", "layer", "class", "rule", "severity", "state", "part",
                  "seq"):
            env[f"PBF_ALARM_{k.upper()}"] = "" if alarm.get(k) is None else str(alarm[k])
        self.runs += 1
        try:
            # Its own session and process group: at the timeout the whole group is killed,
            # children included (a child that outlived the command used to hold the stderr
            # pipe open, and every later hook waited on it).
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                    start_new_session=True)
        except OSError as e:
            self.failures += 1
            log.error("alarm hook %s: cannot run: %s", self.command[0], e.strerror or e)
            return
        self._proc = proc
        try:
            timed_out, tail = _talk(proc, json.dumps(alarm).encode(), self.timeout_s)
        finally:
            self._proc = None
        if timed_out:
            self.failures += 1
            log.error("alarm hook %s: still running after %g s (alarm %s): killed its process "
                      "group%s", self.command[0], self.timeout_s, alarm.get("id"),
                      _last_line(tail))
            return
        if proc.returncode != 0:
            self.failures += 1
            log.error("alarm hook %s: exit status %d for alarm %s%s", self.command[0],
                      proc.returncode, alarm.get("id"), _last_line(tail))
        else:
            log.info("alarm hook %s ran for alarm %s", self.command[0], alarm.get("id"))

    def stop(self, grace_s: float = 2.0) -> None:
        """Drop what is queued; give a running command `grace_s`, then kill its process
        group (a stopping daemon must not wait out a hook that hangs)."""
        if not self._thread.is_alive():
            return
        while True:
            try:
                self._q.get_nowait()
            except queue.Empty:
                break
        self._q.put(_STOP)
        self._thread.join(grace_s)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            log.warning("alarm hook %s still running at stop: killed", self.command[0])
            _kill_group(proc)
        self._thread.join(5)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the hook's process group (its own session: the command and its children)."""
    # Already gone: nothing to do (the leader may have been reaped, its children not).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _last_line(tail: bytes) -> str:
    lines = tail.decode(errors="replace").strip().splitlines()
    return f": {lines[-1][-500:]}" if lines else ""


def _talk(proc: subprocess.Popen[bytes], stdin: bytes, timeout_s: float) -> tuple[bool, bytes]:
    """Feed stdin and read stderr, keeping only its last STDERR_TAIL bytes, until the command
    exits or timeout_s passes; then kill the group and never wait on the pipes again.

    Returns (timed_out, stderr tail). A child left running in the background by a command
    that exited keeps its pipe: it is not waited for.
    """
    assert proc.stdin is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout_s
    tail = bytearray()
    sel = selectors.DefaultSelector()
    out_fd, err_fd = proc.stdin.fileno(), proc.stderr.fileno()
    os.set_blocking(out_fd, False)
    os.set_blocking(err_fd, False)
    sel.register(err_fd, selectors.EVENT_READ)
    pending = memoryview(stdin)
    if pending:
        sel.register(out_fd, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                _kill_group(proc)
                proc.wait()  # the leader dies at once on SIGKILL; its pipes are not waited on
                return True, bytes(tail)
            if not sel.get_map():  # stderr at EOF and stdin written: just wait for the exit
                try:
                    proc.wait(min(left, 0.1))
                except subprocess.TimeoutExpired:
                    continue
                return False, bytes(tail)
            for key, _ in sel.select(min(left, 0.1)):
                if key.fd == err_fd:
                    try:
                        chunk = os.read(err_fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(err_fd)
                        continue
                    tail += chunk
                    del tail[:-STDERR_TAIL]
                else:
                    try:
                        n = os.write(out_fd, pending)
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:  # the command does not read its stdin
                        n = len(pending)
                    pending = pending[n:]
                    if not pending:
                        sel.unregister(out_fd)
                        proc.stdin.close()
            if proc.poll() is not None and err_fd in sel.get_map():
                # Exited; what it wrote is in the pipe now. A background child may hold the
                # pipe open for good: read what is there and stop.
                try:
                    while chunk := os.read(err_fd, 65536):
                        tail += chunk
                        del tail[:-STDERR_TAIL]
                except BlockingIOError:
                    pass
                return False, bytes(tail)
    finally:
        sel.close()
        for f in (proc.stdin, proc.stderr):
            if not f.closed:
                f.close()


def start_hook(cfg: HookConfig, *, undo: list[Callable[[], None]]) -> HookRunner | None:
    """The hook's thread, started (its stop pushed on `undo`), when [alarms.hook] names a
    command; else None."""
    if not cfg.command:
        return None
    hook = HookRunner(cfg.command, timeout_s=cfg.timeout_s)
    hook.start()
    undo.append(hook.stop)
    return hook
