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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from monitor.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "default.safetensors"
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

PositiveFloat = Annotated[float, Field(gt=0)]
# Over-melted regions are larger than spatter specks, which the default model also sees as
# bright; dropping small over-melting components removes most of its false positives.
DEFAULT_MIN_COMPONENT_MM2 = {"swelling": 0.05, "misprint": 0.05, "over_melting": 0.5,
                             "under_melting": 0.05}
Probability = Annotated[float, Field(ge=0.0, le=1.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WatchConfig(_Section):
    dir: Path = Field(Path("watch"), description="Folder the camera writes layer images into.")
    create: bool = Field(
        False, description="Create dir if it is missing (else a missing dir stops the start)."
    )
    recursive: bool = Field(True, description="Also watch sub-folders (one per build).")
    pattern: str = Field(
        "",
        description="Regex with named groups 'build' and 'layer' matched against the path "
        "relative to dir; empty = first folder is the build, last digits are the layer.",
    )
    layer_from: Literal["number", "height_um", "height_mm"] = Field(
        "number", description="What the layer number in the file name is: the layer index, or "
        "the build height in um or mm (layer = round(height / camera.layer_thickness_mm))."
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


# A 2048 px layer is served whole (the fastest on a CPU: no overlap); a 4096 px layer in
# 3x3 tiles of 1408 px peaks at 1.15 GB.
DEFAULT_TILE_SIZE = 2048


class ModelConfig(_Section):
    weights: Path = Field(DEFAULT_WEIGHTS, description="safetensors weights file.")
    sha256: str = Field("", description="If set, the weights file must have this sha256.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Compute device.")
    backend: Literal["auto", "torch", "openvino", "onnxruntime"] = Field(
        "auto", description="Inference engine; auto = the fastest installed for the device."
    )
    cpu_precision: Literal["f32", "bf16"] = Field(
        "f32", description="OpenVINO's CPU precision; bf16 is faster where the CPU has it."
    )
    batch_size: int = Field(
        0, ge=0, description="Tiles per model call when layers queue up (0 = 8 on a GPU, 1 on "
        "a CPU)."
    )
    tile_size: int = Field(
        DEFAULT_TILE_SIZE, ge=64, description="Largest tile side (a multiple of 16)."
    )
    tile_overlap: int = Field(64, ge=0, description="Overlap between tiles in pixels.")
    threshold: Probability = Field(
        0.5, description="Threshold for classes neither thresholds nor the weights set."
    )
    thresholds: dict[str, Probability] = Field(
        default_factory=dict,
        description="Per-class thresholds overriding the weights' and 'threshold'.",
    )
    min_component_mm2: dict[str, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_MIN_COMPONENT_MM2),
        description="Per class: smaller connected components are dropped from the mask.",
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
    id: str = Field(
        "", description="Names this camera; weights adapted to it (their adapted_cameras) "
        "are trusted for critical defect alarms. Empty = unnamed (never adapted)."
    )
    pixel_size_mm: PositiveFloat = Field(0.1, description="Bed size of one pixel in mm.")
    layer_thickness_mm: PositiveFloat = Field(0.05, description="Powder layer thickness in mm.")
    plate_corners_px: tuple[tuple[float, float], ...] | None = Field(
        None, description="Where the nominal frame's 4 corners appear in the image, [x, y] "
        "clockwise from top-left; unset = the frame is the whole image."
    )

    @field_validator("plate_corners_px")
    @classmethod
    def _four_corners(
        cls, value: tuple[tuple[float, float], ...] | None
    ) -> tuple[tuple[float, float], ...] | None:
        if value is not None and len(value) != 4:
            raise ValueError(f"needs exactly 4 corners [x, y], got {len(value)}")
        return value


GEOMETRY_VECTOR_SUFFIXES = (".cli", ".stl", ".3mf", ".obj", ".ply")


class GeometryConfig(_Section):
    """Nominal geometry: each layer's expected part area, compared with the printed one."""

    nominal: str = Field(
        "", description="Path template of the nominal slices ({build}, {layer}, {stem}): mask "
        "images, or one .cli or mesh (.stl, .3mf) file per build; empty = off."
    )
    frame_mm: tuple[float, float, float, float] | None = Field(
        None, description="Plate area [x0, y0, w, h] in mm the nominal frame covers."
    )
    frame_px: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]] | None = Field(
        None, description="[width, height] of the nominal frame in pixels; unset = the mask's "
        "size, or the image's for .cli and mesh slices."
    )
    tolerance_mm: float = Field(
        0.5, ge=0, description="Printed pixels this close outside a part's outline are the part."
    )
    printed_smooth_px: int = Field(
        4, ge=1, description="Half-width in image pixels of the printed-area texture window."
    )
    printed_min_separation: float = Field(
        1.0, ge=0, description="Melt/powder contrast below which a layer counts as unprinted."
    )

    @model_validator(mode="after")
    def _vector_needs_frame(self) -> GeometryConfig:
        if Path(self.nominal).suffix.lower() in GEOMETRY_VECTOR_SUFFIXES and \
                self.frame_mm is None:
            raise ValueError("frame_mm is required for .cli and mesh slices: set "
                             "geometry.frame_mm = [x0, y0, w, h], the plate area in mm the "
                             "nominal frame covers")
        return self


def _check_geometry(camera: CameraConfig, geometry: GeometryConfig, where: str) -> None:
    """An oblique camera has no single pixel size: mm need the frame's size in mm."""
    if geometry.nominal and camera.plate_corners_px is not None and geometry.frame_mm is None:
        raise ValueError(f"{where}geometry.frame_mm is required with camera.plate_corners_px: "
                         "set it to [x0, y0, w, h], the plate area in mm the frame covers")


class StoreConfig(_Section):
    state_dir: Path | None = Field(None, description="State folder (database, caches).")
    url: str = Field("", description="SQLAlchemy URL; empty = SQLite file in state_dir.")

    @field_validator("url")
    @classmethod
    def _supported_url(cls, value: str) -> str:
        if value and not re.match(r"(sqlite|postgresql)(\+\w+)?://", value):
            raise ValueError("expected empty (SQLite in store.state_dir), sqlite:///PATH or "
                             f"postgresql+psycopg://USER:PASSWORD@HOST/DB, got {value!r}")
        return value
    max_components: int = Field(
        200, ge=0, description="Largest components stored per layer and class."
    )
    maps: bool = Field(True, description="Store each layer's defect map and thumbnail.")
    map_max_side: int = Field(512, ge=32, description="Longest side of stored maps, pixels.")
    maps_keep_days: float = Field(
        180.0, ge=0, description="Delete maps older than this (0 = keep); statistics stay."
    )
    maps_min_free_mb: float = Field(
        1024.0, ge=0, description="Below this free space, delete the oldest maps (0 = off)."
    )


class PublishConfig(_Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ PUB bind endpoint.")
    heartbeat_interval_s: PositiveFloat = Field(5.0, description="Heartbeat period.")
    send_hwm: int = Field(10_000, ge=1, description="Messages queued per slow subscriber.")
    startup_grace_s: float = Field(
        1.0, ge=0, description="Hold messages this long after binding so subscribers reconnect."
    )
    state_endpoint: str = Field(
        "tcp://127.0.0.1:5557", description="REP endpoint answering state and commands."
    )
    curve_secret_key: Path | None = Field(
        None, description="Server secret key file; set = CURVE on both endpoints."
    )
    curve_authorized_dir: Path | None = Field(
        None, description="Folder of client public keys allowed to connect."
    )

    @field_validator("endpoint", "state_endpoint")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if not re.fullmatch(r"(tcp|ipc|inproc)://\S+", value):
            raise ValueError(
                f"expected tcp://HOST:PORT, ipc://PATH or inproc://NAME, got {value!r}"
            )
        return value

    @model_validator(mode="after")
    def _curve_pair(self) -> PublishConfig:
        if (self.curve_secret_key is None) != (self.curve_authorized_dir is None):
            raise ValueError("curve_secret_key and curve_authorized_dir go together: set both "
                             "(CURVE on) or neither")
        return self


Metric = Literal["area_fraction", "area_mm2", "components", "largest_component_mm2"]
Severity = Literal["warning", "critical"]


class AlarmRule(_Section):
    """One threshold rule: `metric` of `class` (in a region, or the whole layer) above
    `threshold` for `consecutive` layers opens an alarm."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field("", description="Rule id in alarms (default: class.metric[@region]).")
    class_name: str = Field(alias="class", description="Class name from the weights file.")
    metric: Metric = Field("area_fraction", description="Statistic compared with threshold.")
    threshold: float | None = Field(
        None, ge=0, description="Absolute rules: the condition is metric > threshold "
        "(required). Relative rules: a floor the limit never goes below (default 0)."
    )
    relative: bool = Field(
        False, description="Compare the metric with its running baseline in this build: "
        "limit = max(threshold, baseline * factor, baseline + min_delta, "
        "baseline + mad_k * 1.4826 * MAD), baseline = median of the last 'window' layers."
    )
    factor: float = Field(3.0, ge=1, description="Relative rules: multiple of the baseline.")
    min_delta: float = Field(
        0.0, ge=0, description="Relative rules: least rise above the baseline, in the "
        "metric's unit."
    )
    mad_k: float = Field(
        0.0, ge=0, description="Relative rules: rises within this many robust standard "
        "deviations (1.4826 * MAD) of the window are noise; 0 = off."
    )
    window: int = Field(20, ge=2, description="Relative rules: layers the baseline spans.")
    learn_layers: int = Field(
        5, ge=1, description="Relative rules: layers seen before the rule checks anything."
    )
    severity: Severity = Field("warning", description="warning or critical.")
    consecutive: int = Field(2, ge=1, description="Layers in a row the condition must hold.")
    grace_layers: int | None = Field(
        None, ge=0, description="Layers at the start of a build not checked (default: alarms)."
    )
    cooldown_layers: int = Field(
        10, ge=0, description="Layers after an alarm opens before this rule may open another."
    )
    region: str = Field("", description="A [[regions]] part region; empty = whole layer.")
    scope: Literal["parts", "plate"] = Field(
        "parts", description="With nominal slices: 'parts' counts defects on and around the "
        "parts only (nominal grown by geometry.tolerance_mm; area_fraction of that zone), "
        "'plate' the whole layer. No effect without slices, with a region, or for no_defect."
    )

    @model_validator(mode="after")
    def _threshold(self) -> AlarmRule:
        if self.threshold is None and not self.relative:
            raise ValueError("threshold: required unless relative = true")
        if self.relative and self.learn_layers > self.window:
            raise ValueError(f"learn_layers ({self.learn_layers}) cannot exceed window "
                             f"({self.window})")
        return self

    @property
    def floor(self) -> float:
        """The absolute threshold (relative rules: the least limit)."""
        return self.threshold or 0.0

    @property
    def rule_id(self) -> str:
        if self.name:
            return self.name
        return f"{self.class_name}.{self.metric}" + (f"@{self.region}" if self.region else "")


def _default_rules() -> tuple[AlarmRule, ...]:
    # Defect classes compare with the build's own baseline: a model that sees a constant
    # amount of a class on a healthy build (bias, lighting, a camera it was not trained on)
    # never alarms, a jump does. The absolute thresholds are floors below which nothing
    # alarms whatever the history; a large component is dangerous whatever came before, so
    # the critical rules keep a high absolute floor as well.
    rel: dict[str, Any] = {"relative": True, "window": 20, "learn_layers": 5, "mad_k": 4.0}
    spec: list[dict[str, Any]] = [
        {"class": "swelling", "metric": "area_mm2", "threshold": 2.0, **rel,
         "factor": 3.0, "min_delta": 2.0},
        {"class": "swelling", "metric": "largest_component_mm2", "threshold": 5.0,
         "severity": "critical", "consecutive": 3, **rel, "factor": 3.0, "min_delta": 5.0},
        {"class": "spatter", "metric": "components", "threshold": 60, "consecutive": 3, **rel,
         "factor": 3.0, "min_delta": 30},
        {"class": "misprint", "metric": "area_mm2", "threshold": 2.0, **rel,
         "factor": 3.0, "min_delta": 2.0},
        {"class": "over_melting", "metric": "area_fraction", "threshold": 0.005, **rel,
         "factor": 3.0, "min_delta": 0.005},
        {"class": "under_melting", "metric": "area_fraction", "threshold": 0.005, **rel,
         "factor": 3.0, "min_delta": 0.005},
        {"class": "under_melting", "metric": "largest_component_mm2", "threshold": 5.0,
         "severity": "critical", "consecutive": 3, **rel, "factor": 3.0, "min_delta": 5.0},
    ]
    return tuple(AlarmRule.model_validate(r) for r in spec)


class TracksConfig(_Section):
    """Defects that stack: components linked from layer to layer."""

    classes: tuple[str, ...] = Field(
        ("swelling", "misprint", "over_melting", "under_melting"),
        description="Classes tracked through layers (empty = no tracking).",
    )
    link_distance_mm: float = Field(
        0.5, ge=0, description="Components closer than this in consecutive layers link."
    )
    max_gap_layers: int = Field(1, ge=0, description="Layers a track may skip and go on.")
    min_area_mm2: float = Field(0.05, ge=0, description="Smaller components are not tracked.")
    alarm_layers: int = Field(5, ge=2, description="A track this many layers long alarms.")
    alarm_volume_mm3: float = Field(
        1.0, gt=0,
        description="A track of 2+ layers whose volume (area x layer thickness) exceeds this "
        "alarms.",
    )
    severity: Severity = Field("critical", description="Severity of track alarms.")
    one_per_part: bool = Field(
        True, description="While a track alarm of a class is open on a part (or off the "
        "parts), other tracks of that class there open none; they may once it clears."
    )


class PartAlarmsConfig(_Section):
    """Alarms per nominal part (with [geometry] nominal): missing or grown past its outline."""

    enabled: bool = Field(True, description="Raise part alarms when slices are configured.")
    missing_fraction: float = Field(
        0.5, ge=0, le=1, description="A part printed below this fraction of its nominal area "
        "is missing (broken off, recoater crash, not exposed)."
    )
    missing_layers: int = Field(2, ge=1, description="Layers in a row a part must be missing.")
    missing_severity: Severity = Field("critical", description="Severity of part_missing.")
    excess_fraction: float = Field(
        0.25, ge=0, description="Printed area outside the part's tolerance zone, as a fraction "
        "of its nominal area, above which it is in excess (distortion, swelling, exposure "
        "outside the part)."
    )
    excess_layers: int = Field(2, ge=1, description="Layers in a row a part must be in excess.")
    excess_severity: Severity = Field("warning", description="Severity of part_excess.")
    grace_layers: int | None = Field(
        None, ge=0, description="Layers at the start of a build not checked (default: alarms)."
    )
    cooldown_layers: int = Field(
        10, ge=0, description="Layers after a part's alarm opens before it may open another."
    )


class StallConfig(_Section):
    """No new layer in an active build for too long: camera offline or machine stopped."""

    enabled: bool = Field(True, description="Raise stall alarms.")
    factor: PositiveFloat = Field(
        5.0, description="Alarm after this many times the build's median layer interval."
    )
    min_s: float = Field(60.0, ge=0, description="Never alarm sooner than this.")
    min_layers: int = Field(3, ge=2, description="Layers needed to know the interval.")
    active_s: PositiveFloat = Field(
        6 * 3600.0, description="A build with no layer for this long is finished, not stalled."
    )
    severity: Severity = Field("warning", description="Severity of stall alarms.")


class HookConfig(_Section):
    """A command run on alarms, e.g. to pause the machine through its own interface."""

    command: tuple[str, ...] = Field(
        (), description="Program and arguments (no shell); empty = no hook."
    )
    severities: tuple[Severity, ...] = Field(("critical",), description="Alarms that run it.")
    timeout_s: PositiveFloat = Field(10.0, description="The command is killed after this.")


class AlarmsConfig(_Section):
    grace_layers: int = Field(
        3, ge=0, description="Layers at the start of a build that rules do not check."
    )
    rules: tuple[AlarmRule, ...] = Field(default_factory=_default_rules,
                                         description="Threshold rules.")
    trust_unadapted: bool = Field(
        False, description="Trust weights not adapted to this camera: their defect-class "
        "alarms keep their severity and run the hook."
    )
    dashboard_url: str = Field(
        "", description="Dashboard address; alarms then link to their layer's overlay "
        "(url = dashboard_url?build=...&layer=...). Empty = no link."
    )
    tracks: TracksConfig = TracksConfig()
    parts: PartAlarmsConfig = PartAlarmsConfig()
    stall: StallConfig = StallConfig()
    hook: HookConfig = HookConfig()

    @field_validator("rules")
    @classmethod
    def _unique(cls, value: tuple[AlarmRule, ...]) -> tuple[AlarmRule, ...]:
        seen: set[str] = set()
        for r in value:
            if r.rule_id in seen:
                raise ValueError(f"two rules are named {r.rule_id!r}; give one a 'name'")
            seen.add(r.rule_id)
        return value


class RegionConfig(_Section):
    """An ignore region, or a named part region with its own statistics."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Region name.")
    kind: Literal["ignore", "part"] = Field("part", description="ignore or part.")
    polygon: tuple[tuple[float, float], ...] = Field(
        (), description="Corner points [x, y] (at least 3), in units."
    )
    units: Literal["px", "mm"] = Field("px", description="Units of the polygon.")
    mask: str = Field(
        "", description="Mask image per build instead of a polygon; {build} in the path is "
        "replaced by the build id; nonzero pixels are inside."
    )

    @model_validator(mode="after")
    def _one_shape(self) -> RegionConfig:
        if bool(self.polygon) == bool(self.mask):
            raise ValueError("give either polygon or mask")
        if self.polygon and len(self.polygon) < 3:
            raise ValueError("polygon needs at least 3 points")
        return self


class PrinterConfig(_Section):
    """One printer of a fleet on this host: its own watch folder, pattern and camera."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="Printer name (in messages).")
    watch: WatchConfig = WatchConfig()
    camera: CameraConfig = CameraConfig()
    geometry: GeometryConfig = GeometryConfig()

    @model_validator(mode="after")
    def _geometry(self) -> PrinterConfig:
        _check_geometry(self.camera, self.geometry, "")
        return self


class MetricsConfig(_Section):
    listen: str = Field(
        "127.0.0.1:9464", description="HOST:PORT of the Prometheus endpoint; empty = off."
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.fullmatch(r"[^\s:]*:\d{1,5}", value):
            raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9464) or empty, got {value!r}")
        return value


class LogConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


class OpcuaConfig(_Section):
    """The OPC UA server: printers, last layers, open alarms, heartbeat; Ack/Mute methods."""

    enabled: bool = Field(False, description="Serve OPC UA.")
    endpoint: str = Field("opc.tcp://127.0.0.1:4840/pbf-monitor",
                          description="opc.tcp://HOST:PORT/PATH the server binds.")
    security_policy: tuple[Literal["None", "Basic256Sha256_Sign",
                                   "Basic256Sha256_SignAndEncrypt"], ...] = Field(
        ("None",), description="Security policies offered (Basic256Sha256 ones need "
        "certificate and private_key)."
    )
    certificate: Path | None = Field(None, description="Server certificate (DER or PEM).")
    private_key: Path | None = Field(None, description="Server private key (PEM).")
    users_file: Path | None = Field(
        None, description="Lines 'user:password'; those users may read and call methods."
    )
    trusted_client_certs_dir: Path | None = Field(
        None, description="Client certificates (*.der, *.pem) that log in as users."
    )
    anonymous: Literal["write", "read", "off"] = Field(
        "write", description="What a client without user or certificate may do: call the "
        "methods too (write), browse and read (read), nothing (off)."
    )

    @field_validator("endpoint")
    @classmethod
    def _opc_tcp(cls, value: str) -> str:
        if not re.fullmatch(r"opc\.tcp://[^\s/:]+(:\d{1,5})?(/\S*)?", value):
            raise ValueError(f"expected opc.tcp://HOST:PORT/PATH, got {value!r}")
        return value

    @model_validator(mode="after")
    def _safe(self) -> OpcuaConfig:
        if not self.enabled:
            return self
        host = re.sub(r"^opc\.tcp://", "", self.endpoint).split("/")[0].rsplit(":", 1)[0]
        if host not in _LOOPBACK_HOSTS and self.anonymous == "write":
            raise ValueError(f"endpoint {self.endpoint} is not loopback and anonymous = "
                             "\"write\" would let anyone acknowledge and mute alarms: set "
                             "opcua.anonymous = \"read\" or \"off\" and give users_file or "
                             "trusted_client_certs_dir")
        secure = [p for p in self.security_policy if p != "None"]
        if secure and (self.certificate is None or self.private_key is None):
            raise ValueError(f"security_policy {secure} needs opcua.certificate and "
                             "opcua.private_key")
        return self


class MqttConfig(_Section):
    """The MQTT publisher: the ZeroMQ messages, and retained state, on a broker."""

    enabled: bool = Field(False, description="Publish to an MQTT broker.")
    url: str = Field("mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT.")
    printer: str = Field(
        "default", pattern=r"^[^\s/+#]+$",
        description="Topic level after pbf-monitor/ (pbf-monitor/<printer>/layer, ...)."
    )
    ca_file: Path | None = Field(None, description="CA certificate for mqtts (default: system).")
    cert_file: Path | None = Field(None, description="Client certificate for mqtts.")
    key_file: Path | None = Field(None, description="Client private key for mqtts.")
    username: str = Field("", description="Broker user name; empty = none.")
    password_file: Path | None = Field(None, description="File holding the broker password.")
    client_id: str = Field("", description="MQTT client id; empty = pbf-monitor-<printer>.")
    queue_size: int = Field(
        10_000, ge=1, description="Messages waiting for a slow or absent broker; beyond this "
        "the oldest are dropped, counted and logged."
    )
    keepalive_s: int = Field(30, ge=5, description="MQTT keepalive.")

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, value: str) -> str:
        if not re.fullmatch(r"mqtts?://[^\s/:]+(:\d{1,5})?/?", value):
            raise ValueError(f"expected mqtt://HOST:PORT or mqtts://HOST:PORT, got {value!r}")
        return value


class Config(_Section):
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
        _check_geometry(self.camera, self.geometry, "")
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
