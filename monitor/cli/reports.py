"""Commands that read results: builds, report, alarms, the dashboard, and infer on one image."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape

from monitor.cli.options import CONFIG_OPTION, find_config, print_table
from monitor.config import Config
from monitor.errors import MonitorError


def _reader(cfg: Config) -> Any:
    from monitor.store.connect import open_db

    return open_db(cfg.store_url, writer=False)


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def builds(config_path: Path | None, as_json: bool) -> None:
    """List the builds in the database; "good": marked by `pbf-monitor mark-good`."""
    from rich.table import Table
    from sqlalchemy.orm import Session

    from monitor.store.queries import list_builds

    engine = _reader(find_config(config_path))
    with Session(engine) as s:
        rows = list_builds(s)
    if as_json:
        click.echo(json.dumps(rows))
        return
    t = Table(title="builds")
    for col in ("build", "layers", "first", "last", "errors", "good"):
        t.add_column(col, overflow="fold")
    for r in rows:
        note = r["marked_good_note"]
        good = "" if r["marked_good_at"] is None else "yes" + (f": {note}" if note else "")
        t.add_row(escape(r["build"]), str(r["layers"]), str(r["first_layer"]),
                  str(r["last_layer"]), str(r["errors"]), escape(good))
    print_table(t)


@click.command()
@click.argument("build")
@CONFIG_OPTION
@click.option("--format", "fmt",
              type=click.Choice(["table", "json", "csv", "alarms-csv", "html"]),
              default="table", help="alarms-csv: one row per alarm, with its verdict.")
@click.option("--out", type=click.Path(path_type=Path), help="Write to a file, not stdout.")
@click.option("--layers", "layer_range", help="Only layers A:B (inclusive), A: or :B.")
@click.option("--printer", default=None, help="Printer of the build (fleets).")
def report(build: str, config_path: Path | None, fmt: str, out: Path | None,
           layer_range: str | None, printer: str | None) -> None:
    """Report of one build: a table, JSON, CSV, or a self-contained HTML file with plots."""
    from sqlalchemy.orm import Session

    from monitor.records import storable
    from monitor.reports import report as rep

    build = storable(build)  # a name typed with its raw bytes: stored as \xNN
    span = rep.parse_layers(layer_range) if layer_range else None
    engine = _reader(find_config(config_path))
    with Session(engine) as s:
        if fmt == "html":
            from monitor.reports.html_report import render_html

            html = render_html(s, build, layers=span, printer=printer)
            if out is None:
                raise MonitorError("--format html needs --out FILE.html")
            out.write_text(html, encoding="utf-8")
            click.echo(f"wrote {out} ({len(html) / 1e6:.1f} MB)")
            return
        data = rep.build_report(s, build, layers=span, printer=printer)
    if fmt == "table":
        if out is None:
            print_table(rep.to_table(data))
        else:
            with out.open("w", encoding="utf-8") as f:
                print_table(rep.to_table(data), file=f)
        return
    text = (json.dumps(data, indent=1) if fmt == "json"
            else rep.alarms_csv(data) if fmt == "alarms-csv" else rep.to_csv(data))
    if out:
        out.write_text(text, encoding="utf-8")
    else:
        click.echo(text)


@click.command("alarms")
@CONFIG_OPTION
@click.option("--build", help="Only this build.")
@click.option("--open", "open_only", is_flag=True, help="Only open or acknowledged alarms.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--stats", "per_rule", is_flag=True,
              help="Per rule: alarms, operators' verdicts and precision.")
def alarms_cmd(config_path: Path | None, build: str | None, open_only: bool,
               as_json: bool, per_rule: bool) -> None:
    """List alarms from the database, newest first."""
    from rich.table import Table
    from sqlalchemy.orm import Session

    from monitor.daemon.publisher import alarm_message
    from monitor.reports.report import verdict_stats
    from monitor.store.queries import alarm_records

    cfg = find_config(config_path)
    engine = _reader(cfg)
    try:
        with Session(engine) as s:
            rows = [alarm_message(a)
                    for a in alarm_records(s, build=build, open_only=open_only)]
    finally:
        engine.dispose()
    if per_rule:
        stats = verdict_stats(rows)
        if as_json:
            for r in stats:
                click.echo(json.dumps(r))
            return
        t = Table(title=f"{len(rows)} alarm(s) by rule")
        for col in ("rule", "count", "confirmed", "false", "precision"):
            t.add_column(col, overflow="fold")
        for r in stats:
            p = r["precision"]
            t.add_row(escape(r["rule"]), str(r["count"]), str(r["confirmed"]),
                      str(r["false"]), "-" if p is None else f"{p:.2f}")
        print_table(t)
        return
    if as_json:
        for r in rows:
            click.echo(json.dumps(r))
        return
    t = Table(title=f"{len(rows)} alarm(s)")
    for col in ("id", "build", "layer", "class", "rule", "severity", "state", "value",
                "verdict"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(str(r["id"]), escape(r["build"]), str(r["layer"]), escape(r["class"]),
                  escape(r["rule"]), r["severity"], r["state"],
                  f"{r['value']:.4g} {r['unit']}".strip(), r["verdict"] or "")
    print_table(t)


@click.command()
@CONFIG_OPTION
@click.option("--port", type=click.IntRange(1, 65535), default=8501, show_default=True)
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to serve on (loopback by default).")
def dashboard(config_path: Path | None, port: int, address: str) -> None:
    """The live dashboard (Streamlit, the 'dashboard' extra); reads the database read-only."""
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise MonitorError("the dashboard needs Streamlit: pip install 'pbf-monitor[dashboard]'")
    cfg = find_config(config_path)  # fail here, in one line, rather than inside Streamlit
    app = Path(__file__).parent.parent / "reports" / "dashboard_app.py"
    args = [sys.executable, "-m", "streamlit", "run", str(app), "--server.port", str(port),
            "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer", "--"]
    if cfg.source is not None:
        args += ["--config", str(cfg.source.resolve())]
    click.echo(f"dashboard on http://{address}:{port} (database {cfg.store_url})")
    sys.stdout.flush()
    # Become Streamlit rather than wait for it: a SIGTERM to this command (a service stop, a
    # test's cleanup) then reaches the server instead of leaving it running as an orphan.
    os.execv(sys.executable, args)


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@CONFIG_OPTION
@click.option("--weights", type=click.Path(path_type=Path), help="Override model.weights.")
@click.option("--out", type=click.Path(path_type=Path), help="Write a colour overlay PNG here.")
@click.option("--masks", "masks_dir", type=click.Path(path_type=Path),
              help="Write one PNG per class here (<class>.png, 255 = class, the image's size), "
                   "and printed.png where [geometry] nominal has a slice for the image.")
@click.option("--build", default=None, help="Build of the image's nominal slice (--masks; "
              "default: from its path).")
@click.option("--layer", type=int, default=None, help="Layer of the image's nominal slice "
              "(--masks; default: from its name).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def infer(image: Path, config_path: Path | None, weights: Path | None, out: Path | None,
          masks_dir: Path | None, build: str | None, layer: int | None,
          as_json: bool) -> None:
    """Segment one image and print its per-class statistics."""
    from rich.table import Table

    from monitor.cli.geometry import read_gray, write_png
    from monitor.vision.imaging import overlay
    from monitor.vision.segmenter import Segmenter
    from monitor.vision.stats import layer_stats

    cfg = find_config(config_path)
    gray = read_gray(image, cfg.watch.max_pixels)  # before the model: a bad file fails fast
    seg = Segmenter.from_config(cfg, weights)
    result = seg.predict(gray, probs=False)
    stats = layer_stats(result.masks, seg.class_names, pixel_size_mm=cfg.camera.pixel_size_mm,
                        max_components=cfg.store.max_components)
    if out is not None:
        write_png(out, overlay(gray, result.masks, seg.class_names))
    written: list[str] = []
    if masks_dir is not None:
        written = _write_masks(cfg, image, gray, result.masks, seg.class_names, masks_dir,
                               build=build, layer=layer)
    if as_json:
        click.echo(json.dumps({
            "image": str(image), "width": stats.width, "height": stats.height,
            "model_sha256": seg.info.sha256, "device": str(seg.device),
            "infer_ms": result.infer_ms, "classes": stats.summary(),
            **({"masks": written} if masks_dir is not None else {}),
        }))
        return
    t = Table(title=f"{image.name}: {stats.width}x{stats.height}, {result.infer_ms:.0f} ms on "
                    f"{seg.device}")
    for col in ("class", "area %", "area mm²", "components", "largest px"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c in stats.classes.values():
        t.add_row(c.name, f"{100 * c.area_fraction:.3f}", f"{c.area_mm2:.2f}",
                  str(c.components), str(c.largest_component_px))
    Console().print(t)
    if masks_dir is not None:
        click.echo(f"wrote {', '.join(written)} in {masks_dir}")


def _write_masks(cfg: Config, image: Path, gray: Any, masks: Any, class_names: Any,
                 out: Path, *, build: str | None, layer: int | None) -> list[str]:
    """<class>.png per class (0/255 at the image's resolution), and printed.png when the
    image has a nominal slice; returns the file names written."""
    import numpy as np

    from monitor.cli.geometry import image_layer, write_png
    from monitor.daemon.parts import PartMeter

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MonitorError(f"{out}: cannot make the masks folder ({e.strerror or e})") from e
    written = []
    for name, mask in zip(class_names, masks, strict=True):  # (C, H, W) bool
        write_png(out / f"{name}.png", mask.astype(np.uint8) * 255)
        written.append(f"{name}.png")
    printer = cfg.fleet()[0]
    if printer.geometry.nominal or len(cfg.fleet()) > 1:
        try:
            printer, b, n = image_layer(cfg, image, build=build, layer=layer)
        except MonitorError as e:  # no layer in the name: no slice to compare with
            click.echo(f"no printed.png: {e}", err=True)
            return written
        # the daemon's own first half of its geometry step: exactly what it would mark
        prep = PartMeter(printer.camera, printer.geometry).prepare(b, n, path=image, gray=gray)
        if prep is not None:
            write_png(out / "printed.png", prep.printed.astype(np.uint8) * 255)
            written.append("printed.png")
    return written


# Registered on the `pbf-monitor` group by monitor.cli.
COMMANDS: list[click.Command] = [builds, report, alarms_cmd, dashboard, infer]
