"""A printer's own layers: measured without labels (evaluate-camera) and used to adapt the
weights (adapt), from builds named or marked good, verdicts and pasted defects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

from monitor.cli import main
from monitor.config import load_config
from monitor.records import AlarmEvent, LayerRecord
from monitor.store import writes
from monitor.store.connect import open_db
from monitor.training.adapt import AdaptError, AdaptOptions, adapt, calibrated, split_holdout
from monitor.training.onsite import THRESHOLD_GRID, PastedShares, Site, SiteLayer, printer_of
from monitor.training.synth import write_dataset
from monitor.vision.classes import DEFAULT_CLASS_NAMES
from monitor.vision.model import read_info
from monitor.vision.stats import layer_stats
from tests.conftest import make_weights, write_config

DEFECTS = {i: 0.95 for i in range(1, len(DEFAULT_CLASS_NAMES))}


@pytest.fixture(scope="module")
def printer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A camera folder of two varied synthetic builds (B1: 4 layers, B2: 2), each layer with
    its nominal slice, as a printer would hold them."""
    root = tmp_path_factory.mktemp("printer")
    for build, seed, n in (("B1", 21, 4), ("B2", 22, 2)):
        ds = write_dataset(root / "synth" / build, layers=n, size=256, seed=seed,
                           camera="varied", defects=False).parent
        shutil.copytree(ds / "images", root / "images" / build)
        shutil.copytree(ds / "nominal", root / "nominal" / build)
    return root


def _config(tmp: Path, printer: Path, weights: Path, camera_id: str = "cam-a") -> Path:
    return write_config(tmp / "c.toml", f'''
[watch]
dir = "{printer / 'images'}"
[camera]
id = "{camera_id}"
[geometry]
nominal = "{printer / 'nominal'}/{{build}}/layer_{{layer:05d}}.png"
[model]
weights = "{weights}"
device = "cpu"
tile_size = 256
[store]
state_dir = "{tmp / 'state'}"
''')


def test_evaluate_camera_counts_what_the_model_marks(printer: Path, tmp_path: Path) -> None:
    loud = make_weights(tmp_path / "loud.safetensors", constant_prob=DEFECTS, norm="flat")
    quiet = make_weights(tmp_path / "quiet.safetensors", constant_prob={0: 0.9}, norm="flat")
    cfg = _config(tmp_path, printer, loud)
    runner = CliRunner()
    out = {}
    for name, w in (("loud", loud), ("quiet", quiet)):
        r = runner.invoke(main, ["evaluate-camera", "--config", str(cfg), "--weights", str(w),
                                 "--json"])
        assert r.exit_code == 0, r.output
        out[name] = json.loads(r.output)
    assert len(out["loud"]["layers"]) == 6
    assert out["loud"]["mean_defect_fraction"] == pytest.approx(1.0)
    assert out["quiet"]["max_defect_fraction"] == 0.0
    # read against the slices: the loud marks are one component over the whole layer, which
    # reaches over every outline, so it is all swelling and no over-melting
    loud_recall = out["loud"]["recall"]
    assert loud_recall.pop("over_melting") == 0.0
    assert all(v == 1.0 for v in loud_recall.values()), out["loud"]["recall"]
    # a model that marks nothing finds nothing pasted, but misprint: the slice reading finds
    # pasted tracks beside the parts by their texture (geometry.stray_track_z)
    quiet_recall = out["quiet"]["recall"]
    assert quiet_recall.pop("misprint") > 0.0, out["quiet"]["recall"]
    assert all(v == 0.0 for v in quiet_recall.values()), out["quiet"]["recall"]
    assert sum(out["loud"]["pasted"].values()) >= 30  # 2 per class and layer, nearly all fit
    r = runner.invoke(main, ["evaluate-camera", "--config", str(cfg), "--build", "B2"])
    assert r.exit_code == 0 and r.output.count("nominal part area marked") == 2, r.output


def test_holdout_is_the_last_layers_of_each_build() -> None:
    items = [SiteLayer(b, n, Path(f"{b}{n}")) for b in ("A", "B") for n in range(1, 11)]
    items.append(SiteLayer("C", 1, Path("C1")))
    train, held = split_holdout(items, 0.3)
    assert [(i.build, i.layer) for i in held] == [("A", 8), ("A", 9), ("A", 10),
                                                    ("B", 8), ("B", 9), ("B", 10)]
    assert ("C", 1) in {(i.build, i.layer) for i in train}


