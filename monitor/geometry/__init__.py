"""Nominal geometry: calibration, slices, printed area and per-part statistics."""
