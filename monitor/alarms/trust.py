"""Trust in the model: weights adapted to this camera, or not.

A model's defect classes are only as good as the images it was trained or adapted on. The
weights file says which cameras (`[camera] id`) they were adapted to; on any other camera
their alarms (threshold rules on defect classes, stacking tracks) are capped at `warning`
and do not run the hook. Part and stall alarms, which do not rest on the defect classes,
keep their severity. `[alarms] trust_unadapted = true` trusts the model anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelTrust:
    """Whether one camera's alarms from defect classes may be critical and run the hook."""

    trusted: bool
    reason: str  # why, in words ("" when adapted to this camera)


def model_trust(adapted_cameras: Sequence[str], camera_id: str, *,
                trust_unadapted: bool) -> ModelTrust:
    """The model's trust on the camera named `camera_id`."""
    if camera_id and camera_id in adapted_cameras:
        return ModelTrust(True, "")
    if not camera_id:
        why = "[camera] id is not set"
    elif adapted_cameras:
        why = (f"the weights were adapted to camera(s) {', '.join(adapted_cameras)}, not "
               f"{camera_id!r}")
    else:
        why = f"the weights were not adapted to any camera (this one is {camera_id!r})"
    if trust_unadapted:
        return ModelTrust(True, f"{why}; trusted anyway (alarms.trust_unadapted)")
    return ModelTrust(False, f"{why}: defect-class alarms are capped at warning and do not "
                             f"run the hook (adapt the weights, or set "
                             f"alarms.trust_unadapted = true)")
