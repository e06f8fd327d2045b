"""The state endpoint's commands (control thread): state, ack, verdict, mute, unmute,
mark-good, test-alarm.

State is read from the database; acks and mutes go to the analyser, the alarm engine's owner,
as requests on its queue; verdicts and good builds (which change no alarm state) and test
alarms go straight to the committer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.daemon.analyser import Analyser
from monitor.daemon.committer import Committer
from monitor.daemon.items import Ack, Mute
from monitor.daemon.publisher import alarm_message
from monitor.errors import MonitorError
from monitor.store import queries


class Requests:
    """Answers requests on the state endpoint; MonitorError -> ok: false."""

    def __init__(self, *, printer: str, reader: Engine, analyser: Analyser,
                 committer: Committer, health: Callable[[], dict[str, Any]],
                 active_s: float) -> None:
        self.printer = printer  # the default for requests that name none
        self.reader = reader
        self.analyser = analyser
        self.committer = committer
        self.health = health
        self.active_s = active_s

    def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        try:
            if cmd == "state":
                return self.state()
            if cmd == "ack":
                return self.analyser.ask(Ack(int(req["id"])))
            if cmd == "verdict":  # fields checked by control.validate_request
                return self.committer.verdict(int(req["id"]), str(req["verdict"]),
                                              req.get("note") or None)
            if cmd in ("mute", "unmute"):
                return self.analyser.ask(Mute(
                    str(req.get("printer", self.printer)), str(req["build"]),
                    req.get("class") or None, mute=cmd == "mute"))
            if cmd == "mark-good":  # no alarm state: straight to the committer
                printer = req.get("printer")
                return self.committer.mark_good(
                    None if printer is None else str(printer), str(req["build"]),
                    req.get("note") or None, good=bool(req.get("good", True)))
            if cmd == "test-alarm":
                return self.committer.test_alarm(self.printer,
                                                 str(req.get("severity", "warning")),
                                                 bool(req.get("hook", False)))
        except MonitorError as e:
            return {"ok": False, "error": str(e)}
        except (KeyError, ValueError, TypeError) as e:
            return {"ok": False, "error": f"bad request {req!r}: {e!r}"}
        return {"ok": False, "error": f"unknown cmd {cmd!r} (state, ack, verdict, mute, "
                                      f"unmute, mark-good, test-alarm)"}

    def state(self) -> dict[str, Any]:
        """Open alarms and the last layer of each active build, with the seq they reflect:
        a subscriber that connected first and asks this is consistent from seq + 1 on."""
        from monitor.reports.report import layer_entry

        since = time.time() - self.active_s
        with Session(self.reader) as s, s.begin():
            seq = queries.last_seq(s)
            alarms = [alarm_message(a) for a in queries.alarm_records(s, open_only=True)]
            builds = []
            for printer, build in queries.active_builds(s, since):
                bid = queries.build_id_of(s, printer, build)
                row = queries.last_layer(s, bid) if bid is not None else None
                if row is not None:
                    builds.append({"printer": printer, "build": build,
                                   "last_layer": layer_entry(row)})
        return {"seq": seq, "open_alarms": alarms, "builds": builds, "health": self.health()}
