"""Alarm rules, tracks, part alarms, stall, hook and regions."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from monitor.config.base import (
    PositiveFloat,
    Section,
)

Metric = Literal["area_fraction", "area_mm2", "components", "largest_component_mm2"]
Severity = Literal["warning", "critical"]


class AlarmRule(Section):
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
        # at once: a swelling stands up out of the powder, and the next recoat may hit it
        {"class": "swelling", "metric": "area_mm2", "threshold": 2.0, "consecutive": 1,
         **rel, "factor": 3.0, "min_delta": 2.0},
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


class TracksConfig(Section):
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
    alarm_layers: int = Field(10, ge=2, description="A track this many layers long alarms.")
    alarm_volume_mm3: float = Field(
        0.5, gt=0,
        description="A track of 2+ layers whose volume (area x layer thickness) exceeds this "
        "alarms.",
    )
    baseline_share: float = Field(
        0.3, ge=0, description="A track whose area per layer is under this share of its "
        "class's usual area in the build (median of the last baseline_window layers, on the "
        "parts with slices) is the camera's usual look, not a defect: it does not alarm "
        "unless its volume exceeds absolute_volume_mm3. 0 = off."
    )
    baseline_window: int = Field(20, ge=1, description="Layers the class's usual area spans.")
    baseline_learn_layers: int = Field(
        3, ge=1, description="Layers seen before the usual area applies."
    )
    absolute_volume_mm3: float = Field(
        5.0, gt=0, description="A track whose volume exceeds this alarms whatever the "
        "build's usual area of its class."
    )
    grow_classes: tuple[str, ...] = Field(
        ("swelling",), description="Tracked classes whose growth alone may alarm: a track "
        "whose area grew by grow_ratio or more on each of its last grow_layers layers, to "
        "grow_min_area_mm2 or more, is a defect building up, whatever its volume and the "
        "build's usual area of its class."
    )
    grow_layers: int = Field(
        2, ge=0, description="Layers in a row a track's area must grow (0 = off)."
    )
    grow_ratio: float = Field(
        1.25, gt=1, description="A layer's area over the track's previous layer's that counts "
        "as growing."
    )
    grow_min_area_mm2: float = Field(
        2.5, ge=0, description="Area (mm²) a growing track must reach in its last layer."
    )
    severity: Severity = Field("critical", description="Severity of track alarms.")
    scope: Literal["parts", "plate"] = Field(
        "parts", description="With [geometry] nominal slices: \"parts\" tracks components "
        "on and around the nominal parts only (grown by geometry.tolerance_mm), \"plate\" "
        "everywhere. Without slices, everywhere."
    )
    one_per_part: bool = Field(
        True, description="While a track alarm of a class is open on a part (or off the "
        "parts), other tracks of that class there open none; they may once it clears."
    )

    @model_validator(mode="after")
    def _grow_tracked(self) -> TracksConfig:
        untracked = [c for c in self.grow_classes if c not in self.classes]
        if untracked and "grow_classes" in self.model_fields_set:  # the default may lapse
            raise ValueError(f"grow_classes: {', '.join(untracked)} not in classes")
        return self


class PartAlarmsConfig(Section):
    """Alarms per nominal part (with [geometry] nominal): missing or grown past its outline."""

    enabled: bool = Field(True, description="Raise part alarms when slices are configured.")
    missing_fraction: float = Field(
        0.5, ge=0, le=1, description="A part printed below this fraction of its nominal area "
        "is missing (broken off, recoater crash, not exposed)."
    )
    missing_layers: int = Field(2, ge=1, description="Layers in a row a part must be missing.")
    missing_severity: Severity = Field("critical", description="Severity of part_missing.")
    min_width_px: float = Field(
        12.0, ge=0, description="Parts narrower than this in the image (their widest "
        "inscribed circle, pixels) are measured but never called missing: the printed-area "
        "test misreads a wall a few pixels wide."
    )
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


class StallConfig(Section):
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


class HookConfig(Section):
    """A command run on alarms, e.g. to pause the machine through its own interface."""

    command: tuple[str, ...] = Field(
        (), description="Program and arguments (no shell); empty = no hook."
    )
    severities: tuple[Severity, ...] = Field(("critical",), description="Alarms that run it.")
    timeout_s: PositiveFloat = Field(10.0, description="The command is killed after this.")


class AlarmsConfig(Section):
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


class RegionConfig(Section):
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
