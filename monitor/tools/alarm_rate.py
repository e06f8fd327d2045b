"""How often the default alarms fire: per 100 healthy layers (real SLM layers, synthetic
builds without defects, in the classic look and in varied camera styles) and, on synthetic
builds with defects, whether each stacking defect, missing or distorted part and misprint
episode raises its alarm within a few layers of its start.

The layers go through the daemon's own steps (Segmenter, layer_stats, PartMeter,
AlarmEngine) in-process, without watch folder or database, with the default [alarms]. Each
layer is evaluated by two engines: one as the daemon runs it (the weights' trust in this
camera applied) and one that trusts the model, to show what the trust cap changes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from monitor.alarms.engine import AlarmEngine
from monitor.config import AlarmsConfig, CameraConfig, GeometryConfig, parse_config
from monitor.daemon.parts import PartMeter
from monitor.records import AlarmEvent, BuildKey
from monitor.training.synth_render import MISPRINT, SWELLING
from monitor.vision.imaging import to_unit_gray
from monitor.vision.segmenter import Segmenter
from monitor.vision.stats import Found, layer_stats

LOOKAHEAD = 3  # a defect must alarm within this many layers of its first layer
# A swelling alarm is the episode's when it lies within this of a swelling drawn on its layer
# (an alarm on another part in the same layers does not catch it).
NEAR_MM = 3.0
MISPRINT_EPISODE_MM2 = 2.0  # layers with this much misprint drawn make a misprint episode


@dataclass
class Tally:
    """Alarms that opened over some layers, as the daemon raises them and if trusted."""

    layers: int = 0
    opened: list[AlarmEvent] = field(default_factory=list)  # as the daemon raises them
    trusted: list[AlarmEvent] = field(default_factory=list)  # had the model been trusted

    def add(self, other: Tally) -> None:
        self.layers += other.layers
        self.opened += other.opened
        self.trusted += other.trusted

    def summary(self, hook_severities: tuple[str, ...] = ("critical",)) -> dict[str, Any]:
        per100 = 100.0 / max(self.layers, 1)

        def count(evs: list[AlarmEvent]) -> dict[str, Any]:
            sev = Counter(e.severity for e in evs)
            return {"alarms": len(evs), "per_100_layers": round(len(evs) * per100, 1),
                    "critical": sev.get("critical", 0), "warning": sev.get("warning", 0),
                    "hook": sum(e.severity in hook_severities and e.model_trusted
                                for e in evs),
                    "by_rule": dict(Counter(e.rule for e in evs).most_common())}

        return {"layers": self.layers, "as_run": count(self.opened),
                "if_trusted": count(self.trusted)}


class Runner:
    """The daemon's analysis of layers, in-process, for one camera."""

    def __init__(self, seg: Segmenter, *, camera: CameraConfig, geometry: GeometryConfig,
                 alarms: AlarmsConfig | None = None, max_components: int = 200) -> None:
        self.seg = seg
        self.camera = camera
        self.meter = PartMeter(camera, geometry) if geometry.nominal else None
        self.alarms = alarms or AlarmsConfig()
        self.max_components = max_components
        names = seg.class_names
        self.engine = AlarmEngine(self.alarms, class_names=names,
                                  pixel_size_mm=camera.pixel_size_mm,
                                  layer_thickness_mm=camera.layer_thickness_mm)
        self.trusting = AlarmEngine(self.alarms, class_names=names,
                                    pixel_size_mm=camera.pixel_size_mm,
                                    layer_thickness_mm=camera.layer_thickness_mm)
        adapted = seg.info.adapted_cameras
        if not self.alarms.trust_unadapted and not (camera.id and camera.id in adapted):
            self.engine.untrusted = frozenset({""})

    def build(self, name: str, layers: Iterable[tuple[int, np.ndarray, Path]]) -> Tally:
        """Analyse a build's layers: (layer number, (H, W) float32 gray in [0, 1], path)."""
        key = BuildKey("", name)
        tally = Tally()
        for n, gray, path in layers:
            seg = self.seg.predict(gray, probs=False)
            names = self.seg.class_names
            px = self.camera.pixel_size_mm
            masks = seg.masks
            found: dict[int, Found] | None = seg.found
            measured = (self.meter.measure(name, n, path=path, gray=gray, masks=masks,
                                           class_names=names, loose=seg.loose)
                        if self.meter else None)
            if measured is not None and measured.masks is not None:
                masks, found = measured.masks, None  # as the analyser: read against the slice
            stats = layer_stats(masks, names, pixel_size_mm=px,
                                max_components=self.max_components, found=found)
            zone = None
            if measured is not None and self.engine.wants_parts_zone:
                zone = measured.zone_stats(masks, names, pixel_size_mm=px,
                                           max_components=self.max_components)
            parts = measured.parts if measured is not None else None
            for eng, out in ((self.engine, tally.opened), (self.trusting, tally.trusted)):
                ev = eng.evaluate(key, n, stats, parts=parts, parts_zone=zone,
                                  locate=measured.part_at if measured else None).events
                out += [e for e in ev if e.action == "open"]
            tally.layers += 1
        return tally