@pytest.mark.parametrize("norm", ["flat", "flat-soft"])
def test_adapt_writes_better_weights_for_this_camera(printer: Path, tmp_path: Path,
                                                     norm: str) -> None:
    """Weights that mark every part as a defect: adapting on a good build lowers the false
    area on held-out layers; the result says which camera it fits, the old file is kept."""
    out = make_weights(tmp_path / "mine.safetensors", norm=norm,
                       constant_prob={i: 0.7 for i in DEFECTS})
    cfg = load_config(_config(tmp_path, printer, out))
    pc = printer_of(cfg.fleet(), None)
    site = Site(pc)
    # A large rate: a dozen steps must move the output bias across the threshold. Thresholds
    # kept: this model has no defect to tell from its parts, and recalibration would follow
    # its bias down to where it marks everything again (test below).
    opts = AdaptOptions(steps=12, batch=4, tile=128, lr=0.3, max_recall_drop=1.0,
                        recalibrate=False)
    res = adapt(cfg, pc, weights=out, out=out, train_items=site.layers(["B1"]),
                holdout_items=site.layers(["B2"]), opts=opts)
    assert res.before.mean_false == pytest.approx(1.0)
    assert res.after.mean_false is not None and res.after.mean_false < 0.5
    assert res.written, res.reason
    info = read_info(out)
    assert info.adapted_cameras == ("cam-a",) and info.norm == norm
    assert info.training["adapted"]["camera"] == "cam-a"
    assert (tmp_path / "mine.before-adapt.safetensors").is_file()
    card = json.loads(res.card.read_text())
    assert card["written"] and card["data"]["good_layers"] == {"B1": [1, 2, 3, 4]}
    assert card["held_out"]["before"]["mean_defect_fraction"] == pytest.approx(1.0)


def test_adapt_chooses_thresholds_on_the_good_layers(printer: Path, tmp_path: Path) -> None:
    """With recalibration, the written weights serve the thresholds the card lists, each
    from the grid, each finding the good layers' pasted defects as often as before."""
    out = make_weights(tmp_path / "mine.safetensors", norm="flat",
                       constant_prob={i: 0.7 for i in DEFECTS})
    cfg = load_config(_config(tmp_path, printer, out))
    pc = printer_of(cfg.fleet(), None)
    site = Site(pc)
    opts = AdaptOptions(steps=12, batch=4, tile=128, lr=0.3, max_recall_drop=1.0)
    res = adapt(cfg, pc, weights=out, out=out, train_items=site.layers(["B1"]),
                holdout_items=site.layers(["B2"]), opts=opts)
    chosen = json.loads(res.card.read_text())["thresholds"]
    assert set(chosen) == {"swelling", "spatter", "misprint", "over_melting", "under_melting"}
    served = read_info(out).thresholds
    for c, v in chosen.items():
        assert v["threshold"] in THRESHOLD_GRID and served[c] == pytest.approx(v["threshold"])
        assert v["recall"] >= v["recall_before"] == 1.0
        # the bias fell from 0.7: the old threshold (0.5) would find nothing now
        assert v["threshold"] < 0.5


def _shares(own: list[float], grid: list[list[float]], false_own: float,
            false_grid: list[float]) -> PastedShares:
    return PastedShares(["spatter"] * len(own), own, grid, {"spatter": false_own},
                        {"spatter": false_grid})


