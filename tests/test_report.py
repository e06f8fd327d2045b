"""CSV reports are safe to open in a spreadsheet: no cell from a name starts a formula."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest

from monitor.reports.report import csv_cell, to_csv


@pytest.mark.parametrize(("value", "cell"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("+1+cmd", "'+1+cmd"),
    ("-2+3", "'-2+3"),
    ("@SUM(A1)", "'@SUM(A1)"),
    ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"),
    ("B42", "B42"),
    ("", ""),
    (-0.5, -0.5),
    (-3, -3),
    (0.25, 0.25),
])
def test_csv_cell(value: Any, cell: Any) -> None:
    assert csv_cell(value) == cell


def test_report_csv_neutralises_names_and_keeps_numbers() -> None:
    report = {
        "build": "=cmd|' /C calc'!A0",
        "layers": [
            {"layer": 1, "status": "error", "error": "-corrupt @ header", "classes": {}},
            {"layer": 2, "status": "ok", "error": None,
             "classes": {"spatter": {"area_fraction": -0.5, "area_mm2": 1.5, "components": 2,
                                     "largest_component_px": 9}}},
        ],
    }
    rows = list(csv.reader(io.StringIO(to_csv(report))))
    assert rows[0][:4] == ["build", "layer", "status", "error"]
    assert rows[1][:4] == ["'=cmd|' /C calc'!A0", "1", "error", "'-corrupt @ header"]
    assert rows[2] == ["'=cmd|' /C calc'!A0", "2", "ok", "", "-0.5", "1.5", "2", "9"]
    for row in rows:
        for cell in row:
            assert not cell.startswith(("=", "+", "@", "\t", "\r")), cell
            assert not cell.startswith("-") or float(cell) < 0, cell
