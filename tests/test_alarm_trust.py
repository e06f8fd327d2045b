"""Trust in the model, verdicts and what alarms point at, on the real daemon (watchdog,
SQLite, ZeroMQ, a real model, a real hook process)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from monitor.cli import main
from monitor.daemon.control import ControlError, request
from monitor.vision.model import read_info, set_adapted_cameras
from tests.test_alarm_daemon import Rig, bright_weights, rig  # noqa: F401 (fixtures)

RULE_TAIL = 'severity = "critical", consecutive = 1'
BOX = (20, 30, 10, 10)  # swelling of 1 mm² centred at (24.5, 34.5) px = (2.45, 3.45) mm


def rules(tmp: Path, extra: str = "") -> tuple[str, Path]:
    """A critical absolute rule on swelling, a hook that appends each alarm to a file."""
    out = tmp / "hook.jsonl"
    script = ("import json, sys; a = json.load(sys.stdin); "
              f"open({str(out)!r}, 'a').write(json.dumps(a) + '\\n')")
    return f"""
[alarms]
grace_layers = 0
dashboard_url = "http://dash.example:8501/"
{extra}
rules = [{{ class = "swelling", metric = "area_mm2", threshold = 0.5, {RULE_TAIL} }}]
[alarms.tracks]
classes = []
[alarms.stall]
enabled = false
[alarms.hook]
command = {json.dumps([sys.executable, '-c', script])}
""", out


def hook_lines(out: Path, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while not out.exists() or out.read_text().count("\n") < n:
        assert time.monotonic() < deadline, "the hook did not run"
        time.sleep(0.05)
    return [json.loads(x) for x in out.read_text().splitlines()]


def test_unadapted_weights_cap_class_alarms_and_skip_the_hook(
        rig: Callable[..., Rig], tmp_path: Path) -> None:  # noqa: F811
    body, hook_out = rules(tmp_path)
    r = rig(body)
    health = request(r.state, {"cmd": "state"})["health"]
    assert health["model_trusted"] is False
    assert "[camera] id is not set" in health["model_trust_reason"]
    beats = [p for t, p in r.listener.messages if t == "heartbeat"]  # type: ignore[union-attr]
    assert beats and beats[-1]["model_trusted"] is False
    r.write(1, BOX)
    r.listener.wait(lambda: r.alarms())  # type: ignore[union-attr]
    a = r.alarms()[0]
    assert (a["severity"], a["model_trusted"]) == ("warning", False)  # capped
    assert a["unit"] == "mm²" and a["value"] == pytest.approx(1.0)
    assert a["position_mm"] == pytest.approx([2.45, 3.45], abs=0.06)
    assert a["url"] == "http://dash.example:8501/?build=B1&layer=1"
    # the hook runs for a test alarm, so it works: it just was not run for the capped one
    request(r.state, {"cmd": "test-alarm", "severity": "critical", "hook": True})
    ran = hook_lines(hook_out, 1)
    assert [x["rule"] for x in ran] == ["test"]


@pytest.mark.parametrize("how", ["override", "adapted"])
def test_trusted_weights_keep_severity_and_run_the_hook(
        rig: Callable[..., Rig], tmp_path: Path, bright_weights: Path,  # noqa: F811
        how: str) -> None:
    extra = "trust_unadapted = true" if how == "override" else ""
    body, hook_out = rules(tmp_path, extra)
    if how == "adapted":
        weights = tmp_path / "adapted.safetensors"
        shutil.copy(bright_weights, weights)
        set_adapted_cameras(weights, ["cam-7"])
        assert read_info(weights).adapted_cameras == ("cam-7",)
        body = body.replace(str(bright_weights), str(weights))
        r = Rig(tmp_path, weights, body + "\n[camera]\nid = \"cam-7\"\n")
        r.start()
    else:
        r = rig(body)
    try:
        assert request(r.state, {"cmd": "state"})["health"]["model_trusted"] is True
        r.write(1, BOX)
        r.listener.wait(lambda: r.alarms())  # type: ignore[union-attr]
        a = r.alarms()[0]
        assert (a["severity"], a["model_trusted"]) == ("critical", True)
        assert [x["rule"] for x in hook_lines(hook_out, 1)] == ["swelling.area_mm2"]
    finally:
        if how == "adapted":
            r.stop()


def test_verdict_end_to_end(rig: Callable[..., Rig], tmp_path: Path) -> None:  # noqa: F811
    body, _ = rules(tmp_path)
    r = rig(body)
    r.write(1, BOX)
    r.write(2, BOX)
    r.write(3)  # clears
    r.write(4, BOX)  # cooldown: no second alarm
    r.listener.wait(lambda: r.alarms())  # type: ignore[union-attr]
    alarm_id = r.alarms()[0]["id"]
    for bad, why in (({"id": True}, "'id' must"), ({"id": "1"}, "'id' must"),
                     ({"id": -1}, "'id' must"), ({"id": 2**70}, "'id' must"),
                     ({"id": alarm_id, "verdict": "maybe"}, "'verdict' must"),
                     ({"id": alarm_id, "note": "x" * 3000}, "'note' must"),
                     ({"id": 999}, "no alarm with id 999")):
        with pytest.raises(ControlError, match=why):
            request(r.state, {"cmd": "verdict", "verdict": "confirmed", **bad})
    res = CliRunner().invoke(main, ["verdict", str(alarm_id), "false_alarm", "--note",
                                    "powder streak, not swelling", "--config", str(r.config)])
    assert res.exit_code == 0, res.output
    assert f"alarm {alarm_id} marked false_alarm" in res.output
    r.listener.wait(lambda: any(a.get("verdict") for a in r.alarms()))  # type: ignore[union-attr]
    msg = [a for a in r.alarms() if a.get("verdict")][-1]
    assert (msg["id"], msg["verdict"], msg["verdict_note"]) == (
        alarm_id, "false_alarm", "powder streak, not swelling")
    cli = CliRunner()
    js = cli.invoke(main, ["report", "B1", "--format", "json", "--config", str(r.config)])
    assert js.exit_code == 0, js.output
    rep = json.loads(js.output)["alarms"][0]
    assert (rep["verdict"], rep["unit"], rep["model_trusted"]) == ("false_alarm", "mm²", False)
    csv = cli.invoke(main, ["report", "B1", "--format", "alarms-csv", "--config",
                            str(r.config)])
    assert csv.exit_code == 0, csv.output
    head, row = csv.output.splitlines()[:2]
    assert "verdict" in head.split(",") and "false_alarm" in row and "mm²" in row
    html = tmp_path / "r.html"
    out = cli.invoke(main, ["report", "B1", "--format", "html", "--out", str(html),
                            "--config", str(r.config)])
    assert out.exit_code == 0, out.output
    assert "false_alarm: powder streak, not swelling" in html.read_text()
    stats = cli.invoke(main, ["alarms", "--stats", "--json", "--config", str(r.config)])
    assert stats.exit_code == 0, stats.output
    assert [json.loads(x) for x in stats.output.splitlines()] == [
        {"rule": "swelling.area_mm2", "count": 1, "confirmed": 0, "false": 1,
         "precision": 0.0}]
    table = cli.invoke(main, ["alarms", "--stats", "--config", str(r.config)])
    assert table.exit_code == 0 and "precision" in table.output, table.output
