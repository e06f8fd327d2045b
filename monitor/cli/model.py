"""Commands that make and measure models: train, evaluate, calibrate, synth, dataset, and on a
printer's own layers evaluate-camera and adapt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console

from monitor.cli.options import CONFIG_OPTION, find_config, setup_logging

if TYPE_CHECKING:
    from monitor.config import Config


@click.command()
@click.argument("datasets", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Weights file to write (NAME.safetensors; NAME.json is its model card).")
@click.option("--width", type=click.IntRange(1), default=16, show_default=True,
              help="U-Net base channels (the seed's model is 64).")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--steps", "steps_per_epoch", type=click.IntRange(1), default=100,
              show_default=True, help="Optimizer steps per epoch.")
@click.option("--tile", type=click.IntRange(16), default=256, show_default=True,
              help="Training tile side at native resolution (multiple of 16).")
@click.option("--batch", type=click.IntRange(1), default=8, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True, help="AdamW peak rate.")
@click.option("--pos-weight", default="auto", show_default=True,
              help="Weight of positive pixels: auto (sqrt of neg/pos per class), none, or a "
                   "number.")
@click.option("--defect-bias", type=click.FloatRange(0, 1), default=0.7, show_default=True,
              help="Share of tiles centred on a defect pixel.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.2,
              show_default=True, help="Share of layers held out (whole blocks of layers).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--workers", type=click.IntRange(0), default=0, show_default=True,
              help="Data-loading processes.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint.")
@click.option("--val-block", type=click.IntRange(1), default=5, show_default=True,
              help="Validation holds out whole blocks of this many consecutive layers.")
@click.option("--norm", type=click.Choice(["flat", "flat-soft", "global"]), default="flat",
              show_default=True,
              help="Input normalisation: flat = divided by the bed's own background and "
                   "spread (camera-independent), extremes clipped; flat-soft = the same, "
                   "extremes compressed (a glint and a glossy over-melt stay apart); global = "
                   "one fixed mean and spread.")
@click.option("--init", "init", type=click.Path(path_type=Path, dir_okay=False),
              help="Start from these weights (same --width and classes).")
def train(datasets: tuple[Path, ...], out: Path, width: int, epochs: int,
          steps_per_epoch: int, tile: int, batch: int, lr: float, pos_weight: str,
          defect_bias: float, val_fraction: float, device: str, workers: int, seed: int,
          resume: bool, val_block: int, norm: str, init: Path | None) -> None:
    """Train a U-Net on dataset folders; keeps the best epoch by validation defect IoU."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from monitor.training.train import TrainOptions
    from monitor.training.train import train as run_training

    setup_logging("INFO")
    opts = TrainOptions(width=width, epochs=epochs, steps_per_epoch=steps_per_epoch, tile=tile,
                        batch=batch, lr=lr, pos_weight=pos_weight, defect_bias=defect_bias,
                        val_fraction=val_fraction, device=device, workers=workers, seed=seed,
                        val_block=val_block, norm=norm, init=str(init) if init else "")
    opts.check()  # before the progress bars, so a bad option is one line
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        ep = progress.add_task("epochs", total=epochs, info="")
        st = progress.add_task("steps", total=steps_per_epoch, info="")

        def on_progress(phase: str, done: int, total: int, fig: dict[str, Any]) -> None:
            if phase == "step":
                progress.update(st, completed=done, info=f"loss {fig['loss']:.4f}")
            else:
                iou = fig.get("mean_iou_defects")
                progress.update(ep, completed=done,
                                info="" if iou is None else f"val defect IoU {iou:.3f}")
                progress.reset(st, info="")

        result = run_training(list(datasets), out, opts, resume=resume, on_progress=on_progress)
    click.echo(f"wrote {result.weights} (best epoch {result.best_epoch}) and {result.card}")


