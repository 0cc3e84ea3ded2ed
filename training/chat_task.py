"""A held-out task in OpenAI's chat fine-tuning format, written deterministically: ``category``.

Each record is ``{"messages": [system, user, assistant]}``: the user names an item, the assistant
answers its category in one word (fruit, vegetable, animal, tool, vehicle or instrument). It is not
one of the demo tasks and not in their format: it checks ``train-adapter`` on the format most users
already have. ``python -m loraplex.training.chat_task --output FILE`` writes it (fixed seed).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "mango", "pear", "peach", "plum", "kiwi", "grape", "lemon", "orange", "apricot", "papaya", "fig", "lime", "melon"],
    "vegetable": ["carrot", "potato", "onion", "spinach", "cabbage", "lettuce", "broccoli", "celery", "radish", "leek", "turnip", "beet", "zucchini", "kale", "parsnip", "cauliflower"],
    "animal": ["horse", "tiger", "rabbit", "eagle", "dolphin", "wolf", "goat", "camel", "otter", "zebra", "sheep", "lion", "fox", "owl", "whale", "badger"],
    "tool": ["hammer", "wrench", "screwdriver", "saw", "chisel", "pliers", "drill", "shovel", "rake", "axe", "spanner", "file", "trowel", "level", "crowbar", "mallet"],
    "vehicle": ["bicycle", "truck", "bus", "tractor", "scooter", "van", "tram", "motorcycle", "ferry", "taxi", "canoe", "train", "airplane", "helicopter", "sailboat", "jeep"],
    "instrument": ["violin", "piano", "trumpet", "flute", "guitar", "cello", "drum", "harp", "clarinet", "oboe", "banjo", "tuba", "saxophone", "ukulele", "accordion", "trombone"],
}
SYSTEM = "You sort items into categories. Answer with exactly one word: fruit, vegetable, animal, tool, vehicle or instrument."
QUESTIONS = [
    "Which category does '{item}' belong to?",
    "Category of this item: {item}",
    "Sort this into a category: {item}.",
    "What kind of thing is a {item}?",
    "{item} -> category?",
]


#: Items per category used in the first 80% of the records; the rest only appear in the last 20%.
TRAIN_ITEMS = 12


def _record(rng: random.Random, pairs: list[tuple[str, str]]) -> dict:
    item, category = rng.choice(pairs)
    question = rng.choice(QUESTIONS).format(item=item if rng.random() < 0.7 else item.capitalize())
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": category},
    ]}


def generate(n: int = 600, seed: int = 13) -> list[dict]:
    """The first 80% of records use 12 items per category, the last 20% only the 4 others: train on
    ``train[:80%]`` and evaluate on ``train[80%:]`` to score items never seen in training."""
    rng = random.Random(seed)
    seen = [(item, c) for c, items in CATEGORIES.items() for item in items[:TRAIN_ITEMS]]
    unseen = [(item, c) for c, items in CATEGORIES.items() for item in items[TRAIN_ITEMS:]]
    n_train = round(n * 0.8)
    return [_record(rng, seen) for _ in range(n_train)] + [_record(rng, unseen) for _ in range(n - n_train)]


def write(path: str | Path, n: int = 600, seed: int = 13) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in generate(n, seed)))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="where to write the .jsonl file")
    parser.add_argument("--n", type=int, default=600, help="number of records (default 600)")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    print(write(args.output, args.n, args.seed))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
