"""Commit and outbox: a layer (or alarm transitions, an ack, a mute, a test alarm) is stored
with its outgoing messages in one transaction on the writer thread, then handed to the
publisher and, for alarms that opened, the hook. Called by the analyser (and, for verdicts,
builds marked good and test alarms, the control thread); the work itself runs on the writer
thread.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from monitor.daemon import failpoints
from monitor.daemon.hook import HookRunner
from monitor.daemon.metrics import Metrics
from monitor.daemon.publisher import alarm_message, layer_message
from monitor.daemon.sinks import Sink
from monitor.errors import MonitorError, StoreError
from monitor.records import AlarmEvent, GoodBuild, LayerAlarms, LayerRecord, Outgoing
from monitor.store import queries, writes
from monitor.store.writer import StoreWriter

log = logging.getLogger(__name__)
T = TypeVar("T")
Message = tuple[str, dict[str, Any]]


class Committer:
    """Turns records into transactions and their messages; owns no thread of its own."""

    def __init__(self, *, writer: StoreWriter, publisher: Sink, hook: HookRunner | None,
                 metrics: Metrics, max_components: int, hook_severities: Sequence[str]) -> None:
        self.writer = writer
        self.publisher = publisher
        self.hook = hook
        self.metrics = metrics
        self.max_components = max_components
        self.hook_severities = tuple(hook_severities)

    def layer(self, rec: LayerRecord, events: list[AlarmEvent],
              verdict: LayerAlarms | None = None) -> None:
        """Store a layer with its alarm state, tracks and messages in one transaction."""
        events = events + (verdict.events if verdict else [])
        tracks = verdict.tracks if verdict else None

        def job(s: Session) -> list[Outgoing]:
            build_id, replaced = writes.put_layer(
                s, rec, max_components=self.max_components,
                tracks=tracks.assignments if tracks else None)
            if verdict is not None and verdict.evaluated:
                writes.set_evaluated(s, build_id, first_layer=verdict.first_layer,
                                     layer=rec.layer)
                writes.put_rule_states(s, build_id, verdict.rule_states)
                if tracks is not None:
                    writes.put_tracks(s, build_id, [*tracks.touched, *tracks.ended])
            msgs: list[Message] = [("layer", layer_message(rec, replaced=replaced))]
            msgs += _alarm_messages(s, build_id, events, rec.processed_at)
            out = writes.put_outbox(s, msgs)
            failpoints.reach("write")
            return out

        def fallback(s: Session, error: Exception) -> list[Outgoing]:
            """The layer could not be stored as it is: store that, so it is not lost."""
            failed = dataclasses.replace(
                rec, status="error", stats=None, regions=None,
                error=f"could not store the layer's results: {error!r}"[:2000])
            _, replaced = writes.put_layer(s, failed)
            return writes.put_outbox(s, [("layer", layer_message(failed, replaced=replaced))])

        self.writer.submit(job, self._published, fallback=fallback)

    def events(self, events: list[AlarmEvent]) -> None:
        """Alarm transitions without a layer (stalls)."""
        if not events:
            return
        now = time.time()

        def job(s: Session) -> list[Outgoing]:
            msgs: list[Message] = []
            for ev in events:
                bid = queries.build_id_of(s, ev.printer, ev.build)
                if bid is not None:
                    msgs += _alarm_messages(s, bid, [ev], now)
            return writes.put_outbox(s, msgs)

        self.writer.submit(job, self._published)

    def ack(self, alarm_id: int, rule_state: dict[str, Any] | None,
            reply: Future[dict[str, Any]]) -> None:
        """open -> acknowledged with the rule's new state, then the reply (or its error)."""

        def job(s: Session) -> list[Outgoing]:
            rec = writes.acknowledge_alarm(s, alarm_id, time.time())
            if rule_state is not None:
                bid = queries.build_id_of(s, rec.printer, rec.build)
                assert bid is not None  # the alarm's build
                writes.put_rule_states(s, bid, {rec.rule: rule_state})
            return writes.put_outbox(s, [("alarm", alarm_message(rec))])

        def done(out: list[Outgoing]) -> dict[str, Any]:
            self.publisher.publish(out)
            log.info("alarm %d acknowledged", alarm_id)
            return {"alarm": {**out[0].payload, "seq": out[0].seq}}

        self._reply(job, done, reply)

    def verdict(self, alarm_id: int, verdict: str, note: str | None) -> dict[str, Any]:
        """An operator's verdict on an alarm, stored and published (control thread: waits
        for the commit)."""
        reply: Future[dict[str, Any]] = Future()

        def job(s: Session) -> list[Outgoing]:
            rec = writes.set_verdict(s, alarm_id, verdict, note, time.time())
            return writes.put_outbox(s, [("alarm", alarm_message(rec))])

        def done(out: list[Outgoing]) -> dict[str, Any]:
            self.publisher.publish(out)
            log.info("alarm %d: verdict %s", alarm_id, verdict)
            return {"alarm": {**out[0].payload, "seq": out[0].seq}}

        self._reply(job, done, reply)
        return wait(reply)

    def mute(self, printer: str, build: str, class_name: str | None, *, mute: bool,
             reply: Future[dict[str, Any]]) -> None:
        def job(s: Session) -> None:
            if mute:
                writes.add_mute(s, printer, build, class_name, time.time())
            else:
                writes.remove_mutes(s, printer, build, class_name)

        def done(_: None) -> dict[str, Any]:
            log.info("%s build %s%s", "muted" if mute else "unmuted", build,
                     f" class {class_name}" if class_name else "")
            return {"build": build, "printer": printer, "class": class_name, "muted": mute}

        self._reply(job, done, reply)

    def mark_good(self, printer: str | None, build: str, note: str | None, *, good: bool
                  ) -> dict[str, Any]:
        """Mark a build good, or remove the mark (control thread: waits for the commit).
        Nothing is published: the mark is for `pbf-monitor adapt`, read from the database."""
        reply: Future[dict[str, Any]] = Future()

        def job(s: Session) -> GoodBuild | None:
            return writes.mark_good(s, printer, build, note, good)

        def done(mark: GoodBuild | None) -> dict[str, Any]:
            log.info("build %s %s", build, "marked good" if good else "no longer marked good")
            return writes.mark_good_reply(build, printer, mark)

        self._reply(job, done, reply)
        return wait(reply)

    def test_alarm(self, printer: str, severity: str, run_hook: bool) -> dict[str, Any]:
        """A test alarm, end to end (control thread: waits for the commit)."""
        from monitor.alarms.engine import RULE_TEST

        msg = {"id": 0, "printer": printer, "build": "", "layer": 0, "class": "",
               "rule": RULE_TEST, "severity": severity, "state": "open", "value": 0.0,
               "threshold": 0.0, "cleared_layer": None, "track": None, "part": None,
               "unit": "", "position_mm": None, "url": None, "model_trusted": True,
               "verdict": None, "verdict_note": None,
               "timestamp": time.time(), "test": True}
        reply: Future[dict[str, Any]] = Future()

        def done(out: list[Outgoing]) -> dict[str, Any]:
            self.publisher.publish(out)
            if run_hook and self.hook is not None:
                self.hook.submit({**msg, "seq": out[0].seq})
            return {"alarm": {**msg, "seq": out[0].seq},
                    "hook": run_hook and self.hook is not None}

        self._reply(lambda s: writes.put_outbox(s, [("alarm", msg)]), done, reply)
        return wait(reply)

    def _reply(self, job: Callable[[Session], T], done: Callable[[T], dict[str, Any]],
               reply: Future[dict[str, Any]]) -> None:
        """Run job on the writer thread, then done(result) into reply; a StoreError (raised
        before anything was written) goes into the reply as the request's error."""

        def wrapped(s: Session) -> tuple[bool, Any]:
            try:
                return True, job(s)
            except StoreError as e:
                return False, e

        def finish(result: tuple[bool, Any]) -> None:
            ok, value = result
            try:
                reply.set_result(done(value)) if ok else reply.set_exception(value)
            except Exception as e:
                reply.set_exception(e)

        self.writer.submit(wrapped, finish)

    def _published(self, out: list[Outgoing]) -> None:
        """After the commit: publish, and run the hook for alarms that opened."""
        failpoints.reach("publish")
        self.publisher.publish(out)
        for m in out:
            if m.topic == "alarm" and m.payload.get("state") == "open":
                self.metrics.alarms.labels(m.payload.get("class") or "",
                                           m.payload.get("severity", "")).inc()
        if self.hook is not None:
            for m in out:
                # Alarms of weights not adapted to this camera never run the hook.
                if (m.topic == "alarm" and m.payload.get("state") == "open"
                        and m.payload.get("severity") in self.hook_severities
                        and m.payload.get("model_trusted", True)):
                    self.hook.submit({**m.payload, "seq": m.seq})


def wait(reply: Future[dict[str, Any]], timeout: float = 30.0) -> dict[str, Any]:
    """The reply to a request; MonitorError if it failed or the daemon did not answer."""
    try:
        return reply.result(timeout)
    except TimeoutError as e:
        raise MonitorError(f"the daemon did not answer within {timeout:g} s (database "
                           f"writes failing?)") from e


def _alarm_messages(s: Session, build_id: int, events: list[AlarmEvent], now: float
                    ) -> list[Message]:
    return [("alarm", alarm_message(rec))
            for ev in events for rec in writes.apply_alarm(s, build_id, ev, now)]



