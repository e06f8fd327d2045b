from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import get_args

import pytest
from pydantic import BaseModel

from monitor.config import REPO_ROOT, Config, load_config
from monitor.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.model.device == "auto"
    assert cfg.publish.endpoint == "tcp://127.0.0.1:5556"
    assert cfg.watch.dir == tmp_path / "watch"  # relative to the config file


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[watch]\nsettle_s = 0.5\n[camera]\npixel_size_mm = 0.05\n"))
    assert cfg.watch.settle_s == 0.5
    assert cfg.watch.queue_size == 64
    assert cfg.camera.pixel_size_mm == 0.05
    assert cfg.store_url == f"sqlite:///{cfg.state_dir / 'pbf-monitor.db'}"


@pytest.mark.parametrize(
    ("text", "key", "expects"),
    [
        ("[watch]\nsettle = 1\n", "watch.settle: unknown key", "did you mean 'settle_s'"),
        ("[wach]\ndir = 'x'\n", "wach: unknown key", "known: watch, model"),
        ("[watch]\nsettle_s = 'soon'\n", "watch.settle_s",
         "a valid number, unable to parse string as a number (got 'soon')"),
        ("[watch]\nsettle_s = -1\n", "watch.settle_s", "greater than 0 (got -1)"),
        ("[model]\ndevice = 'tpu'\n", "model.device", "'auto', 'cpu' or 'cuda' (got 'tpu')"),
        ("[model]\ntile_size = 100\n", "model.tile_size", "multiple of 16, got 100"),
        ("[model]\nthresholds = { spatter = 2.0 }\n", "model.thresholds.spatter",
         "less than or equal to 1 (got 2.0)"),
        ("[watch]\npattern = '(?P<build>x)'\n", "watch.pattern", "(?P<layer>"),
        ("[watch]\npattern = '(unclosed'\n", "watch.pattern", "regular expression"),
        ("[publish]\nendpoint = 'localhost:5556'\n", "publish.endpoint", "expected tcp://"),
        ("[model]\nsha256 = 'abc'\n", "model.sha256", "64 hex digits"),
        ("[log]\nlevel = 'LOUD'\n", "log.level", "'DEBUG', 'INFO'"),
        ("[store]\nurl = 'mysql://db'\n", "store.url", "postgresql+psycopg://"),
        ("watch = 3\n", "watch", "expected a table"),
        ("[alarms]\nrules = [{ class = 'spatter', metric = 'area', threshold = 0.1 }]\n",
         "alarms.rules.0.metric", "'area_fraction', 'area_mm2'"),
        ("[alarms]\nrules = [{ clas = 'spatter' }]\n", "alarms.rules.0.clas",
         "did you mean 'class'"),
        ("[[printers]]\nname = 'a'\n[printers.watch]\ndirr = 'x'\n",
         "printers.0.watch.dirr", "did you mean 'dir'"),
        ("[alarms]\nrules = [{ metric = 'components', threshold = 3 }]\n",
         "alarms.rules.0.class", "required, and missing"),
        ("not toml at all [\n", "not valid TOML", "line 1"),
    ],
)
def test_errors_name_the_key_and_what_it_expects(tmp_path: Path, text: str, key: str,
                                                 expects: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert key in str(e.value)
    assert expects in str(e.value)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_state_directory_from_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "st"))
    assert load_config(write(tmp_path, "")).state_dir == tmp_path / "st"


def _documented(model: type[BaseModel], text: str, where: str) -> None:
    """Every key of a config model (and of nested ones) is in config.toml with a comment."""
    for key, field in model.model_fields.items():
        name = field.alias or key
        ann = field.annotation
        args = get_args(ann)
        inner = args[0] if args and isinstance(args[0], type) else None
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            assert f"[{where}.{name}]" in text, f"[{where}.{name}] section"
            _documented(ann, text, f"{where}.{name}")
        elif inner is not None and issubclass(inner, BaseModel):
            # A list of tables: each key is explained in the comment above the list.
            assert f"\n{name} =" in text or f"[[{name}]]" in text, f"{where}.{name}"
            for sub in inner.model_fields.values():
                sub_name = sub.alias or next(k for k, v in inner.model_fields.items()
                                             if v is sub)
                assert re.search(rf"#\s+{sub_name}\s", text), f"{where}.{name}.{sub_name}"
        else:
            assert f"\n{name} =" in text or f"\n# {name} =" in text, f"[{where}] {name}"


def test_repo_config_is_valid_and_documents_every_key() -> None:
    path = REPO_ROOT / "config.toml"
    cfg = load_config(path)
    text = path.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    for section, model in Config.model_fields.items():
        if section == "source":
            continue
        ann = model.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            assert section in data
            _documented(ann, text, section)
        else:  # [[regions]]: documented, none by default
            (inner,) = [a for a in get_args(ann) if a is not Ellipsis]
            for key in inner.model_fields:
                assert re.search(rf"#\s+{key}\s", text), f"regions.{key}"
            assert f"# [[{section}]]" in text
    assert cfg.model.weights.name == "default.safetensors"
    lines = text.splitlines()
    for line_no, line in enumerate(lines):
        if line and not line.startswith(("#", "[", " ", "]")):
            assert lines[line_no - 1].startswith("#"), f"key without a comment: {line}"
