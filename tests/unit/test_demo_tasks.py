"""The demo datasets are generated deterministically and the committed files are current."""

import json
from pathlib import Path

from loraplex.training.demo_tasks import TASKS, generate, write_all

DEMO_DATA = Path(__file__).resolve().parents[2] / "training" / "demo_data"


def test_generation_is_deterministic_and_committed_files_match(tmp_path):
    paths = write_all(tmp_path)
    for path in paths:
        committed = DEMO_DATA / path.name
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run make demo-data"


def test_answers_are_checkable():
    for record in generate("extract", 50):
        parsed = json.loads(record["output"])
        assert set(parsed) == {"item", "quantity", "size", "city"}
        assert str(parsed["city"]) in record["input"]
    for record in generate("datefmt", 50):
        year = record["output"][:4]
        assert year in record["input"]
    labels = {r["output"] for r in generate("sentiment", 300)}
    assert labels == {"positive", "negative", "neutral"}
    assert set(TASKS) == {"sentiment", "extract", "datefmt"}