@click.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@CONFIG_OPTION
@click.option("--weights", type=click.Path(path_type=Path), help="Override model.weights.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--sweep", is_flag=True,
              help="Also recommend a per-class threshold (best IoU over a grid).")
def evaluate(dataset: Path, config_path: Path | None, weights: Path | None, as_json: bool,
             sweep: bool) -> None:
    """Per-class IoU, Dice, precision, recall and per-layer detection on a dataset.

    Uses the daemon's tiling and thresholds from the config; where the dataset has nominal
    slices, the masks are read against them as the daemon reads a layer (swelling and
    over-melting told apart, model.outside_thresholds and stray scan tracks beyond the
    parts).
    """
    from rich.progress import Progress

    from monitor.training.dataset import open_dataset
    from monitor.training.evaluate import ThresholdSweep, metrics_json, metrics_table
    from monitor.training.evaluate import evaluate as run_eval
    from monitor.vision.segmenter import Segmenter

    cfg = find_config(config_path)
    ds = open_dataset(dataset)
    seg = Segmenter.from_config(cfg, weights)
    sw = ThresholdSweep(seg.class_names) if sweep else None
    with Progress(transient=True, disable=as_json) as progress:
        task = progress.add_task(f"evaluate {dataset}", total=len(ds.names))
        counts = run_eval(ds, seg, sweep=sw,
                          progress=lambda n: progress.update(task, completed=n),
                          swelling_reach_px=cfg.geometry.swelling_reach_px,
                          outside_px=outside_px(cfg),
                          stray_track_z=cfg.geometry.stray_track_z,
                          relative_k=cfg.geometry.relative_k)
    if as_json:
        out = metrics_json(counts)
        out.update({"dataset": str(dataset), "weights": str(weights or cfg.model.weights),
                    "model_sha256": seg.info.sha256})
        if sw is not None:
            out["recommended_thresholds"] = sw.best()
        click.echo(json.dumps(out))
        return
    console = Console()
    console.print(metrics_table(counts, title=f"{dataset} with {seg.info.sha256[:12]}"))
    if sw is not None:
        for name, b in sw.best().items():
            console.print(f"{name}: threshold {b['threshold']:.2f} gives IoU {b['iou']:.3f}")


def outside_px(cfg: Config) -> tuple[int, int]:
    """geometry.tolerance_mm and outside_reach_mm in pixels of camera.pixel_size_mm (a
    dataset's slices are in its images' pixels)."""
    g, px = cfg.geometry, cfg.camera.pixel_size_mm
    tol = round(g.tolerance_mm / px)
    return tol, max(tol, round(g.outside_reach_mm / px))


@click.command()
@click.argument("dataset", type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(path_type=Path), required=True,
              help="Weights to calibrate.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Write the calibrated weights here (default: replace WEIGHTS).")
@CONFIG_OPTION
def calibrate(dataset: Path, weights: Path, out: Path | None, config_path: Path | None) -> None:
    """Set the per-class thresholds stored in a weights file to those with the best IoU on a
    labelled dataset (config's model.thresholds still override them)."""
    from rich.progress import Progress

    from monitor.training.dataset import open_dataset
    from monitor.training.evaluate import calibrate as run_calibration

    cfg = find_config(config_path)
    ds = open_dataset(dataset)
    with Progress(transient=True) as progress:
        task = progress.add_task(f"calibrate on {dataset}", total=len(ds.names))
        best = run_calibration(weights, ds, out or weights, tile_size=cfg.model.tile_size,
                               tile_overlap=cfg.model.tile_overlap,
                               progress=lambda n: progress.update(task, completed=n))
    for name, b in best.items():
        click.echo(f"{name}: threshold {b['threshold']:.2f} (IoU {b['iou']:.3f})")
    click.echo(f"wrote {out or weights}")


@click.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--layers", type=click.IntRange(1), default=40, show_default=True)
@click.option("--size", type=click.IntRange(64), default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--part-events", is_flag=True,
              help="A part breaks off and another distorts (listed in the manifest's "
                   "source.part_events).")
