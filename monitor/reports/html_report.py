"""A self-contained HTML report of one build: summary, plots, heatmaps, tracks, worst layers,
alarms and regions, with every image embedded (one file to mail or archive with the part).

Plots are drawn with matplotlib (Agg) from the database alone: statistics, tracks, alarms
and the stored per-layer defect maps and thumbnails (monitor.reports.maps); the original camera
images are not needed.
"""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import cv2
import jinja2
import numpy as np
from sqlalchemy.orm import Session

from monitor.reports.maps import decode_masks, decode_thumb
from monitor.reports.report import build_report, class_names
from monitor.store import queries
from monitor.store.schema import LayerMap
from monitor.vision.imaging import CLASS_COLOURS, overlay
from monitor.vision.stats import NO_DEFECT

WORST_LAYERS = 6


def _rgb(name: str) -> tuple[float, float, float]:
    b, g, r = CLASS_COLOURS.get(name, (128, 128, 128))
    return (r / 255, g / 255, b / 255)


def _figure(w: float, h: float) -> tuple[Any, Any]:
    """A figure and its axes without pyplot: no global backend state, safe in any thread
    (the dashboard draws from Streamlit's)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    return fig, fig.subplots()


def _integer_layers(ax: Any) -> None:
    """Layers are whole numbers: no tick at layer 1.5."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _png_array(bgr: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", bgr)
    assert ok
    return base64.b64encode(buf.tobytes()).decode()


def area_plot(report: dict[str, Any], defects: list[str]) -> str | None:
    ok = [r for r in report["layers"] if r["status"] == "ok"]
    if not ok:
        return None
    fig, ax = _figure(10, 3.6)
    xs = [r["layer"] for r in ok]
    for c in defects:
        ax.plot(xs, [r["classes"].get(c, {}).get("area_mm2", 0.0) for r in ok], label=c,
                color=_rgb(c), linewidth=1.5)
    for r in report["layers"]:
        if r["status"] != "ok":
            ax.axvline(r["layer"], color="red", alpha=0.3, linewidth=1)
    ax.set_xlabel("layer")
    _integer_layers(ax)
    ax.set_ylabel("defect area (mm²)")
    ax.grid(alpha=0.3)
    # Above the axes: inside, it hid the line of the largest class.
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), fontsize=8, ncol=len(defects),
              frameon=False)
    return _png(fig)


def alarm_plot(report: dict[str, Any], last_layer: int) -> str | None:
    alarms = report["alarms"]
    if not alarms:
        return None
    rules = sorted({a["rule"] for a in alarms})
    fig, ax = _figure(10, 0.5 + 0.35 * len(rules))
    for a in alarms:
        y = rules.index(a["rule"])
        end = a["cleared_layer"] if a["cleared_layer"] is not None else last_layer
        colour = "#c0392b" if a["severity"] == "critical" else "#e6a100"
        ax.plot([a["layer"], max(end, a["layer"])], [y, y], color=colour, linewidth=6,
                solid_capstyle="butt")
        ax.plot([a["layer"]], [y], marker="o", color=colour)
    ax.set_yticks(range(len(rules)), rules, fontsize=8)
    ax.set_xlabel("layer (bar: open until cleared; red critical, amber warning)")
    _integer_layers(ax)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def track_plot(report: dict[str, Any]) -> str | None:
    tracks = [t for t in report["tracks"] if t["layers"] >= 2]
    if not tracks:
        return None
    tracks.sort(key=lambda t: (t["first_layer"], t["number"]))
    tracks = tracks[:60]
    fig, ax = _figure(10, 0.6 + 0.22 * len(tracks))
    for i, t in enumerate(tracks):
        ax.barh(i, t["last_layer"] - t["first_layer"] + 1, left=t["first_layer"],
                color=_rgb(t["class"]), edgecolor="black" if t["alarmed"] else "none",
                linewidth=1.5)
    ax.set_yticks(range(len(tracks)),
                  [f"#{t['number']} {t['class']}" for t in tracks], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("layer (black outline: raised an alarm)")
    _integer_layers(ax)
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def heatmaps(maps: dict[int, LayerMap], defects: list[str]) -> list[dict[str, Any]]:
    """Per defect class, in how many layers each spot of the bed was defective; ``empty``
    when no layer held it (drawn black on a 0..1 scale, not a blank colour map)."""
    from matplotlib.ticker import MaxNLocator

    if not maps:
        return []
    classes = json.loads(next(iter(maps.values())).classes)
    decoded = [decode_masks(m.mask_png, len(classes)) for m in maps.values()]
    shape = Counter(d.shape for d in decoded).most_common(1)[0][0]
    counts = np.sum([d for d in decoded if d.shape == shape], axis=0)
    out = []
    for c in defects:
        if c not in classes:
            continue
        heat = counts[classes.index(c)]
        top = int(heat.max())
        fig, ax = _figure(3.6, 3.6 * shape[1] / max(shape[2], 1))
        # vmin 0: a class found nowhere is black, not matplotlib's mid colour on -0.1..0.1.
        im = ax.imshow(heat, cmap="magma", interpolation="nearest", vmin=0, vmax=max(top, 1))
        ax.set_title(f"{c}: max {top} layers" if top else f"{c}: in no layer", fontsize=9)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, ticks=MaxNLocator(integer=True))
        out.append({"name": c, "png": _png(fig), "empty": top == 0})
    return out


