"""pbf-monitor: layer-by-layer defect monitoring for metal powder-bed-fusion printers."""

from __future__ import annotations

__version__ = "0.1.0"
