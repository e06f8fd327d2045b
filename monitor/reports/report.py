"""Per-build layer reports from the database, as JSON, CSV or a terminal table."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from rich.markup import escape
from rich.table import Table
from sqlalchemy.orm import Session

from monitor.errors import MonitorError
from monitor.store import queries
from monitor.store.schema import Layer
from monitor.vision.stats import NO_DEFECT

_MARKDOWN = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$:])")


def markdown_text(text: str) -> str:
    """A name shown literally in Markdown (Streamlit's, which also reads $math$ and :colour[]):
    a build called ``[click](javascript:...)`` is text, not a link."""
    return _MARKDOWN.sub(r"\\\1", text)


def parse_layers(text: str) -> range:
    """--layers A:B (inclusive of both; either may be omitted) -> a range of layer numbers."""
    a, sep, b = text.partition(":")
    try:
        lo = int(a) if a.strip() else 0
        hi = int(b) if b.strip() else 2**31 - 1
        if not sep:
            hi = lo
    except ValueError:
        raise MonitorError(f"--layers {text!r}: expected A:B, A: or :B (layer numbers)") from None
    if hi < lo:
        raise MonitorError(f"--layers {text!r}: the range is empty")
    return range(lo, hi + 1)


def build_report(s: Session, build: str, *, printer: str | None = None,
                 layers: range | None = None) -> dict[str, Any]:
    """``{"build", "layers": [{"layer", "status", "error", "classes", ...}], "alarms",
    "tracks"}``, one entry per layer (in `layers` when given)."""
    rows = queries.build_layers(s, build, printer=printer)
    if not rows:
        names = [b["build"] for b in queries.list_builds(s)]
        known = ", ".join(names[-10:]) or "none yet"
        raise MonitorError(f"no build named {build!r} in the database (known: {known})")
    bid = rows[0].build_id
    if layers is not None:
        rows = [r for r in rows if r.layer in layers]
    span = layers or range(-(2**31), 2**31)
    return {
        "build": build,
        "printer": printer if printer is not None else "",
        "build_id": bid,
        "layers": [layer_entry(row) for row in rows],
        "alarms": [
            {"id": a.id, "layer": a.layer, "class": a.class_name, "rule": a.rule,
             "severity": a.severity, "state": a.state, "value": a.value,
             "threshold": a.threshold, "opened_at": a.opened_at, "acked_at": a.acked_at,
             "cleared_at": a.cleared_at, "cleared_layer": a.cleared_layer, "track": a.track,
             "part": a.part, "unit": a.unit,
             "position_mm": (None if a.position_x_mm is None or a.position_y_mm is None
                             else [a.position_x_mm, a.position_y_mm]),
             "url": a.url, "model_trusted": a.model_trusted, "verdict": a.verdict,
             "verdict_note": a.verdict_note, "verdict_at": a.verdict_at}
            for a, _, _ in reversed(queries.list_alarms(s, build_id=bid)) if a.layer in span
        ],
        "tracks": [
            {"number": t.number, "class": t.class_name, "first_layer": t.first_layer,
             "last_layer": t.last_layer, "layers": t.layers, "volume_mm3": t.volume_mm3,
             "max_area_mm2": t.max_area_mm2, "bbox": [t.x0, t.y0, t.x1, t.y1],
             "alarmed": t.alarmed, "ended": t.ended}
            for t in queries.build_tracks(s, bid)
            if t.last_layer >= span.start and t.first_layer < span.stop
        ],
    }


def layer_entry(row: Layer) -> dict[str, Any]:
    """One layer as reports and the state endpoint show it."""
    entry: dict[str, Any] = {
        "layer": row.layer,
        "status": row.status,
        "error": row.error,
        "classes": {c.class_name: c.summary() for c in row.classes},
        "image": row.image_path,
        "image_sha256": row.image_sha256,
        "width": row.width,
        "height": row.height,
        "model_sha256": row.model_sha256,
        "processed_at": row.processed_at,
        "latency_ms": row.total_ms,
        "infer_ms": row.infer_ms,
        "versions": row.versions,
    }
    if row.regions:
        regions: dict[str, dict[str, Any]] = {}
        for r in row.regions:
            regions.setdefault(r.region, {})[r.class_name] = r.summary()
        entry["regions"] = regions
    if row.parts:
        entry["parts"] = [p.record().summary() for p in row.parts]
    return entry


def class_names(report: dict[str, Any]) -> list[str]:
    """Classes in the order the model gave them, from the first layer that has statistics."""
    for layer in report["layers"]:
        if layer["classes"]:
            return list(layer["classes"])
    return []


_CSV_METRICS = ("area_fraction", "area_mm2", "components", "largest_component_px")
_CSV_PART_METRICS = ("nominal_mm2", "printed_fraction", "excess_fraction", "centroid_shift_mm")


def part_ids(report: dict[str, Any]) -> list[int]:
    """Every nominal part id of the report's layers, in order."""
    return sorted({p["id"] for layer in report["layers"] for p in layer.get("parts", [])})


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula: text starting with = + - @, a tab or
    a carriage return gets a leading apostrophe (OWASP's advice on CSV injection). Numbers,
    negative ones included, stay numbers."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def to_csv(report: dict[str, Any]) -> str:
    """One row per layer: the class statistics, then `part<id>_<metric>` for every part of
    the build (empty where a layer has no such part or no slice)."""
    names = class_names(report)
    parts = part_ids(report)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([csv_cell(h) for h in ["build", "layer", "status", "error"]
                 + [f"{c}_{m}" for c in names for m in _CSV_METRICS]
                 + [f"part{i}_{m}" for i in parts for m in _CSV_PART_METRICS]])
    for layer in report["layers"]:
        cells = [layer["classes"].get(c, {}).get(m, "") for c in names for m in _CSV_METRICS]
        by_id = {p["id"]: p for p in layer.get("parts", [])}
        part_cells = [_cell(by_id.get(i, {}).get(m)) for i in parts for m in _CSV_PART_METRICS]
        row = [report["build"], layer["layer"], layer["status"], layer["error"] or "", *cells,
               *part_cells]
        w.writerow([csv_cell(c) for c in row])
    return buf.getvalue()


_CSV_ALARM_COLUMNS = ("id", "layer", "class", "rule", "severity", "state", "value",
                      "threshold", "unit", "part", "track", "position_mm", "cleared_layer",
                      "model_trusted", "verdict", "verdict_note", "url")


def alarms_csv(report: dict[str, Any]) -> str:
    """One row per alarm of the build, oldest first, with its verdict."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["build", *_CSV_ALARM_COLUMNS])
    for a in report["alarms"]:
        pos = a["position_mm"]
        w.writerow([report["build"], *(
            (f"{pos[0]:.2f} {pos[1]:.2f}" if pos else "") if c == "position_mm"
            else _cell(a[c]) for c in _CSV_ALARM_COLUMNS)])
    return buf.getvalue()


def verdict_stats(alarms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per rule: alarms opened, how many operators confirmed or called false, and the
    precision confirmed / (confirmed + false) (None before any verdict)."""
    rules: dict[str, dict[str, Any]] = {}
    for a in alarms:
        r = rules.setdefault(a["rule"], {"rule": a["rule"], "count": 0, "confirmed": 0,
                                         "false": 0})
        r["count"] += 1
        if a.get("verdict") == "confirmed":
            r["confirmed"] += 1
        elif a.get("verdict") == "false_alarm":
            r["false"] += 1
    for r in rules.values():
        judged = r["confirmed"] + r["false"]
        r["precision"] = round(r["confirmed"] / judged, 4) if judged else None
    return sorted(rules.values(), key=lambda r: (-r["count"], r["rule"]))


def _cell(v: Any) -> Any:
    return "" if v is None else v


def to_table(report: dict[str, Any]) -> Table:
    names = [c for c in class_names(report) if c != NO_DEFECT]
    t = Table(title=f"build {escape(report['build'])}: {len(report['layers'])} layers")
    t.add_column("layer", justify="right", no_wrap=True)
    t.add_column("status", overflow="fold")
    # fold, not an ellipsis: on a narrow terminal a class name breaks, it is never cut.
    for c in names:
        t.add_column(f"{escape(c)}\n% / n", justify="right", overflow="fold")
    for layer in report["layers"]:
        if layer["status"] != "ok":
            t.add_row(str(layer["layer"]), f"[red]error[/red] {escape(layer['error'] or '')}")
            continue
        cells = []
        for c in names:
            st = layer["classes"].get(c)
            if not st or not st["pixel_count"]:
                cells.append("-")
            else:
                cells.append(f"{100 * st['area_fraction']:.2f} / {st['components']}")
        t.add_row(str(layer["layer"]), "ok", *cells)
    return t
