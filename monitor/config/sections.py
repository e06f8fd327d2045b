"""The daemon's sections: watch folder, model, camera, geometry, store, publishing, metrics,
log."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from monitor.config.base import (
    DEFAULT_MIN_COMPONENT_MM2,
    DEFAULT_OUTSIDE_THRESHOLDS,
    DEFAULT_WEIGHTS,
    IMAGE_EXTENSIONS,
    PositiveFloat,
    Probability,
    Section,
)


class WatchConfig(Section):
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


class ModelConfig(Section):
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
    outside_thresholds: dict[str, Probability] = Field(
        default_factory=lambda: dict(DEFAULT_OUTSIDE_THRESHOLDS),
        description="Per class: its threshold beyond the nominal parts' tolerance zone, out "
        "to geometry.outside_reach_mm (with slices only; melt outside the part by definition).",
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


class CameraConfig(Section):
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


class GeometryConfig(Section):
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
    outside_classes: tuple[str, ...] = Field(
        ("misprint",), description="Classes that are melt outside the part by definition: "
        "their marks deeper inside a nominal part than tolerance_mm, or that reach no powder "
        "beyond its outline, are not counted on the parts (per-part statistics, scope "
        "'parts' rules, tracks)."
    )
    outside_reach_mm: float = Field(
        10.0, ge=0, description="How far from the nominal parts scope 'parts' rules and tracks "
        "count the outside_classes (they lie beyond the tolerance zone by definition)."
    )
    reach_classes: tuple[str, ...] = Field(
        ("swelling",), description="Classes that scope 'parts' rules and tracks count out to "
        "outside_reach_mm as well, every mark kept (metal over the outline: a distorted "
        "part's swelling)."
    )
    swelling_reach_px: int = Field(
        1, ge=0, description="A swelling or over_melting mark reaching this many image pixels "
        "beyond a part's nominal outline is swelling, one within it over_melting; 0 = the "
        "model's classes as they are."
    )

    relative_k: float = Field(
        3.0, ge=0, description="Under- and over-melting marks read against their own part: "
        "this many robust standard deviations darker (under) or brighter (over) than the rest "
        "of the part, they are grown over the part's connected pixels as far; an under-melting "
        "mark that is not is dropped, and an over-melting mark not even 1 SD brighter nor at "
        "the layer's brightest grey; 0 = off."
    )
    stray_track_z: float = Field(
        10.0, ge=0, description="Patches of scan-track texture beyond the tolerance zone and "
        "within outside_reach_mm are misprint when their oriented gradient energy lies this "
        "many robust standard deviations above that zone's own; 0 = off."
    )

    @model_validator(mode="after")
    def _vector_needs_frame(self) -> GeometryConfig:
        if Path(self.nominal).suffix.lower() in GEOMETRY_VECTOR_SUFFIXES and \
                self.frame_mm is None:
            raise ValueError("frame_mm is required for .cli and mesh slices: set "
                             "geometry.frame_mm = [x0, y0, w, h], the plate area in mm the "
                             "nominal frame covers")
        return self


def check_geometry(camera: CameraConfig, geometry: GeometryConfig, where: str) -> None:
    """An oblique camera has no single pixel size: mm need the frame's size in mm."""
    if geometry.nominal and camera.plate_corners_px is not None and geometry.frame_mm is None:
        raise ValueError(f"{where}geometry.frame_mm is required with camera.plate_corners_px: "
                         "set it to [x0, y0, w, h], the plate area in mm the frame covers")


class StoreConfig(Section):
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


class PublishConfig(Section):
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



class MetricsConfig(Section):
    listen: str = Field(
        "127.0.0.1:9464", description="HOST:PORT of the Prometheus endpoint; empty = off."
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and not re.fullmatch(r"[^\s:]*:\d{1,5}", value):
            raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:9464) or empty, got {value!r}")
        return value


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
