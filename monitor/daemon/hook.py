"""The alarm action hook: a command run on alarms, e.g. to pause the machine.

The command is an argument list run without a shell; the alarm is passed as JSON on stdin and
in ``PBF_ALARM_*`` environment variables. It runs on its own thread with a timeout, so a slow
or failing command is logged and never holds up the pipeline; if alarms arrive faster than
the command runs, the excess is dropped with an error in the log.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import subprocess
import threading
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

_STOP = object()


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
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
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
            self._call(item)

    def _call(self, alarm: dict[str, Any]) -> None:
        env = {**os.environ}
        for k in ("id", "printer", "build", "layer", "class", "rule", "severity", "state", "part",
                  "seq"):
            env[f"PBF_ALARM_{k.upper()}"] = "" if alarm.get(k) is None else str(alarm[k])
        self.runs += 1
        try:
            proc = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        except OSError as e:
            self.failures += 1
            log.error("alarm hook %s: cannot run: %s", self.command[0], e.strerror or e)
            return
        self._proc = proc
        try:
            _, stderr = proc.communicate(json.dumps(alarm).encode(), timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.failures += 1
            log.error("alarm hook %s: killed after %g s (alarm %s)", self.command[0],
                      self.timeout_s, alarm.get("id"))
            return
        finally:
            self._proc = None
        if proc.returncode != 0:
            self.failures += 1
            err = stderr.decode(errors="replace").strip().splitlines()
            log.error("alarm hook %s: exit status %d for alarm %s%s", self.command[0],
                      proc.returncode, alarm.get("id"), f": {err[-1]}" if err else "")
        else:
            log.info("alarm hook %s ran for alarm %s", self.command[0], alarm.get("id"))

    def stop(self, grace_s: float = 2.0) -> None:
        """Drop what is queued; give a running command `grace_s`, then kill it (a stopping
        daemon must not wait out a hook that hangs)."""
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
            proc.kill()
        self._thread.join(5)
