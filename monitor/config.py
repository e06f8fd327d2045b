"""config.toml -> validated, frozen objects.

Every section and key has a default, so a file that sets only some keys works. Unknown keys
and wrong types are rejected with a message that names the key. Relative paths are resolved
against the folder of the config file (or the working directory when there is none).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from monitor.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "default.safetensors"
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchConfig(_Section):
    dir: Path = Field(Path("watch"), description="Folder the camera writes layer images into.")
    recursive: bool = Field(True, description="Also watch sub-folders (one per build).")
    pattern: str = Field(
        "",
        description="Regex with named groups 'build' and 'layer' matched against the path "
        "relative to dir; empty = first folder is the build, last digits are the layer.",
    )
    extensions: tuple[str, ...] = Field(IMAGE_EXTENSIONS, description="Image file extensions.")
    polling: bool = Field(False, description="Poll instead of inotify (network shares).")
    poll_interval_s: PositiveFloat = Field(1.0, description="Polling period.")
    settle_s: PositiveFloat = Field(
        2.0, description="A file with no close event is complete once unchanged this long."
    )
    rescan_interval_s: float = Field(
        60.0, ge=0, description="Rescan the folder against the database (0 = only at start)."
    )
    decode_retries: int = Field(2, ge=0, description="Retries of a file that fails to decode.")
    retry_delay_s: PositiveFloat = Field(1.0, description="Delay before each retry.")
    queue_size: int = Field(64, ge=1, description="Ready files waiting for the worker.")
    max_file_mb: PositiveFloat = Field(512.0, description="Larger files are refused.")
    max_pixels: int = Field(
        200_000_000, ge=1, description="Images with more pixels are refused before decoding."
    )

    @field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        if not value:
            return value
        try:
            compiled = re.compile(value)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from e
        missing = {"build", "layer"} - set(compiled.groupindex)
        if missing:
            raise ValueError(f"needs named groups (?P<build>...) and (?P<layer>...); "
                             f"missing {sorted(missing)}")
        return value

    @field_validator("extensions")
    @classmethod
    def _lower_extensions(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in value)


class ModelConfig(_Section):
    weights: Path = Field(DEFAULT_WEIGHTS, description="safetensors weights file.")
    sha256: str = Field("", description="If set, the weights file must have this sha256.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device.")
    tile_size: int = Field(1024, ge=64, description="Tile side for large images (multiple of 16).")
    tile_overlap: int = Field(64, ge=0, description="Overlap between tiles in pixels.")
    threshold: Probability = Field(
        0.5, description="Threshold for classes neither thresholds nor the weights set."
    )
    thresholds: dict[str, Probability] = Field(
        default_factory=dict,
        description="Per-class thresholds overriding the weights' and 'threshold'.",
    )

    @field_validator("tile_size")
    @classmethod
    def _tile_multiple(cls, value: int) -> int:
        if value % 16:
            raise ValueError(f"must be a multiple of 16, got {value}")
        return value

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if value and not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError("must be 64 hex digits or empty")
        return value.lower()


class CameraConfig(_Section):
    pixel_size_mm: PositiveFloat = Field(0.1, description="Bed size of one pixel in mm.")
    layer_thickness_mm: PositiveFloat = Field(0.05, description="Powder layer thickness in mm.")


class StoreConfig(_Section):
    state_dir: Path | None = Field(None, description="State folder (database, caches).")
    url: str = Field("", description="SQLAlchemy URL; empty = SQLite file in state_dir.")
    max_components: int = Field(
        200, ge=0, description="Largest components stored per layer and class."
    )


class PublishConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB bind endpoint.")
    heartbeat_interval_s: PositiveFloat = Field(5.0, description="Heartbeat period.")
    send_hwm: int = Field(10_000, ge=1, description="Messages queued per slow subscriber.")
    startup_grace_s: float = Field(
        1.0, ge=0, description="Hold messages this long after binding so subscribers reconnect."
    )

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.fullmatch(r"(tcp|ipc|inproc)://\S+", value):
            raise ValueError(
                f"expected tcp://HOST:PORT, ipc://PATH or inproc://NAME, got {value!r}"
            )
        return value


class AlarmsConfig(_Section):
    area_fraction: dict[str, Probability] = Field(
        default_factory=lambda: {
            "swelling": 0.002,
            "spatter": 0.01,
            "misprint": 0.005,
            "over_melting": 0.01,
            "under_melting": 0.01,
        },
        description="Alarm when a class covers more than this fraction of a layer.",
    )
    severity: Literal["warning", "critical"] = Field("warning", description="Alarm severity.")


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


class Config(_Section):
    watch: WatchConfig = WatchConfig()
    model: ModelConfig = ModelConfig()
    camera: CameraConfig = CameraConfig()
    store: StoreConfig = StoreConfig()
    publish: PublishConfig = PublishConfig()
    alarms: AlarmsConfig = AlarmsConfig()
    log: LogConfig = LogConfig()
    source: Path | None = Field(None, exclude=True, description="File this config came from.")

    @property
    def state_dir(self) -> Path:
        assert self.store.state_dir is not None  # resolved by load_config
        return self.store.state_dir

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'pbf-monitor.db'}"


def default_state_dir() -> Path:
    """systemd's StateDirectory, else the XDG state folder."""
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "pbf-monitor"


def _format_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"


def parse_config(data: dict[str, Any], *, base_dir: Path, source: Path | None = None) -> Config:
    """Validate a config mapping and resolve its relative paths against base_dir."""
    where = str(source) if source else "config"
    try:
        cfg = Config.model_validate({**data, "source": source})
    except ValidationError as e:
        raise ConfigError(_format_error(e, where)) from e

    def resolve(p: Path) -> Path:
        p = p.expanduser()
        return p if p.is_absolute() else (base_dir / p).resolve()

    return cfg.model_copy(
        update={
            "watch": cfg.watch.model_copy(update={"dir": resolve(cfg.watch.dir)}),
            "model": cfg.model.model_copy(update={"weights": resolve(cfg.model.weights)}),
            "store": cfg.store.model_copy(
                update={"state_dir": resolve(cfg.store.state_dir or default_state_dir())}
            ),
        }
    )


def load_config(path: Path | None) -> Config:
    """Load and validate a config file; None gives the defaults relative to the working dir."""
    if path is None:
        return parse_config({}, base_dir=Path.cwd())
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    return parse_config(data, base_dir=path.resolve().parent, source=path)