def test_calibrated_keeps_recall_and_never_adds_false_marks() -> None:
    n = len(THRESHOLD_GRID)
    k05 = THRESHOLD_GRID.index(0.5)
    # after adapting, three of the four pasted specks stand out only up to 0.5, one to 0.3
    grid = [[0.9 if t <= 0.5 else 0.0 for t in THRESHOLD_GRID]] * 3 + \
        [[0.9 if t <= 0.3 else 0.0 for t in THRESHOLD_GRID]]
    before = _shares([0.5, 0.5, 0.5, 0.0], [[0.0] * n] * 4, 0.01, [0.0] * n)  # found 3 of 4
    after = _shares([0.0] * 4, grid, 0.0, [0.002] * n)
    got = calibrated(before, after, {"spatter": 0.75})["spatter"]
    assert got["threshold"] == 0.5 and got["recall"] == pytest.approx(3 / 4)
    # at 0.5 the adapted weights would mark more of the parts than the old ones: kept
    worse = _shares([0.0] * 4, grid, 0.0, [0.05 if k <= k05 else 0.0 for k in range(n)])
    assert calibrated(before, worse, {"spatter": 0.75}) == {}
    # a class the old weights never found takes the highest threshold at which the adapted
    # ones find RECALL_FLOOR (0.7) of it (0.5, where 3 of 4 are)...
    never = _shares([0.0] * 4, [[0.0] * n] * 4, 0.01, [0.0] * n)
    got = calibrated(never, after, {"spatter": 0.75})["spatter"]
    assert got["threshold"] == 0.5 and got["recall"] == 0.75 and got["recall_before"] == 0.0
    # ... unless that adds false marks, or they find it no better: left alone
    assert calibrated(never, worse, {"spatter": 0.75}) == {}
    assert calibrated(never, _shares([0.0] * 4, [[0.0] * n] * 4, 0.0, [0.0] * n),
                      {"spatter": 0.75}) == {}
    # found 1 of 4 before: 0.7 is aimed at first (0.3, where 2 + 2 are found); 1 of 4
    # only if nothing finds 0.7
    once = _shares([0.5, 0.0, 0.0, 0.0], [[0.0] * n] * 4, 0.01, [0.0] * n)
    half = grid[:2] + grid[3:] * 2
    assert calibrated(once, _shares([0.0] * 4, half, 0.0, [0.002] * n),
                      {"spatter": 0.75})["spatter"]["threshold"] == 0.3
    one = [[0.9 if t <= 0.5 else 0.0 for t in THRESHOLD_GRID]] + [[0.0] * n] * 3
    assert calibrated(once, _shares([0.0] * 4, one, 0.0, [0.002] * n),
                      {"spatter": 0.75})["spatter"]["threshold"] == 0.5


def test_adapt_refuses_weights_that_got_worse(printer: Path, tmp_path: Path) -> None:
    src = make_weights(tmp_path / "src.safetensors", constant_prob=DEFECTS, norm="flat")
    out = tmp_path / "out.safetensors"
    cfg = load_config(_config(tmp_path, printer, src))
    pc = printer_of(cfg.fleet(), None)
    site = Site(pc)
    # Recall starts at 1.0 for every class; allowing no drop at all (nor a tie: -0.01)
    # makes any result worse.
    opts = AdaptOptions(steps=2, batch=2, tile=128, max_recall_drop=-0.01)
    res = adapt(cfg, pc, weights=src, out=out, train_items=site.layers(["B1"]),
                holdout_items=site.layers(["B2"]), opts=opts)
    assert not res.written and "recall" in res.reason
    assert not out.exists()
    assert json.loads(res.card.read_text())["written"] is False


def test_adapt_needs_a_camera_id_flat_weights_and_slices(printer: Path, tmp_path: Path
                                                         ) -> None:
    flat = make_weights(tmp_path / "f.safetensors", norm="flat")
    runner = CliRunner()
    r = runner.invoke(main, ["adapt", "--config",
                             str(_config(tmp_path, printer, flat, camera_id="")),
                             "--build", "B1"])
    assert r.exit_code != 0 and "camera.id" in r.output and "Traceback" not in r.output
    plain = make_weights(tmp_path / "g.safetensors")
    r = runner.invoke(main, ["adapt", "--config", str(_config(tmp_path, printer, plain)),
                             "--build", "B1"])
    assert r.exit_code != 0 and "--norm flat or flat-soft" in r.output
    r = runner.invoke(main, ["adapt", "--config", str(_config(tmp_path, printer, flat))])
    assert r.exit_code != 0 and "mark-good" in r.output
    cfg = load_config(_config(tmp_path, printer, flat))
    with pytest.raises(AdaptError, match="no layers"):
        adapt(cfg, printer_of(cfg.fleet(), None), weights=flat, out=tmp_path / "o",
              train_items=[], holdout_items=[])


