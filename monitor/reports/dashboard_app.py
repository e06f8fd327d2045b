"""The Streamlit dashboard (run by `pbf-monitor dashboard`, not imported by the daemon).

It reads the database read-only and works while the daemon writes; an ack goes through the
daemon's state endpoint, like `pbf-monitor ack`, so the daemon stays the only writer and
publishes the transition. The build page refreshes itself every few seconds.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import streamlit as st
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from monitor.config import Config, load_config
from monitor.reports.html_report import alarm_plot, area_plot, heatmaps, track_plot
from monitor.reports.maps import decode_masks, decode_thumb
from monitor.reports.report import build_report, class_names, markdown_text
from monitor.store import queries
from monitor.store.connect import open_db
from monitor.store.schema import LayerMap
from monitor.vision.imaging import overlay
from monitor.vision.stats import NO_DEFECT

REFRESH_S = 5


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--config", type=Path, default=None)
    return p.parse_args()


@st.cache_resource
def _setup(config: str | None) -> tuple[Config, Engine]:
    cfg = load_config(Path(config) if config else None)
    return cfg, open_db(cfg.store_url, writer=False)


def _png(b64: str | None) -> bytes | None:
    return base64.b64decode(b64) if b64 else None


def _builds(engine: Engine) -> list[dict[str, Any]]:
    with Session(engine) as s:
        return list(reversed(queries.list_builds(s)))


def _summary(builds: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """What the sidebar shows; when it changes, the whole page is drawn again."""
    return [(b["build"], b["layers"]) for b in builds]


def _builds_sidebar(engine: Engine) -> str | None:
    builds = _builds(engine)
    # The sidebar is drawn outside the refreshing fragment: remember what it shows, so the
    # fragment can tell when it went stale (a sidebar saying 3 layers over a page saying 4).
    st.session_state["sidebar"] = _summary(builds)
    st.sidebar.title("pbf-monitor")
    if not builds:
        st.sidebar.info("No builds in the database yet.")
        return None
    names = [b["build"] for b in builds]
    wanted = st.query_params.get("build")
    index = names.index(wanted) if wanted in names else 0
    choice = st.sidebar.radio(
        "Builds (newest first)", names, index=index,
        format_func=lambda n: f"{markdown_text(n)} "
                              f"({next(b['layers'] for b in builds if b['build'] == n)} layers)")
    st.query_params["build"] = choice
    return str(choice)


def _layer_view(report: dict[str, Any], maps: dict[int, LayerMap],
                names: list[str]) -> None:
    rows = report["layers"]
    numbers = [r["layer"] for r in rows]
    latest, key = numbers[-1], f"layer-{report['build']}"
    if key not in st.session_state:
        wanted = st.query_params.get("layer")  # a shared link may name a layer
        st.session_state[key] = (int(wanted) if wanted and wanted.isdigit()
                                 and int(wanted) in numbers else latest)
    elif (st.session_state[key] == st.session_state.get(f"{key}-latest")
          or st.session_state[key] not in numbers):
        st.session_state[key] = latest  # was on the newest layer: follow the build
    st.session_state[f"{key}-latest"] = latest
    layer = st.select_slider("Layer", options=numbers, key=key)
    row = next(r for r in rows if r["layer"] == layer)
    left, right = st.columns([3, 2])
    with left:
        m = maps.get(layer)
        if m is not None:
            classes = json.loads(m.classes)
            img = overlay(decode_thumb(m.thumb_jpeg), decode_masks(m.mask_png, len(classes)),
                          classes)
            st.image(img[:, :, ::-1], caption=f"layer {layer}: camera image with defects",
                     width="stretch")
        else:
            st.info("No stored defect map for this layer (maps off, or pruned).")
    with right:
        st.markdown(f"**Layer {layer}**: {row['status']}"
                    + (f" ({markdown_text(row['error'])})" if row["error"] else ""))
        table = [{"class": c, "area mm²": round(st_["area_mm2"], 3),
                  "area %": round(100 * st_["area_fraction"], 4),
                  "components": st_["components"]}
                 for c in names if (st_ := row["classes"].get(c))]
        st.table(table)
        st.caption(f"model {row['model_sha256'][:12]}, latency "
                   f"{row['latency_ms'] or 0:.0f} ms, image {markdown_text(row['image'])}")
        if row.get("parts"):
            st.markdown("**Parts** (fractions of the nominal area)")
            st.table([{"part": p["id"], "nominal mm²": round(p["nominal_mm2"], 1),
                       "printed": round(p["printed_fraction"], 3),
                       "excess": round(p["excess_fraction"], 3),
                       "shift mm": (None if p["centroid_shift_mm"] is None
                                    else round(p["centroid_shift_mm"], 2))}
                      for p in row["parts"]])


def _alarms(cfg: Config, engine: Engine, report: dict[str, Any]) -> None:
    from monitor.daemon.control import ControlError, request

    with Session(engine) as s:
        rows = queries.list_alarms(s, build_id=report["build_id"], open_only=True)
    st.subheader(f"Open alarms ({len(rows)})")
    for a, _, _ in rows:
        c1, c2, c3, c4 = st.columns([5, 1, 1, 1])
        where = (f" on part {a.part}" if a.part is not None else "") + (
            f" at ({a.position_x_mm:.1f}, {a.position_y_mm:.1f}) mm"
            if a.position_x_mm is not None and a.position_y_mm is not None else "")
        c1.markdown(f"**#{a.id}** {a.severity} `{a.rule}` at layer {a.layer}{where}: "
                    f"{a.value:.4g} > {a.threshold:.4g} {a.unit} ({a.state})"
                    + ("" if a.model_trusted else " *model not trusted on this camera*")
                    + (f" — verdict **{a.verdict}**" if a.verdict else ""))
        if a.state == "open" and c2.button("Ack", key=f"ack-{a.id}"):
            try:
                request(cfg.publish.state_endpoint, {"cmd": "ack", "id": a.id}, timeout_s=3)
            except ControlError as e:
                st.error(f"ack failed: {e}")
            else:
                # Draw the list again before saying so: the row above still says "open".
                st.session_state["toast"] = f"alarm {a.id} acknowledged"
                st.rerun(scope="fragment")
        for col, verdict, label in ((c3, "confirmed", "Confirm"),
                                    (c4, "false_alarm", "False alarm")):
            if col.button(label, key=f"{verdict}-{a.id}", disabled=a.verdict == verdict):
                try:
                    request(cfg.publish.state_endpoint,
                            {"cmd": "verdict", "id": a.id, "verdict": verdict}, timeout_s=3)
                except ControlError as e:
                    st.error(f"verdict failed: {e}")
                else:
                    st.session_state["toast"] = f"alarm {a.id} marked {verdict}"
                    st.rerun(scope="fragment")


def _trust_banner(cfg: Config) -> None:
    """The daemon's trust in its model (from the state endpoint; nothing if it is down)."""
    from monitor.daemon.control import ControlError, request

    try:
        health = request(cfg.publish.state_endpoint, {"cmd": "state"},
                         timeout_s=1).get("health", {})
    except ControlError:
        return
    if health.get("model_trusted") is False:
        st.warning(f"Model not trusted on this camera: {health.get('model_trust_reason')}")


