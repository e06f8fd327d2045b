"""What every config section shares: the strict base model, value types and defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = REPO_ROOT / "weights" / "default.safetensors"
IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

PositiveFloat = Annotated[float, Field(gt=0)]
# Over-melted regions are larger than spatter specks, which the default model also sees as
# bright; dropping small over-melting components removes most of its false positives.
DEFAULT_MIN_COMPONENT_MM2 = {"swelling": 0.05, "misprint": 0.05, "over_melting": 0.5,
                             "under_melting": 0.05}
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
# Misplaced melt looks like the part's own melt: inside a part the model's misprint
# threshold must be high, beyond it (where no part can be mistaken) a lower one finds the
# loose tracks (docs/cameras.md: pasted into real layers, 5 of 23 found at 0.9, 17 at 0.6).
DEFAULT_OUTSIDE_THRESHOLDS = {"misprint": 0.6}



class Section(BaseModel):
    """A config table: unknown keys are errors, values frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)
