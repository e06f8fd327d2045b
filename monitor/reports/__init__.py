"""Per-build reports, defect maps and the dashboard."""