def test_adapt_reads_marked_builds_and_verdicts_from_the_database(printer: Path,
                                                                  tmp_path: Path) -> None:
    """The daemon's records say which images the layers were; mark-good picks the build; a
    false alarm's layer joins training with its class set to zero."""
    flat = make_weights(tmp_path / "f.safetensors", norm="flat")
    path = _config(tmp_path, printer, flat)
    cfg = load_config(path)
    names = DEFAULT_CLASS_NAMES
    engine = open_db(cfg.store_url)
    with Session(engine) as s, s.begin():
        for build, n in [("B1", k) for k in range(1, 5)] + [("B2", 1)]:
            img = printer / "images" / build / f"layer_{n:05d}.png"
            bid, _ = writes.put_layer(s, LayerRecord(
                printer="", build=build, layer=n, status="ok", error=None,
                image_path=str(img), image_size=1, image_mtime_ns=1, image_sha256="x",
                model_sha256="m", detected_at=0, processed_at=0,
                stats=layer_stats(np.zeros((len(names), 8, 8), bool), names,
                                  pixel_size_mm=0.1)))
        ev = AlarmEvent("open", "", "B2", 1, "spatter", "spatter.area_mm2", "warning", 1.0, 0.5)
        (rec,) = writes.apply_alarm(s, bid, ev, now=1.0)
        writes.set_verdict(s, rec.id, "false_alarm", None, now=2.0)
    engine.dispose()
    runner = CliRunner()
    r = runner.invoke(main, ["mark-good", "B1", "--config", str(path)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "adapted.safetensors"
    r = runner.invoke(main, ["adapt", "--config", str(path), "--steps", "2", "--out", str(out),
                             "--device", "cpu"])
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["data"]["good_layers"] == {"B1": [1, 2, 3]}  # layer 4 held out
    assert card["data"]["held_out_layers"] == {"B1": [4]}
    assert card["data"]["verdicts"] == [{"build": "B2", "layer": 1, "class": "spatter",
                                         "verdict": "false_alarm"}]
    assert (r.exit_code == 0) == card["written"] == out.is_file(), r.output


def test_misprint_is_not_pasted_when_the_slice_reading_finds_it(printer: Path,
                                                                 tmp_path: Path) -> None:
    """adapt pastes the classes it is told to: without misprint (what it does when
    geometry.stray_track_z finds misprint by its texture), no tile carries a misprint label,
    while the other pasted classes still come."""
    from monitor.training.adapt import _Batches, _load_layers
    from monitor.training.paste import PASTED
    from monitor.vision.segmenter import Segmenter

    flat = make_weights(tmp_path / "f.safetensors", norm="flat")
    cfg = load_config(_config(tmp_path, printer, flat))
    site = Site(printer_of(cfg.fleet(), None))
    layers = _load_layers(site, site.layers(["B1"]), DEFAULT_CLASS_NAMES, AdaptOptions(),
                          good=True, verdicts={}, before=Segmenter.from_config(cfg))
    opts = AdaptOptions(tile=128, batch=8, paste_share=1.0, synth_share=0.0)
    m = DEFAULT_CLASS_NAMES.index("misprint")
    for pasted, want in ((PASTED, True), ([c for c in PASTED if c != "misprint"], False)):
        batches = _Batches(layers, [], DEFAULT_CLASS_NAMES, opts, soft=False, pasted=pasted)
        labels = [batches.batch(step)[1] for step in range(6)]
        assert any(float(y[:, m].sum()) > 0 for y in labels) == want, pasted
        assert any(float(y[:, 1:].sum()) > 0 for y in labels)


@pytest.mark.parametrize("norm", ["flat", "flat-soft"])
def test_real_tiles_are_what_the_served_model_sees(printer: Path, tmp_path: Path,
                                                   norm: str) -> None:
    """Real tiles are flattened like the Segmenter flattens a layer (an 8-bit layer once
    went in unscaled: every pixel clipped at +8), and a good layer has no defect target."""
    from monitor.training.adapt import _Batches, _load_layers
    from monitor.vision.imaging import flatten
    from monitor.vision.segmenter import Segmenter

    flat = make_weights(tmp_path / "f.safetensors", norm=norm)
    cfg = load_config(_config(tmp_path, printer, flat))
    site = Site(printer_of(cfg.fleet(), None))
    layers = _load_layers(site, site.layers(["B1"])[:1], DEFAULT_CLASS_NAMES, AdaptOptions(),
                          good=True, verdicts={}, before=Segmenter.from_config(cfg))
    soft = norm == "flat-soft"
    batches = _Batches(layers, [], DEFAULT_CLASS_NAMES,
                       AdaptOptions(tile=64, batch=6, paste_share=0.0, synth_share=0.0),
                       soft=soft)
    x, y, _ = batches.batch(0)
    whole = flatten(layers[0].gray.astype(np.float32) / 255.0, soft=soft)
    lo, hi = float(whole.min()), float(whole.max())
    assert float(x.min()) >= lo - 1e-4 and float(x.max()) <= hi + 1e-4
    assert float((x.abs() > 7.9).float().mean()) < 0.05
    assert float(y[:, 1:].sum()) == 0.0  # a good layer: no defect anywhere
