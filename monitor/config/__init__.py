"""config.toml -> validated, frozen objects.

Every section and key has a default, so a file that sets only some keys works. Unknown keys
and wrong types are rejected with a message that names the key. Relative paths are resolved
against the folder of the config file (or the working directory when there is none).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, model_validator

from monitor.config.alarms import (
    AlarmRule,
    AlarmsConfig,
    HookConfig,
    Metric,
    PartAlarmsConfig,
    RegionConfig,
    Severity,
    StallConfig,
    TracksConfig,
)
from monitor.config.base import (
    DEFAULT_MIN_COMPONENT_MM2,
    DEFAULT_WEIGHTS,
    IMAGE_EXTENSIONS,
    REPO_ROOT,
    PositiveFloat,
    Probability,
    Section,
)
from monitor.config.plant import (
    MqttConfig,
    OpcuaConfig,
)
from monitor.config.sections import (
    DEFAULT_TILE_SIZE,
    GEOMETRY_VECTOR_SUFFIXES,
    CameraConfig,
    GeometryConfig,
    LogConfig,
    MetricsConfig,
    ModelConfig,
    PublishConfig,
    StoreConfig,
    WatchConfig,
    check_geometry,
)
from monitor.errors import ConfigError


class PrinterConfig(Section):
    """One printer of a fleet on this host: its own watch folder, pattern and camera."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Printer name (in messages).")
    watch: WatchConfig = WatchConfig()
    camera: CameraConfig = CameraConfig()
    geometry: GeometryConfig = GeometryConfig()

    @model_validator(mode="after")
    def _geometry(self) -> PrinterConfig:
        check_geometry(self.camera, self.geometry, "")
        return self



class Config(Section):
    watch: WatchConfig = WatchConfig()
    model: ModelConfig = ModelConfig()
    camera: CameraConfig = CameraConfig()
    geometry: GeometryConfig = GeometryConfig()
    store: StoreConfig = StoreConfig()
    publish: PublishConfig = PublishConfig()
    alarms: AlarmsConfig = AlarmsConfig()
    regions: tuple[RegionConfig, ...] = ()
    printers: tuple[PrinterConfig, ...] = ()
    metrics: MetricsConfig = MetricsConfig()
    opcua: OpcuaConfig = OpcuaConfig()
    mqtt: MqttConfig = MqttConfig()
    log: LogConfig = LogConfig()
    source: Path | None = Field(None, exclude=True, description="File this config came from.")

    @property
    def state_dir(self) -> Path:
        assert self.store.state_dir is not None  # resolved by load_config
        return self.store.state_dir

    @model_validator(mode="after")
    def _distinct_printers(self) -> Config:
        names = [p.name for p in self.printers]
        if len(set(names)) != len(names):
            raise ValueError("printers: two printers share a name")
        check_geometry(self.camera, self.geometry, "")
        return self

    def fleet(self) -> list[PrinterConfig]:
        """The printers to watch: [[printers]], or the single [watch]/[camera]/[geometry]
        one, named ""."""
        return list(self.printers) or [PrinterConfig.model_construct(
            name="", watch=self.watch, camera=self.camera, geometry=self.geometry)]

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.state_dir / 'pbf-monitor.db'}"


def default_state_dir() -> Path:
    """systemd's StateDirectory, else the XDG state folder."""
    if env := os.environ.get("STATE_DIRECTORY"):
        return Path(env.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "pbf-monitor"


def _section_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the section holding `loc` accepts ([] if it is not a fixed section)."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        if field is None:
            return []
        ann = field.annotation
        # tuple[X, ...] / X | None: the model inside
        inner = [a for a in getattr(ann, "__args__", (ann,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    fields = model.model_fields if hasattr(model, "model_fields") else {}
    return [f.alias or name for name, f in fields.items() if not f.exclude]


def _format_error(err: ValidationError, where: str) -> str:
    """One line: the key, what it expects, and what it got."""
    errors = err.errors()
    # A misspelt required key is both unknown and missing: the unknown one explains it.
    first = min(errors, key=lambda e: e["type"] != "extra_forbidden")
    key = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    got = first.get("input")
    if first["type"] == "extra_forbidden":
        import difflib

        known = _section_keys(tuple(first["loc"]))
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "") + (
            f" (known: {', '.join(known)})" if known else "")
    elif first["type"] == "missing":
        msg = "required, and missing"
    elif first["type"] in ("model_type", "dict_type"):
        msg = f"expected a table (a [section] or {{ key = value }}), got {got!r}"
    elif "input" in first and not isinstance(got, dict) and "got" not in msg:
        msg = f"{msg} (got {got!r})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {key}: {msg}{more}" if key else f"{where}: {msg}{more}"


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

    pub = cfg.publish

    def resolve_geometry(g: GeometryConfig) -> GeometryConfig:
        return g.model_copy(update={"nominal": str(resolve(Path(g.nominal)))}) if g.nominal \
            else g

    return cfg.model_copy(
        update={
            "watch": cfg.watch.model_copy(update={"dir": resolve(cfg.watch.dir)}),
            "model": cfg.model.model_copy(update={"weights": resolve(cfg.model.weights)}),
            "geometry": resolve_geometry(cfg.geometry),
            "store": cfg.store.model_copy(
                update={"state_dir": resolve(cfg.store.state_dir or default_state_dir())}
            ),
            "publish": pub.model_copy(update={
                "curve_secret_key": pub.curve_secret_key and resolve(pub.curve_secret_key),
                "curve_authorized_dir": (pub.curve_authorized_dir
                                         and resolve(pub.curve_authorized_dir)),
            }),
            "opcua": cfg.opcua.model_copy(update={
                k: v and resolve(v) for k, v in (
                    ("certificate", cfg.opcua.certificate),
                    ("private_key", cfg.opcua.private_key),
                    ("users_file", cfg.opcua.users_file),
                    ("trusted_client_certs_dir", cfg.opcua.trusted_client_certs_dir))}),
            "mqtt": cfg.mqtt.model_copy(update={
                k: v and resolve(v) for k, v in (
                    ("ca_file", cfg.mqtt.ca_file), ("cert_file", cfg.mqtt.cert_file),
                    ("key_file", cfg.mqtt.key_file), ("password_file", cfg.mqtt.password_file))}),
            "regions": tuple(
                r.model_copy(update={"mask": str(resolve(Path(r.mask)))}) if r.mask else r
                for r in cfg.regions
            ),
            "printers": tuple(
                p.model_copy(update={
                    "watch": p.watch.model_copy(update={"dir": resolve(p.watch.dir)}),
                    "geometry": resolve_geometry(p.geometry)})
                for p in cfg.printers
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

__all__ = [
    "DEFAULT_MIN_COMPONENT_MM2",
    "DEFAULT_TILE_SIZE",
    "DEFAULT_WEIGHTS",
    "GEOMETRY_VECTOR_SUFFIXES",
    "IMAGE_EXTENSIONS",
    "REPO_ROOT",
    "AlarmRule",
    "AlarmsConfig",
    "CameraConfig",
    "Config",
    "GeometryConfig",
    "HookConfig",
    "LogConfig",
    "Metric",
    "MetricsConfig",
    "ModelConfig",
    "MqttConfig",
    "OpcuaConfig",
    "PartAlarmsConfig",
    "PositiveFloat",
    "PrinterConfig",
    "Probability",
    "PublishConfig",
    "RegionConfig",
    "Section",
    "Severity",
    "StallConfig",
    "StoreConfig",
    "TracksConfig",
    "WatchConfig",
    "default_state_dir",
    "load_config",
    "parse_config",
]
