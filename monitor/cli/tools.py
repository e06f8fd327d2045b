"""Benchmarks and the demo: bench, soak, demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from monitor.cli.options import command_name, setup_logging
from monitor.errors import MonitorError


@click.command()
@click.option("--size", type=click.IntRange(64), default=2048, show_default=True,
              help="Side of the generated layer images.")
@click.option("--layers", type=click.IntRange(1), default=3, show_default=True,
              help="Images per backend measurement (median reported).")
@click.option("--e2e-layers", type=click.IntRange(3), default=20, show_default=True,
              help="Layers through the real daemon for the latency percentiles.")
@click.option("--seed-size", type=click.IntRange(0), default=512, show_default=True,
              help="Image side for the width-64 seed model on a CPU (0 = skip).")
@click.option("--memory-size", type=click.IntRange(0), default=4096, show_default=True,
              help="Layer side for the peak-memory measurement in a fresh process (0 = skip).")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights (default: bundled).")
def bench(size: int, layers: int, e2e_layers: int, seed_size: int, memory_size: int,
          weights: Path | None) -> None:
    """Measure inference speed (a benchmark, minutes): backends against eager fp32 PyTorch,
    the machine's matmul rate, end-to-end latency on the daemon (plain, with nominal slices,
    publishing over OPC UA and MQTT too), backlog rate, peak memory.
    Prints a table, then one JSON line."""
    from rich.table import Table

    from monitor.config import DEFAULT_WEIGHTS
    from monitor.tools.bench import run_bench

    setup_logging("WARNING")
    console = Console(stderr=True)
    res = run_bench(weights or DEFAULT_WEIGHTS, size=size, layers=layers,
                    e2e_layers=e2e_layers, seed_size=seed_size, memory_size=memory_size,
                    progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    t = Table(title=f"inference at {size}x{size} px on {res.summary['device']} "
                    f"({res.summary['threads']} threads); matmul "
                    f"{res.summary['matmul_gflops']:.0f} GFLOP/s")
    for col in ("what", "ms / image", "x eager", "GFLOP/s", "of matmul"):
        t.add_column(col, justify="left" if col == "what" else "right")
    for r in res.rows:
        t.add_row(r["what"], f"{r['ms']:.0f}", f"{r['speedup']:.2f}", f"{r['gflops']:.0f}",
                  f"{r['gflops'] / res.summary['matmul_gflops']:.0%}")
    Console().print(t)
    s = res.summary
    click.echo(f"end to end: p50 {s['e2e_p50_ms']:.0f} ms, p95 {s['e2e_p95_ms']:.0f} ms, "
               f"p99 {s['e2e_p99_ms']:.0f} ms for {s['infer_ms']:.0f} ms of inference "
               f"({s['e2e_over_infer']:.2f}x); backlog {s['backlog_layers_per_s']:.2f} "
               f"layers/s ({s['backlog_over_infer_rate']:.2f}x one over the inference time); "
               f"peak memory {s['peak_rss_mb']:.0f} MB")
    click.echo(f"end to end with [geometry] nominal slices: p50 "
               f"{s['geometry_e2e_p50_ms']:.0f} ms, p95 {s['geometry_e2e_p95_ms']:.0f} ms, "
               f"{s['geometry_overhead']:.2f}x the p50 without")
    if s["sinks_skipped"]:
        click.echo(f"end to end with [opcua] and [mqtt]: skipped ({s['sinks_skipped']})")
    else:
        click.echo(f"end to end with [opcua] and [mqtt]: p50 {s['sinks_e2e_p50_ms']:.0f} ms, "
                   f"p95 {s['sinks_e2e_p95_ms']:.0f} ms, {s['sinks_overhead']:.2f}x the p50 "
                   "without")
    if memory_size:
        click.echo(f"a fresh process serving one {memory_size} px layer: "
                   f"{s['model_loaded_rss_mb']:.0f} MB with the model loaded, "
                   f"{s['layer_peak_rss_mb']:.0f} MB at peak")
    click.echo(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                           for k, v in s.items()}))


@click.command()
@click.option("--layers", type=click.IntRange(2), default=2000, show_default=True)
@click.option("--size", type=click.IntRange(64), default=128, show_default=True,
              help="Side of the generated layer images.")
@click.option("--warmup", type=click.IntRange(0), default=200, show_default=True,
              help="Layers before memory is taken as the baseline.")
@click.option("--every", type=click.IntRange(1), default=50, show_default=True,
              help="Sample memory and open files every N layers.")
@click.option("--max-growth-mb", type=float, default=30.0, show_default=True)
@click.option("--weights", type=click.Path(path_type=Path), help="Weights (default: bundled).")
def soak(layers: int, size: int, warmup: int, every: int, max_growth_mb: float,
         weights: Path | None) -> None:
    """Run many small layers through a daemon process (a benchmark, minutes): memory growth
    after warm-up, open files, layers lost. Prints samples, then one JSON line; exits 2 if
    a target is missed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from monitor.tools.soak import run_soak

    with Progress(TextColumn("soak"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[rss]}"), console=Console(stderr=True)) as bar:
        task = bar.add_task("soak", total=layers, rss="")

        def show(res: Any) -> None:
            s = res.samples[-1]
            bar.update(task, completed=s.layer, rss=f"{s.rss_mb:.1f} MB, {s.fds} open files")

        res = run_soak(layers=layers, size=size, warmup=warmup, every=every, weights=weights,
                       progress=show)
    for s in res.samples:
        click.echo(f"layer {s.layer:>6}: {s.rss_mb:8.1f} MB resident, {s.fds} open files")
    click.echo(json.dumps(res.summary(max_growth_mb)))
    failed = res.failures(max_growth_mb)
    if failed:
        raise MonitorError("soak: " + "; ".join(failed))


@click.command()
@click.option("--layers", type=click.IntRange(1), default=12, show_default=True)
@click.option("--size", type=click.IntRange(64), default=512, show_default=True)
@click.option("--interval", "interval_s", type=float, default=1.0, show_default=True,
              help="Seconds between layers.")
@click.option("--seed", type=int, default=7, show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path),
              help="Keep the watch folder and database here (default: a temporary folder).")
@click.option("--weights", type=click.Path(path_type=Path), help="Weights to use.")
def demo(layers: int, size: int, interval_s: float, seed: int, workdir: Path | None,
         weights: Path | None) -> None:
    """Run the daemon on a synthetic build and print what a subscriber receives."""
    from monitor.tools.demo import run_demo

    setup_logging("WARNING")
    report = run_demo(layers=layers, size=size, interval_s=interval_s, seed=seed,
                      workdir=workdir, weights=weights, command=command_name())
    if len([r for r in report["layers"] if r["status"] == "ok"]) < layers:
        raise MonitorError(f"demo: only {len(report['layers'])} of {layers} layers processed")


# Registered on the `pbf-monitor` group by monitor.cli.
COMMANDS: list[click.Command] = [bench, soak, demo]
