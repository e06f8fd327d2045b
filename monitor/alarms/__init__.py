"""Alarm rules, lifecycle, stacking-defect tracks and regions."""
