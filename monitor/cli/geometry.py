"""Commands that show the nominal geometry on a photo: camera-check; and what infer shares
with it (which printer, build and layer an image is)."""

from __future__ import annotations

import re
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

import click

from monitor.cli.options import CONFIG_OPTION, find_config
from monitor.config import Config, PrinterConfig
from monitor.errors import ImageError, MonitorError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt


def image_layer(cfg: Config, image: Path, *, build: str | None = None,
                layer: int | None = None) -> tuple[PrinterConfig, str, int]:
    """The printer, build and layer of an image, as the watcher derives them.

    An image under a printer's watch folder is parsed like the daemon parses it (pattern,
    `layer_from`); elsewhere the build is its folder's name and the layer the last digits
    of its name. --build/--layer override either.
    """
    from monitor.daemon.watcher import parse_layer_path

    fleet = cfg.fleet()
    path = image.resolve()
    printer, key = fleet[0], None
    for p in fleet:
        try:
            rel = path.relative_to(p.watch.dir.resolve())
        except ValueError:
            continue
        printer = p
        pattern = re.compile(p.watch.pattern) if p.watch.pattern else None
        key = parse_layer_path(rel, pattern, layer_from=p.watch.layer_from,
                               layer_thickness_mm=p.camera.layer_thickness_mm)
        break
    if key is None:
        w = printer.watch
        key = parse_layer_path(PurePath(path.parent.name, path.name), None,
                               layer_from=w.layer_from,
                               layer_thickness_mm=printer.camera.layer_thickness_mm)
    b = build if build is not None else (key.build if key else None)
    n = layer if layer is not None else (key.layer if key else None)
    if b is None or n is None:
        raise MonitorError(f"{image}: no layer number in the file name; give --build and "
                           "--layer")
    return printer, b, n


def read_gray(image: Path, max_pixels: int) -> npt.NDArray[np.float32]:
    """The image decoded as the daemon decodes it: (H, W) float32 in [0, 1]."""
    from monitor.vision.imaging import decode

    try:
        data = image.read_bytes()
    except OSError as e:
        raise ImageError(f"{image}: cannot read ({e.strerror or e})") from e
    try:
        return decode(data, max_pixels=max_pixels)
    except ImageError as e:
        raise ImageError(f"{image}: {e}") from e


def write_png(path: Path, image: npt.NDArray[np.generic]) -> None:
    import cv2
    import numpy as np

    ok, buf = cv2.imencode(".png", np.asarray(image))
    if not ok:
        raise MonitorError(f"{path}: PNG encoding failed")
    try:
        path.write_bytes(buf.tobytes())
    except OSError as e:
        raise MonitorError(f"{path}: cannot write ({e.strerror or e})") from e


@click.command("camera-check")
@click.argument("image", type=click.Path(path_type=Path))
@CONFIG_OPTION
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Overlay PNG to write.")
@click.option("--build", default=None, help="Build (default: from the image's path).")
@click.option("--layer", type=int, default=None, help="Layer (default: from the file name).")
def camera_check(image: Path, config_path: Path | None, out: Path, build: str | None,
                 layer: int | None) -> None:
    """Draw the nominal frame (yellow, top-left corner dotted) and the layer's nominal part
    outlines (red, with ids) on the photo, to check camera.plate_corners_px by eye."""
    import numpy as np

    from monitor.geometry.layer import layer_geometry, nominal_slices
    from monitor.geometry.overlay import camera_check_overlay

    cfg = find_config(config_path)
    printer, b, n = image_layer(cfg, image, build=build, layer=layer)
    gray = read_gray(image, cfg.watch.max_pixels)
    slices = nominal_slices(printer.camera, printer.geometry)
    geo = layer_geometry(printer.camera, printer.geometry, slices, build=b, layer=n,
                         stem=image.stem, image_shape=gray.shape)
    write_png(out, camera_check_overlay(gray, geo.cal, geo.nominal))
    if slices is None:
        what = "no nominal slices configured ([geometry] nominal)"
    elif geo.nominal is None:
        what = f"no nominal slice at {slices.path(b, n, image.stem)}"
    else:
        parts = len(np.unique(geo.nominal.labels)) - 1
        what = f"{parts} nominal part(s)"
    click.echo(f"wrote {out}: build {b} layer {n}, frame {geo.cal.frame_px[0]}x"
               f"{geo.cal.frame_px[1]} px, {what}")


# Registered on the `pbf-monitor` group by monitor.cli.
COMMANDS: list[click.Command] = [camera_check]