def segmenter(weights: Path, device: str = "auto") -> Segmenter:
    cfg = parse_config({"model": {"weights": str(weights), "device": device}},
                       base_dir=Path.cwd())
    seg = Segmenter.from_config(cfg)
    seg.warm_up()
    return seg


# ------------------------------------------------------------ real SLM layers


def slm(seg: Segmenter, root: Path) -> Tally:
    """Every real after-melt layer with a nominal slice (each build through its own engine
    state, layers in order: B0's ten in a row, the others' few far apart), with the plate
    calibration."""
    cal = json.loads((root / "calibration.json").read_text())
    camera = CameraConfig(plate_corners_px=tuple(tuple(c) for c in cal["plate_corners_px"]))
    geometry = GeometryConfig(nominal=f"{root}/nominal/{{build}}/layer_{{layer:05d}}.png",
                              frame_mm=(0.0, 0.0, 216.0, 216.0))
    runner = Runner(seg, camera=camera, geometry=geometry)

    def items(build: str) -> Iterator[tuple[int, np.ndarray, Path]]:
        for path in sorted((root / "images" / build).glob("layer_*.jpg")):
            n = int(path.stem.split("_")[1])
            if not (root / "nominal" / build / f"layer_{n:05d}.png").is_file():
                continue
            img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if img is not None:
                yield n, to_unit_gray(img), path

    tally = Tally()
    for build in sorted(p.name for p in (root / "images").iterdir() if p.is_dir()):
        tally.add(runner.build(build, items(build)))
    return tally


# ------------------------------------------------------------ synthetic builds


@dataclass
class Recall:
    """Injected defects of synthetic builds and whether each raised its alarm in time."""

    injected: Counter[str] = field(default_factory=Counter)
    caught: Counter[str] = field(default_factory=Counter)
    late: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {k: {"injected": self.injected[k], "caught": self.caught[k],
                    "recall": round(self.caught[k] / self.injected[k], 3)}
                for k in sorted(self.injected)} | {"missed": self.late[:20]}


def synthetic(seg: Segmenter, work: Path, *, seed: int, layers: int = 40, size: int = 512,
              defects: bool = True, part_events: bool = False,
              recall: Recall | None = None, camera_style: str = "classic") -> Tally:
    """A synthetic build (`pbf-monitor synth`) through the runner; with `recall`, checks
    its swelling episodes (stacking defects) and part events against the alarms: each must
    open its alarm within LOOKAHEAD layers of its first layer (or of the end of the build's
    grace layers, for one that starts inside them)."""
    from monitor.training.synth import BuildGenerator

    gen = BuildGenerator(size=size, layers=layers, seed=seed, part_events=part_events,
                         defects=defects, camera=camera_style)
    nominal = work / f"synth{seed}" / "nominal"
    nominal.mkdir(parents=True, exist_ok=True)
    camera = CameraConfig()
    side = size * camera.pixel_size_mm
    geometry = GeometryConfig(nominal=f"{nominal}/layer_{{layer:05d}}.png",
                              frame_mm=(0.0, 0.0, side, side))
    runner = Runner(seg, camera=camera, geometry=geometry)

    misprint_mm2: list[float] = []  # per layer, the misprint drawn
    swelling_layers: dict[int, list[int]] = {}  # per swelling episode, the layers it is drawn on
    swelling_drawn: dict[int, np.ndarray] = {}  # per layer, where swelling is drawn

    def items() -> Iterator[tuple[int, np.ndarray, Path]]:
        for lay in gen:
            n = lay.index + 1
            misprint_mm2.append(float(lay.masks[MISPRINT].sum()) * camera.pixel_size_mm ** 2)
            for i in lay.swellings:
                swelling_layers.setdefault(i, []).append(n)
            if lay.swellings:
                swelling_drawn[n] = lay.masks[SWELLING].copy()
            cv2.imwrite(str(nominal / f"layer_{n:05d}.png"), gen.nominal(lay.index))
            yield n, to_unit_gray(lay.image), nominal / f"layer_{n:05d}.png"

    tally = runner.build(f"synth{seed}", items())
    if recall is not None:
        near_px = NEAR_MM / camera.pixel_size_mm
        _score(gen, tally.trusted, recall, seed, runner.alarms.grace_layers, misprint_mm2,
               swelling_layers, lambda e: _near(e, swelling_drawn.get(e.layer), near_px))
    return tally


def _episodes(area_mm2: list[float], least: float) -> list[tuple[int, int]]:
    """(first, last) layer numbers of the runs of layers with at least `least` mm²."""
    runs, start = [], None
    for n, a in enumerate([*area_mm2, 0.0], start=1):
        if a >= least and start is None:
            start = n
        elif a < least and start is not None:
            runs.append((start, n - 1))
            start = None
    return runs


