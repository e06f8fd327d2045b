"""Part alarms: a nominal part missing, or printed past its outline, per part.

Each part has its own rules (``part_missing.part7``, ``part_excess.part7``) with the
lifecycle of threshold rules; a part that is not in a layer's slice clears its alarms.
"""

from __future__ import annotations

from collections.abc import Sequence

from monitor.alarms.lifecycle import BuildState, Cond, step
from monitor.config import PartAlarmsConfig
from monitor.records import AlarmEvent, BuildKey, PartRecord, RuleState

PART_MISSING = "part_missing"
PART_EXCESS = "part_excess"
PART_RULES = (PART_MISSING, PART_EXCESS)


def part_rule_id(kind: str, part: int) -> str:
    """The rule id of a part alarm, e.g. part_missing.part7 (its state is kept under it)."""
    return f"{kind}.part{part}"


def part_of(rule_id: str) -> tuple[str, int] | None:
    """(kind, part) of a part alarm's rule id; None for other rules."""
    kind, sep, rest = rule_id.partition(".part")
    if not sep or kind not in PART_RULES or not rest.isdigit():
        return None
    return kind, int(rest)


def check_parts(key: BuildKey, st: BuildState, layer: int, parts: Sequence[PartRecord],
                touched: list[str], *, cfg: PartAlarmsConfig, grace_layers: int,
                untrusted: frozenset[str], muted: bool) -> list[AlarmEvent]:
    """part_missing and part_excess for each part of the layer's slice. A part that is
    not in this layer's slice (it ended, or has not begun) clears its alarms.

    Args:
        touched: gets the rule ids whose state changed (to persist).
        grace_layers: the build's first layers not checked.
        untrusted, muted: as monitor.alarms.lifecycle.step takes them.
    """
    events: list[AlarmEvent] = []
    in_grace = st.in_grace(layer, grace_layers)
    present = {p.id for p in parts}
    for p in parts:
        missing = p.printed_fraction < cfg.missing_fraction and p.width_px >= cfg.min_width_px
        for c in (
            Cond(part_rule_id(PART_MISSING, p.id), "", cfg.missing_severity,
                 p.printed_fraction, cfg.missing_fraction, missing, cfg.missing_layers,
                 cfg.cooldown_layers, p.id, unit="fraction"),
            Cond(part_rule_id(PART_EXCESS, p.id), "", cfg.excess_severity,
                 p.excess_fraction, cfg.excess_fraction,
                 p.excess_fraction > cfg.excess_fraction, cfg.excess_layers,
                 cfg.cooldown_layers, p.id, unit="fraction"),
        ):
            touched.append(c.rule_id)
            if in_grace:
                st.rules.setdefault(c.rule_id, RuleState()).streak = 0
            else:
                events += step(key, st, layer, c, untrusted=untrusted, muted=muted)
    for rule_id, rs in list(st.rules.items()):
        which = part_of(rule_id)
        if which is None or which[1] in present or not (rs.streak or rs.active):
            continue
        touched.append(rule_id)
        kind, pid = which
        limit = cfg.missing_fraction if kind == PART_MISSING else cfg.excess_fraction
        sev = cfg.missing_severity if kind == PART_MISSING else cfg.excess_severity
        events += step(key, st, layer, Cond(rule_id, "", sev, 0.0, limit, False, 1, 0, pid,
                                            unit="fraction"),
                       untrusted=untrusted, muted=muted)
    return events
