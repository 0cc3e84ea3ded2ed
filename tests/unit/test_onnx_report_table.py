"""tools/onnx_report.py's side-by-side table: plain vs int4-aware adapters, torch vs int4, and the
1-point check. Pure bookkeeping on a hand-written accuracy section (the real numbers need the real
base and minutes: ``make onnx-report``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "onnx_report.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("onnx_report_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _entry(torch: float, int4: float, manifest: float) -> dict:
    return {"metric": "exact_match", "torch": torch, "onnx_int4": int4, "manifest_adapter_score": manifest}


def test_rows_pair_each_plain_adapter_with_its_int4aware_twin(tool):
    accuracy = {
        "sentiment": _entry(1.0, 1.0, 1.0),
        "datefmt": _entry(1.0, 0.8833, 1.0),
        "datefmt-int4aware": _entry(0.9667, 0.975, 0.9833),
    }
    rows = {r["adapter"]: r for r in tool.side_by_side(accuracy, 0.01)}
    assert set(rows) == {"sentiment", "datefmt"}  # the aware twin is a column, not a row
    assert rows["datefmt"]["plain_int4"] == 0.8833
    assert rows["datefmt"]["plain_int4_within_tolerance"] is False  # 11.7 points lost
    assert rows["datefmt"]["aware_torch"] == 0.9667
    assert rows["datefmt"]["aware_int4_weights_in_torch"] == 0.9833
    assert rows["datefmt"]["aware_int4"] == 0.975
    assert rows["datefmt"]["aware_int4_within_tolerance"] is True  # 0.83 points
    assert rows["sentiment"]["plain_int4_within_tolerance"] is True
    assert rows["sentiment"]["aware_int4"] is None and rows["sentiment"]["aware_int4_within_tolerance"] is None


def test_tolerance_is_inclusive_and_respected(tool):
    accuracy = {"extract": _entry(1.0, 0.99, 1.0), "extract-int4aware": _entry(1.0, 0.98, 1.0)}
    (row,) = tool.side_by_side(accuracy, 0.01)
    assert row["plain_int4_within_tolerance"] is True  # exactly 1 point
    assert row["aware_int4_within_tolerance"] is False  # 2 points
    (loose,) = tool.side_by_side(accuracy, 0.02)
    assert loose["aware_int4_within_tolerance"] is True


def test_markdown_table_shows_both_trainings(tool):
    accuracy = {"datefmt": _entry(1.0, 0.8833, 1.0), "datefmt-int4aware": _entry(0.9667, 0.975, 0.9833), "sentiment": _entry(1.0, 1.0, 1.0)}
    text = tool.markdown_table(tool.side_by_side(accuracy), 0.01)
    lines = text.splitlines()
    assert lines[0].count("|") == 10 and "within 1 pt" in lines[0]
    assert "| datefmt | exact_match | 1.000 | 0.883 | **no** | 0.967 | 0.983 | 0.975 | yes |" in lines
    assert "| sentiment | exact_match | 1.000 | 1.000 | yes | - | - | - | - |" in lines