@click.option("--no-defects", is_flag=True,
              help="Draw no defect classes: a healthy build (to count false alarms).")
@click.option("--camera", type=click.Choice(["classic", "varied"]), default="classic",
              show_default=True,
              help="varied: a camera style drawn from the seed (melt brighter or darker "
                   "than powder, lighting, walls, ghosts, thin parts, zoom, oblique view).")
def synth(out: Path, layers: int, size: int, seed: int, part_events: bool,
          no_defects: bool, camera: str) -> None:
    """Write a synthetic build (images, masks, nominal slices, manifest) in the dataset
    format."""
    from rich.progress import Progress

    from monitor.training.synth import write_dataset

    with Progress() as progress:
        task = progress.add_task(f"synth {out}", total=layers)
        manifest = write_dataset(out, layers=layers, size=size, seed=seed,
                                 part_events=part_events, defects=not no_defects,
                                 camera=camera,
                                 progress=lambda i: progress.update(task, completed=i + 1))
    click.echo(f"wrote {manifest}")


@click.group()
def dataset() -> None:
    """Make datasets (images, per-class masks, manifest) for training and evaluation."""


@dataset.command("import-peregrine")
@click.argument("hdf5", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--class-ids", default="0,5,8,9,10,11", show_default=True,
              help="Peregrine class ids, in channel order, comma-separated.")
@click.option("--class-names", default=None,
              help="Channel names, comma-separated (default: the v2023 names of the ids).")
@click.option("--layers", "layer_range", default=None,
              help="0-based layer range A:B (B exclusive), A: or :B (default: all).")
def import_peregrine_cmd(hdf5: Path, out: Path, class_ids: str, class_names: str | None,
                         layer_range: str | None) -> None:
    """Convert an ORNL Peregrine v2023 HDF5 build into a dataset folder."""
    from rich.progress import Progress

    from monitor.training.dataset import DatasetError
    from monitor.training.peregrine import import_peregrine, parse_layer_range

    try:
        ids = [int(v) for v in class_ids.split(",") if v.strip()]
    except ValueError as e:
        raise DatasetError(f"--class-ids {class_ids!r}: expected integers like 0,5,8") from e
    names = [v.strip() for v in class_names.split(",")] if class_names else None
    rng = parse_layer_range(layer_range) if layer_range else None
    setup_logging("WARNING")
    with Progress(transient=True) as progress:
        task = progress.add_task(f"import {hdf5.name}", total=None)
        result = import_peregrine(
            hdf5, out, class_ids=ids, class_names=names, layers=rng,
            progress=lambda done, total: progress.update(task, completed=done, total=total))
    click.echo(f"wrote {result.layers} layers, classes {', '.join(result.classes)}: "
               f"{result.manifest}")


@dataset.command("clean-frames")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def clean_frames_cmd(sources: tuple[Path, ...], out: Path) -> None:
    """Frames known to hold no defect -> a dataset of hard negatives (no defect masks)."""
    from monitor.training.dataset import import_clean_frames

    click.echo(f"wrote {import_clean_frames(list(sources), out)}")


@dataset.command("paste")
@click.argument("src", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--per-class", type=click.IntRange(1, 20), default=2, show_default=True,
              help="Defects of each class to paste into every layer (fewer where no room).")
@click.option("--seed", type=int, default=0, show_default=True)
def paste_cmd(src: Path, out: Path, per_class: int, seed: int) -> None:
    """A copy of dataset SRC (with nominal slices) with synthetic defects pasted into every
    layer, each defined against its own part or powder (monitor.training.paste)."""
    from rich.progress import Progress

    from monitor.training.paste import paste_dataset

    with Progress(transient=True) as progress:
        progress.add_task(f"paste into {src.name}", total=None)
        manifest = paste_dataset(src, out, per_class=per_class, seed=seed)
    click.echo(f"wrote {manifest}")


