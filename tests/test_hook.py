"""The alarm hook runner on real subprocesses: a hook whose child outlives it, and a flood
of stderr."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from monitor.daemon.hook import STDERR_TAIL, HookRunner


def wait_until(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_child_that_outlives_the_hook_is_killed_and_later_hooks_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The attack: the command leaves a child holding stderr; the runner used to wait on that
    # pipe for good after killing the command, and every later alarm's hook waited behind it.
    pids = tmp_path / "pids"
    ran = tmp_path / "ran"
    script = (f'if [ "$PBF_ALARM_ID" = 1 ]; then sleep 100000 & echo $! >> {pids}; '
              f'echo "wedged" >&2; sleep 100000; fi; echo "$PBF_ALARM_ID" >> {ran}')
    runner = HookRunner(["sh", "-c", script], timeout_s=1.0)
    runner.start()
    try:
        with caplog.at_level(logging.ERROR, logger="monitor.daemon.hook"):
            for i in (1, 2, 3):
                runner.submit({"id": i})
            wait_until(lambda: ran.exists() and ran.read_text().split() == ["2", "3"])
        assert runner.alive and runner.runs == 3 and runner.failures == 1
        assert "killed its process group: wedged" in caplog.text
        # The background child of the first hook is gone with its group.
        pid = int(pids.read_text().split()[0])
        wait_until(lambda: not Path(f"/proc/{pid}").exists()
                   or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z")
    finally:
        runner.stop()
    assert not runner.alive


def test_stderr_flood_keeps_a_bounded_tail(tmp_path: Path) -> None:
    """A hook writing 512 MB of stderr: the runner keeps its last 4 KB, and the peak memory
    of the process running it stays small (it read the whole stream into memory before)."""
    flood = [sys.executable, "-c",
             "import sys\nb = b'x' * (1 << 20)\nfor _ in range(512): sys.stderr.buffer.write(b)\n"
             "sys.stderr.write('the last line\\n'); sys.exit(3)"]
    probe = tmp_path / "probe.py"
    probe.write_text(f"""
import json, logging, resource, sys, time
from monitor.daemon.hook import HookRunner
logging.basicConfig(level=logging.ERROR, stream=sys.stdout, format="%(message)s")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = HookRunner({json.dumps(flood)}, timeout_s=120)
r.start(); r.submit({{"id": 7}})
while r.finished < 1:
    time.sleep(0.05)
r.stop()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"failures": r.failures, "peak_kb": after, "before_kb": before}}))
""")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True,
                         env=env, timeout=300, check=True).stdout
    log_line, result_line = out.strip().splitlines()[-2:]
    result = json.loads(result_line)
    print(result)
    assert result["failures"] == 1
    assert "exit status 3 for alarm 7: " in log_line and log_line.endswith("xthe last line")
    # 512 MB went through; what the process grew by is a few pipe buffers, not the stream.
    assert result["peak_kb"] - result["before_kb"] < 64 * 1024, result
    assert STDERR_TAIL == 4096


def test_hook_gets_the_alarm_on_stdin_and_env(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    script = ("import json, os, sys; a = json.load(sys.stdin); "
              "a['env'] = os.environ['PBF_ALARM_BUILD']; "
              f"open({str(out)!r}, 'w').write(json.dumps(a))")
    runner = HookRunner([sys.executable, "-c", script], timeout_s=30)
    runner.start()
    try:
        runner.submit({"id": 5, "build": "B7"})
        wait_until(lambda: out.exists() and out.stat().st_size > 0)
        wait_until(lambda: runner.finished == 1)
    finally:
        runner.stop()
    assert json.loads(out.read_text()) == {"id": 5, "build": "B7", "env": "B7"}
    assert runner.failures == 0