def _near(e: AlarmEvent, drawn: np.ndarray | None, near_px: float) -> bool:
    """Whether alarm `e` lies within `near_px` of a swelling drawn on its layer."""
    if drawn is None or e.position_px is None:
        return False
    ys, xs = np.nonzero(drawn)
    x, y = e.position_px
    return bool(len(ys)) and float(np.min(np.hypot(xs - x, ys - y))) <= near_px


def _score(gen: Any, opened: list[AlarmEvent], recall: Recall, seed: int,
           grace: int, misprint_mm2: list[float],
           swelling_layers: dict[int, list[int]],
           on_swelling: Callable[[AlarmEvent], bool]) -> None:
    def first(pred: Callable[[AlarmEvent], bool], start: int) -> bool:
        lo = max(start, grace + 1)  # the first layers of a build are not checked
        return any(pred(e) and lo <= e.layer <= lo + LOOKAHEAD for e in opened)

    # An episode is scored where it is drawn: its part may not be printed on some or all of
    # its layers (not started, ended, broken off); one drawn layer does not stack.
    for drawn in swelling_layers.values():
        if len(drawn) < 2:
            continue
        start = drawn[0]
        recall.injected["stacking (swelling episode)"] += 1
        if first(lambda e: e.class_name == "swelling" and on_swelling(e), start):
            recall.caught["stacking (swelling episode)"] += 1
        else:
            recall.late.append(f"seed {seed} swelling from layer {start}")
    for ev in gen.events_json():
        kind = "part_missing" if ev["kind"] == "missing" else "part_excess"
        recall.injected[kind] += 1
        prefix = kind + "."

        def is_kind(e: AlarmEvent, prefix: str = prefix) -> bool:
            return e.rule.startswith(prefix)

        if first(is_kind, int(str(ev["first_layer"]))):
            recall.caught[kind] += 1
        else:
            recall.late.append(f"seed {seed} {kind} from layer {ev['first_layer']}")
    # Misprints come often in these builds, and a rule waits cooldown_layers after each
    # alarm: an episode inside another's cooldown counts as missed here.
    for a, b in _episodes(misprint_mm2, MISPRINT_EPISODE_MM2):
        if b <= grace:
            continue
        recall.injected["misprint episode"] += 1
        if first(lambda e: e.class_name == "misprint", a):
            recall.caught["misprint episode"] += 1


def measure(weights: Path, work: Path, *, slm_root: Path | None, device: str = "auto",
            healthy_builds: int = 3, varied_builds: int = 12, defect_builds: int = 10,
            layers: int = 40, size: int = 512) -> dict[str, Any]:
    """Every number of the README's alarm measurements."""
    seg = segmenter(weights, device)
    out: dict[str, Any] = {"weights": str(weights), "model_sha256": seg.info.sha256,
                           "adapted_cameras": list(seg.info.adapted_cameras)}
    if slm_root is not None and (slm_root / "nominal").is_dir():
        out["slm_all_with_slices"] = slm(seg, slm_root).summary()
    healthy = Tally()
    for seed in range(healthy_builds):
        healthy.add(synthetic(seg, work, seed=100 + seed, layers=layers, size=size,
                              defects=False))
    out["synthetic_healthy"] = healthy.summary()
    # The same, through cameras of other looks (monitor.training.camera), on seeds no
    # training build used.
    varied = Tally()
    for seed in range(varied_builds):
        varied.add(synthetic(seg, work, seed=600 + seed, layers=layers, size=size,
                             defects=False, camera_style="varied"))
    out["synthetic_healthy_varied_cameras"] = varied.summary()
    rec, sick = Recall(), Tally()
    for seed in range(defect_builds):
        sick.add(synthetic(seg, work, seed=200 + seed, layers=layers, size=size,
                           part_events=True, recall=rec))
    out["synthetic_defects"] = sick.summary() | {"recall_if_trusted": rec.summary()}
    return out


if __name__ == "__main__":
    import argparse
    import tempfile

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weights", type=Path, default=Path("weights/default.safetensors"))
    p.add_argument("--slm", type=Path,
                   default=Path(__file__).resolve().parents[3] / "shared" / "data" / "slm")
    p.add_argument("--device", default="auto")
    p.add_argument("--healthy-builds", type=int, default=3)
    p.add_argument("--varied-builds", type=int, default=12)
    p.add_argument("--defect-builds", type=int, default=10)
    p.add_argument("--layers", type=int, default=40)
    p.add_argument("--size", type=int, default=512)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(a.weights, Path(tmp), slm_root=a.slm, device=a.device,
                                 healthy_builds=a.healthy_builds,
                                 varied_builds=a.varied_builds,
                                 defect_builds=a.defect_builds, layers=a.layers,
                                 size=a.size), indent=1))