# Registered on the `pbf-monitor` group by monitor.cli.
def _score_lines(title: str, sc: Any) -> list[str]:
    mean, worst = sc.mean_false, sc.max_false
    recall = ", ".join(f"{c} {r:.2f}" for c, r in sc.recall().items() if r is not None)
    return [f"{title}: {len(sc.layers)} layers with slices; defect classes mark "
            f"{(mean or 0):.2%} of the nominal part area on average, {(worst or 0):.2%} at "
            f"most", f"  pasted defects found: {recall or '-'}"]


@click.command("evaluate-camera")
@CONFIG_OPTION
@click.option("--printer", help="Which printer of a fleet (default: the only one).")
@click.option("--build", "builds", multiple=True,
              help="Only these builds (repeat; default: every build in watch.dir).")
@click.option("--weights", type=click.Path(path_type=Path), help="Override model.weights.")
@click.option("--no-paste", is_flag=True, help="Skip the pasted-defect recall.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the pasted defects.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def evaluate_camera(config_path: Path | None, printer: str | None, builds: tuple[str, ...],
                    weights: Path | None, no_paste: bool, seed: int, as_json: bool) -> None:
    """Measure the model on this camera's own layers, no labels needed.

    For every layer image in watch.dir that has a nominal slice (geometry.nominal): the share
    of the nominal part area that the defect classes mark (on healthy parts, false alarms),
    and the share of synthetic defects pasted into the same layers that the model finds.
    """
    from rich.progress import Progress

    from monitor.training.onsite import Site, printer_of, score
    from monitor.vision.segmenter import Segmenter

    cfg = find_config(config_path)
    site = Site(printer_of(cfg.fleet(), printer))
    items = site.layers(builds)
    if not items:
        raise click.ClickException(f"no layer images in {site.printer.watch.dir}"
                                   + (f" for builds {', '.join(builds)}" if builds else ""))
    seg = Segmenter.from_config(cfg, weights)
    with Progress(transient=True, disable=as_json) as progress:
        task = progress.add_task("evaluate-camera", total=len(items))

        def each() -> Any:
            for n, item in enumerate(items, 1):
                yield item
                progress.update(task, completed=n)

        sc = score(seg, site, each(), paste=not no_paste, seed=seed)
    if as_json:
        click.echo(json.dumps({**sc.as_json(), "weights": str(weights or cfg.model.weights),
                               "model_sha256": seg.info.sha256}))
        return
    for r in sc.layers:
        click.echo(f"{r['build']} layer {r['layer']}: {r['defect_fraction']:.2%} of the "
                   f"nominal part area marked")
    click.echo("\n".join(_score_lines("all", sc)))


@click.command()
@CONFIG_OPTION
@click.option("--printer", help="Which printer of a fleet (default: the only one).")
@click.option("--build", "builds", multiple=True,
              help="Also adapt on this build's layers in watch.dir, as if marked good "
                   "(repeat). Builds marked with mark-good are always used.")
@click.option("--holdout-build", "holdout", multiple=True,
              help="Measure before/after on these builds (repeat). Default: the last 30% "
                   "of each adapted build's layers, kept out of training.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="Weights to adapt (default: model.weights).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False),
              help="Where the adapted weights go (default: model.weights when that is your "
                   "own file, else STATE_DIR/weights/adapted-<camera id>.safetensors).")