def main() -> None:
    args = _args()
    st.set_page_config(page_title="pbf-monitor", layout="wide")
    cfg, engine = _setup(str(args.config) if args.config else None)
    build = _builds_sidebar(engine)
    if build is None:
        st.title("pbf-monitor")
        st.write("Waiting for the first layer.")
        return

    @st.fragment(run_every=REFRESH_S)
    def page() -> None:
        if st.session_state.get("sidebar") != _summary(_builds(engine)):
            st.rerun()  # new layers or builds: the sidebar's counts too
        if toast := st.session_state.pop("toast", None):
            st.toast(toast)
        with Session(engine) as s:
            report = build_report(s, build)
            maps = queries.layer_maps(s, report["build_id"])
        names = class_names(report)
        defects = [c for c in names if c != NO_DEFECT]
        rows = report["layers"]
        st.title(f"Build {markdown_text(build)}")
        c = st.columns(4)
        c[0].metric("Layers", len(rows))
        c[1].metric("Errors", sum(r["status"] != "ok" for r in rows))
        c[2].metric("Alarms", len(report["alarms"]))
        c[3].metric("Stacking defects", sum(t["alarmed"] for t in report["tracks"]))
        _trust_banner(cfg)
        _layer_view(report, maps, names)
        _alarms(cfg, engine, report)
        st.subheader("Defect area by layer")
        if (png := _png(area_plot(report, defects))) is not None:
            st.image(png)
        tabs = st.tabs(["Cumulative top view", "Stacking defects", "Alarm timeline"])
        with tabs[0]:
            found = heatmaps(maps, defects)
            cols = st.columns(3)
            for i, h in enumerate(h for h in found if not h["empty"]):
                cols[i % 3].image(base64.b64decode(h["png"]))
            if none := [h["name"] for h in found if h["empty"]]:
                st.caption(f"Found in no layer: {', '.join(none)}.")
        with tabs[1]:
            if (png := _png(track_plot(report))) is not None:
                st.image(png)
            else:
                st.write("No defect spanned two layers or more.")
        with tabs[2]:
            last = rows[-1]["layer"] if rows else 0
            if (png := _png(alarm_plot(report, last))) is not None:
                st.image(png)
            else:
                st.write("No alarms.")

    page()


main()
