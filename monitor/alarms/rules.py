"""Threshold rules on one layer: the metric, its limit (absolute, or relative to a baseline
of the build's recent layers: median and MAD over a window) and the condition.

A relative rule learns its baseline from grace and learning layers, and from layers within
its limit; a value above the limit is learnt only once it has held for a whole window.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from monitor.alarms.lifecycle import BuildState, Cond, step
from monitor.config import AlarmRule
from monitor.records import AlarmEvent, BuildKey, RuleState
from monitor.vision.stats import NO_DEFECT, LayerStats

UNITS = {"area_fraction": "fraction", "area_mm2": "mm²", "components": "count",
         "largest_component_mm2": "mm²"}


def _scope(rule: AlarmRule, stats: LayerStats, regions: Mapping[str, LayerStats],
           parts_zone: LayerStats | None = None) -> LayerStats | None:
    if rule.region:
        return regions.get(rule.region)
    if rule.scope == "parts" and parts_zone is not None and rule.class_name != NO_DEFECT:
        return parts_zone
    return stats


def largest_at(class_name: str, *stats: LayerStats | None) -> tuple[float, float] | None:
    """Centroid (x, y) in pixels of the class's largest component in the first statistics
    that list one."""
    for st in stats:
        c = st.classes.get(class_name) if st is not None else None
        if c is not None and c.component_list:
            big = max(c.component_list, key=lambda k: k.area_px)
            return (big.cx, big.cy)
    return None


def metric_value(rule: AlarmRule, stats: LayerStats, regions: Mapping[str, LayerStats],
                 parts_zone: LayerStats | None = None) -> float | None:
    """The rule's metric: in its region, else on and around the parts (scope "parts", when
    the layer has a nominal slice), else over the whole layer."""
    if rule.region:
        st = regions.get(rule.region)
    elif rule.scope == "parts" and parts_zone is not None and rule.class_name != NO_DEFECT:
        st = parts_zone
    else:
        st = stats
    if st is None:
        return None
    c = st.classes.get(rule.class_name)
    return None if c is None else float(getattr(c, rule.metric))


def relative_limit(rule: AlarmRule, history: Sequence[float]) -> float | None:
    """A relative rule's limit from its baseline window; None while it is still learning.

    limit = max(threshold, m * factor, m + min_delta, m + mad_k * 1.4826 * MAD), where m is
    the median of the window and MAD the median absolute deviation from it.
    """
    if len(history) < rule.learn_layers:
        return None
    m = statistics.median(history)
    limit = max(rule.floor, m * rule.factor, m + rule.min_delta)
    if rule.mad_k:
        mad = statistics.median(abs(v - m) for v in history)
        limit = max(limit, m + rule.mad_k * 1.4826 * mad)
    return limit


def _learn(rule: AlarmRule, rs: RuleState, value: float) -> None:
    rs.history.append(value)
    del rs.history[:-rule.window]


def check_rule(key: BuildKey, st: BuildState, rule: AlarmRule, layer: int,
               stats: LayerStats, regions: Mapping[str, LayerStats],
               parts_zone: LayerStats | None, *, grace_layers: int,
               untrusted: frozenset[str], muted: bool) -> list[AlarmEvent]:
    """One threshold rule on one layer of a build.

    Args:
        grace_layers: the build's first layers not checked (the rule's own, else the
            engine's).
        untrusted, muted: as monitor.alarms.lifecycle.step takes them.
    """
    value = metric_value(rule, stats, regions, parts_zone)
    rs = st.rules.setdefault(rule.rule_id, RuleState())
    if value is None:
        rs.streak = 0
        return []
    limit = relative_limit(rule, rs.history) if rule.relative else rule.floor
    if st.in_grace(layer, grace_layers) or limit is None:
        rs.streak = 0
        if rule.relative:  # grace layers and learning layers teach the baseline
            _learn(rule, rs, value)
        return []
    holds = value > limit
    where = largest_at(rule.class_name, _scope(rule, stats, regions, parts_zone), stats)
    events = step(key, st, layer, Cond(
        rule.rule_id, rule.class_name, rule.severity, value, limit, holds,
        rule.consecutive, rule.cooldown_layers, unit=UNITS[rule.metric],
        position_px=where if rule.class_name != NO_DEFECT else None),
        untrusted=untrusted, muted=muted)
    # A value above the limit is not learnt (a defect must not raise its own baseline)
    # unless it has held for a whole window: then it is the build's new normal.
    if rule.relative and (not holds or rs.streak >= rule.window):
        _learn(rule, rs, value)
    return events