@click.option("--steps", type=click.IntRange(1), default=300, show_default=True)
@click.option("--no-verdicts", is_flag=True, help="Ignore the alarms' verdicts.")
@click.option("--keep-thresholds", is_flag=True,
              help="Keep the weights' class thresholds (default: choose them anew on the "
                   "good layers, so each class finds pasted defects as often as before).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def adapt(config_path: Path | None, printer: str | None, builds: tuple[str, ...],
          holdout: tuple[str, ...], weights: Path | None, out: Path | None, steps: int,
          no_verdicts: bool, keep_thresholds: bool, device: str, seed: int) -> None:
    """Fine-tune the model on this printer's own layers, without labelling.

    Learns from builds marked good (pbf-monitor mark-good) and --build: no defect on them,
    metal where the nominal slices say; from the alarms' verdicts; and from synthetic
    defects pasted into those layers. Writes the weights (with a model card beside them)
    only if, on held-out layers, they mark less of the nominal parts and find the pasted
    defects as well as before; then `systemctl reload pbf-monitor` serves them.
    """
    import shlex
    import sys

    from rich.progress import Progress

    from monitor.config import DEFAULT_WEIGHTS
    from monitor.training.adapt import AdaptOptions, split_holdout
    from monitor.training.adapt import adapt as run_adapt
    from monitor.training.onsite import Site, printer_of

    setup_logging("INFO")
    cfg = find_config(config_path)
    pc = printer_of(cfg.fleet(), printer)
    site = Site(pc)
    marked, verdicts = _adapt_from_db(cfg, pc.name, use_verdicts=not no_verdicts)
    named = site.layers(builds) if builds else []
    train_items = list({(i.build, i.layer): i for i in [*marked, *named]
                        if i.build not in holdout}.values())
    if holdout:
        held = site.layers(holdout)
    else:
        train_items, held = split_holdout(train_items, AdaptOptions.holdout)
    source = weights or cfg.model.weights
    if out is None:
        own = source == cfg.model.weights and source.resolve() != DEFAULT_WEIGHTS.resolve()
        out = source if own else (cfg.state_dir / "weights"
                                  / f"adapted-{pc.camera.id or 'camera'}.safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    opts = AdaptOptions(steps=steps, device=device, seed=seed,
                        recalibrate=not keep_thresholds)
    with Progress(transient=True) as progress:
        task = progress.add_task("adapt", total=steps)
        result = run_adapt(cfg, pc, weights=source, out=out, train_items=train_items,
                           holdout_items=held, verdict_items=verdicts, opts=opts,
                           command=shlex.join(["pbf-monitor", *sys.argv[1:]]),
                           on_step=lambda n, total, loss: progress.update(task, completed=n))
    click.echo("\n".join(_score_lines("before", result.before)))
    click.echo("\n".join(_score_lines("after", result.after)))
    if not result.written:
        raise click.ClickException(f"not written: {result.reason} (model card "
                                   f"{result.card})")
    click.echo(f"wrote {result.weights} and {result.card}")
    if result.weights.resolve() != cfg.model.weights.resolve():
        click.echo(f'serve them: set [model] weights = "{result.weights}" in the config, '
                   f"then systemctl reload pbf-monitor")
    else:
        click.echo("serve them: systemctl reload pbf-monitor")


def _adapt_from_db(cfg: Any, printer: str, *, use_verdicts: bool) -> tuple[list[Any], list[Any]]:
    """Layers of builds marked good, and (layer, verdict) pairs of defect-class alarms, from
    the database if there is one yet."""
    from sqlalchemy.orm import Session

    from monitor.errors import StoreError
    from monitor.store import queries
    from monitor.store.connect import open_db
    from monitor.training.onsite import SiteLayer

    try:
        engine = open_db(cfg.store_url, writer=False)
    except StoreError:
        return [], []  # no database yet: only --build layers
    try:
        with Session(engine) as s:
            good = queries.good_builds(s, printer)
            marked = [SiteLayer(a.build, a.layer, Path(a.image_path))
                      for a in (queries.adapt_layers(s, good, printer=printer) if good else [])]
            pairs = [(SiteLayer(v.build, v.layer, Path(v.image_path)), v)
                     for v in (queries.verdict_alarms(s, printer) if use_verdicts else [])
                     if v.image_path and v.class_name]
    finally:
        engine.dispose()
    return marked, pairs


COMMANDS: list[click.Command] = [train, evaluate, calibrate, synth, dataset, evaluate_camera,
                                 adapt]