def _worst_layers(report: dict[str, Any], maps: dict[int, LayerMap],
                  defects: list[str]) -> list[dict[str, Any]]:
    areas = [(sum(r["classes"].get(c, {}).get("area_mm2", 0.0) for c in defects), r)
             for r in report["layers"] if r["status"] == "ok"]
    ranked = sorted(areas, key=lambda a: -a[0])
    out = []
    for area, r in ranked[:WORST_LAYERS]:
        if area <= 0:
            break
        m = maps.get(r["layer"])
        img = None
        if m is not None:
            classes = json.loads(m.classes)
            img = _png_array(overlay(decode_thumb(m.thumb_jpeg),
                                     decode_masks(m.mask_png, len(classes)), classes))
        found = ", ".join(f"{c} {r['classes'][c]['area_mm2']:.2f} mm²" for c in defects
                          if r["classes"].get(c, {}).get("area_mm2"))
        out.append({"layer": r["layer"], "area": area, "found": found, "png": img})
    return out


def _regions(report: dict[str, Any], defects: list[str]) -> list[dict[str, Any]]:
    table: dict[tuple[str, str], dict[str, float]] = {}
    for r in report["layers"]:
        for region, classes in (r.get("regions") or {}).items():
            for c in defects:
                st = classes.get(c)
                if not st:
                    continue
                row = table.setdefault((region, c), {"area": 0.0, "layers": 0, "max": 0.0})
                row["area"] += st["area_mm2"]
                row["layers"] += 1 if st["pixel_count"] else 0
                row["max"] = max(row["max"], st["area_fraction"])
    return [{"region": k[0], "class": k[1], **v} for k, v in sorted(table.items())]


def parts_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per nominal part: nominal area (largest layer), min/mean printed fraction, max
    excess, and its alarms."""
    table: dict[int, dict[str, Any]] = {}
    for r in report["layers"]:
        for p in r.get("parts", []):
            row = table.setdefault(p["id"], {"part": p["id"], "nominal_mm2": 0.0,
                                             "fractions": [], "max_excess": 0.0,
                                             "layers": 0, "alarms": []})
            row["nominal_mm2"] = max(row["nominal_mm2"], p["nominal_mm2"])
            row["fractions"].append(p["printed_fraction"])
            row["max_excess"] = max(row["max_excess"], p["excess_fraction"])
            row["layers"] += 1
    for a in report["alarms"]:
        if a.get("part") in table:
            table[a["part"]]["alarms"].append(f"{a['rule'].split('.')[0]} @{a['layer']} "
                                              f"({a['state']})")
    out = []
    for pid in sorted(table):
        row = table[pid]
        fr = row.pop("fractions")
        out.append({**row, "min_printed": min(fr), "mean_printed": sum(fr) / len(fr)})
    return out


def parts_plot(report: dict[str, Any]) -> str | None:
    """Printed fraction per part against layer."""
    series: dict[int, tuple[list[int], list[float]]] = {}
    for r in report["layers"]:
        for p in r.get("parts", []):
            xs, ys = series.setdefault(p["id"], ([], []))
            xs.append(r["layer"])
            ys.append(p["printed_fraction"])
    if not series:
        return None
    fig, ax = _figure(10, 3.6)
    for pid, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, linewidth=1, marker="." if len(xs) < 30 else None, label=str(pid))
    ax.set_xlabel("layer")
    ax.set_ylabel("printed fraction of nominal")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    if len(series) <= 20:
        ax.legend(loc="lower left", fontsize=7, ncol=10, title="part", title_fontsize=7)
    return _png(fig)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def render_html(s: Session, build: str, *, layers: range | None = None,
                printer: str | None = None) -> str:
    """The report of one build as one self-contained HTML document."""
    report = build_report(s, build, printer=printer, layers=layers)
    names = class_names(report)
    defects = [c for c in names if c != NO_DEFECT]
    maps = queries.layer_maps(s, report["build_id"], layers)
    rows = report["layers"]
    last = rows[-1]["layer"] if rows else 0
    times = [r["processed_at"] for r in rows]
    alarms = report["alarms"]
    summary = {
        "layers": len(rows),
        "first": rows[0]["layer"] if rows else None,
        "last": last,
        "ok": sum(r["status"] == "ok" for r in rows),
        "errors": [r for r in rows if r["status"] != "ok"],
        "start": _when(min(times) if times else None),
        "end": _when(max(times) if times else None),
        "models": sorted({r["model_sha256"] for r in rows}),
        "alarms": Counter(f"{a['severity']}" for a in alarms),
        "open": sum(a["state"] != "cleared" for a in alarms),
        "tracks_alarmed": sum(t["alarmed"] for t in report["tracks"]),
        "maps": len(maps),
    }
    env = jinja2.Environment(loader=jinja2.PackageLoader("monitor.reports", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2").render(
        build=build, summary=summary, defects=defects, rows=rows, alarms=alarms,
        tracks=[t for t in report["tracks"] if t["layers"] >= 2],
        area_plot=area_plot(report, defects), alarm_plot=alarm_plot(report, last),
        track_plot=track_plot(report), heatmaps=heatmaps(maps, defects),
        worst=_worst_layers(report, maps, defects), regions=_regions(report, defects),
        parts=parts_table(report), parts_plot=parts_plot(report),
        generated=_when(datetime.now(UTC).timestamp()),
        range_text=(f"layers {layers.start}-{layers.stop - 1}" if layers else "all layers"),
    )
