"""Commands that make and measure models: train, evaluate, calibrate, synth, dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from monitor.cli.options import CONFIG_OPTION, find_config, setup_logging


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
@click.option("--norm", type=click.Choice(["flat", "global"]), default="flat",
              show_default=True,
              help="Input normalisation: flat = divided by the bed's own background and "
                   "spread (camera-independent); global = one fixed mean and spread.")
@click.option("--init", "init", type=click.Path(path_type=Path, dir_okay=False),
              help="Start from these weights (same --width and classes).")
def train(datasets: tuple[Path, ...], out: Path, width: int, epochs: int,
          steps_per_epoch: int, tile: int, batch: int, lr: float, pos_weight: str,
          defect_bias: float, val_fraction: float, device: str, workers: int, seed: int,
          resume: bool, norm: str, init: Path | None) -> None:
    """Train a U-Net on dataset folders; keeps the best epoch by validation defect IoU."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from monitor.training.train import TrainOptions
    from monitor.training.train import train as run_training

    setup_logging("INFO")
    opts = TrainOptions(width=width, epochs=epochs, steps_per_epoch=steps_per_epoch, tile=tile,
                        batch=batch, lr=lr, pos_weight=pos_weight, defect_bias=defect_bias,
                        val_fraction=val_fraction, device=device, workers=workers, seed=seed,
                        norm=norm, init=str(init) if init else "")
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

    Uses the daemon's tiling and thresholds from the config.
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
                          progress=lambda n: progress.update(task, completed=n))
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
                                 camera=camera, progress=lambda i: progress.update(task, completed=i + 1))
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


# Registered on the `pbf-monitor` group by monitor.cli.
COMMANDS: list[click.Command] = [train, evaluate, calibrate, synth, dataset]
