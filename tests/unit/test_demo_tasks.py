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


def test_chat_task_is_deterministic_chat_format_with_unseen_items_held_out(tmp_path):
    from loraplex.training.chat_task import CATEGORIES, TRAIN_ITEMS, generate, write
    from loraplex.training.config import TrainConfig
    from loraplex.training.formats import check_records

    records = generate(100, seed=5)
    assert records == generate(100, seed=5) and records != generate(100, seed=6)
    assert check_records(records, TrainConfig(data_files="x", output_path="adapters/a")) == "chat"
    unseen = {item for items in CATEGORIES.values() for item in items[TRAIN_ITEMS:]}

    def item_of(record):
        text = record["messages"][1]["content"].lower()
        return next(item for items in CATEGORIES.values() for item in items if item in text.replace("?", " ").replace(".", " ").split(" ") or f"'{item}'" in text)

    assert all(item_of(r) not in unseen for r in records[:80]) and all(item_of(r) in unseen for r in records[80:])
    assert write(tmp_path / "c.jsonl", 10).read_text().count("\n") == 10
