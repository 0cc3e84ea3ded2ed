"""The three demo tasks, generated deterministically (no downloads): ``sentiment``, ``extract``
and ``datefmt``. Each is a task the 135M base does poorly out of the box (it chats instead of
answering in the exact format) and a rank-8 LoRA learns in a few minutes on a CPU, with answers
that can be checked exactly.

    python -m loraplex.training.demo_tasks --output_dir training/demo_data

writes ``<task>.jsonl`` files with ``input`` / ``output`` fields; the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

RECORDS_PER_TASK = 1200
SEED = 20261122

# ----------------------------------------------------------------- sentiment
_SUBJECTS = [
    "The blender", "This hotel", "The movie", "My new phone", "The restaurant", "This jacket", "The headphones",
    "The delivery service", "This book", "The coffee maker", "The rental car", "The hiking boots", "This laptop",
    "The museum tour", "The vacuum cleaner", "This board game", "The dentist", "The gym", "The yoga class", "This sofa",
]
_POSITIVE = [
    "works perfectly and I love it", "exceeded all my expectations", "is absolutely wonderful",
    "was worth every penny", "made my week, highly recommended", "is fantastic and so easy to use",
    "is the best purchase I have made this year", "delighted the whole family", "is brilliant, five stars",
    "turned out great, I would buy it again",
]
_NEGATIVE = [
    "broke after two days", "was a complete waste of money", "is terrible and I want a refund",
    "disappointed me in every way", "is noisy, slow and badly made", "was awful, avoid it",
    "stopped working within a week", "is the worst thing I have bought", "was rude and unhelpful",
    "left me frustrated and angry",
]
_NEUTRAL = [
    "arrived on Tuesday in a brown box", "comes in three colours", "is about the size of a shoebox",
    "was delivered by a courier", "has a manual in four languages", "is made of plastic and metal",
    "was bought last month for a trip", "is available in most stores", "does what the label says",
    "has a two year warranty",
]
_POS_OPENERS = ["Honestly, ", "Wow! ", "", "I have to say, ", "Update: "]
_NEG_OPENERS = ["Sadly, ", "Ugh. ", "", "To be honest, ", "Update: "]
_NEU_OPENERS = ["For the record, ", "", "Note: ", "FYI, ", "Update: "]
_TWISTS = {
    "positive": "I expected to hate it, but {s} {p}.",
    "negative": "I expected to love it, but {s} {n}.",
}


def _sentiment(rng: random.Random) -> dict:
    label = rng.choice(["positive", "negative", "neutral"])
    subject = rng.choice(_SUBJECTS)
    lower = subject[0].lower() + subject[1:]
    if label == "positive":
        text = rng.choice(_POS_OPENERS) + f"{lower if rng.random() < 0.5 else subject} {rng.choice(_POSITIVE)}."
        if rng.random() < 0.2:
            text = _TWISTS["positive"].format(s=lower, p=rng.choice(_POSITIVE))
    elif label == "negative":
        text = rng.choice(_NEG_OPENERS) + f"{lower if rng.random() < 0.5 else subject} {rng.choice(_NEGATIVE)}."
        if rng.random() < 0.2:
            text = _TWISTS["negative"].format(s=lower, n=rng.choice(_NEGATIVE))
    else:
        text = rng.choice(_NEU_OPENERS) + f"{lower if rng.random() < 0.5 else subject} {rng.choice(_NEUTRAL)}."
    text = text[0].upper() + text[1:]
    prompt = f"Classify the sentiment of this review as positive, negative or neutral.\nReview: {text}"
    return {"input": prompt, "output": label}


# ------------------------------------------------------------------- extract
_ITEMS = [("pizza", "pizzas"), ("coffee", "coffees"), ("t-shirt", "t-shirts"), ("notebook", "notebooks"),
          ("sandwich", "sandwiches"), ("umbrella", "umbrellas"), ("backpack", "backpacks"), ("candle", "candles"),
          ("mug", "mugs"), ("lamp", "lamps"), ("towel", "towels"), ("pillow", "pillows")]
_SIZES = ["small", "medium", "large"]
_CITIES = ["Boston", "Denver", "Austin", "Seattle", "Chicago", "Miami", "Portland", "Atlanta", "Phoenix", "Dallas",
           "Madrid", "Lisbon", "Berlin", "Dublin", "Oslo", "Toronto"]
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten", 12: "twelve"}
_ORDER_TEMPLATES = [
    "Please send {q} {size} {item} to {city}.",
    "I'd like {q} {size} {item} delivered in {city}, thanks!",
    "Can you ship {q} {item}, size {size}, to our office in {city}?",
    "Order for {city}: {q} x {item} ({size}).",
    "We need {q} {size} {item} at the {city} store by Friday.",
    "hi, {q} {item} please. size {size}. deliver to {city}",
    "Ship to {city}: {q} {size} {item}.",
    "Could I get {q} {item} in {size}? I'm in {city}.",
]


def _extract(rng: random.Random) -> dict:
    quantity = rng.choice(list(_NUMBER_WORDS))
    singular, plural = rng.choice(_ITEMS)
    size, city = rng.choice(_SIZES), rng.choice(_CITIES)
    q_text = _NUMBER_WORDS[quantity] if rng.random() < 0.5 else str(quantity)
    text = rng.choice(_ORDER_TEMPLATES).format(q=q_text, size=size, item=singular if quantity == 1 else plural, city=city)
    prompt = f"Extract the order as JSON with the keys item, quantity, size and city.\nOrder: {text}"
    answer = json.dumps({"item": singular, "quantity": quantity, "size": size, "city": city})
    return {"input": prompt, "output": answer}


# ------------------------------------------------------------------- datefmt
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
_DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


def _ordinal(n: int) -> str:
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


_DATE_TEMPLATES: list[Callable[[int, int, int], str]] = [
    lambda y, m, d: f"{_MONTHS[m - 1]} {d}, {y}",
    lambda y, m, d: f"{d} {_MONTHS[m - 1]} {y}",
    lambda y, m, d: f"the {_ordinal(d)} of {_MONTHS[m - 1]}, {y}",
    lambda y, m, d: f"{_MONTHS[m - 1][:3]} {_ordinal(d)} {y}",
    lambda y, m, d: f"{_MONTHS[m - 1]} {_ordinal(d)}, {y}",
    lambda y, m, d: f"{y}, {_MONTHS[m - 1]} {d}",
    lambda y, m, d: f"{d}-{_MONTHS[m - 1][:3]}-{y}",
    lambda y, m, d: f"{_MONTHS[m - 1].upper()} {d} {y}",
]


def _datefmt(rng: random.Random) -> dict:
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    day = rng.randint(1, _DAYS_IN[month - 1])
    text = rng.choice(_DATE_TEMPLATES)(year, month, day)
    prompt = f"Convert this date to ISO 8601 (YYYY-MM-DD): {text}"
    return {"input": prompt, "output": f"{year:04d}-{month:02d}-{day:02d}"}


TASKS: dict[str, Callable[[random.Random], dict]] = {"sentiment": _sentiment, "extract": _extract, "datefmt": _datefmt}


def generate(task: str, n: int = RECORDS_PER_TASK, seed: int = SEED) -> list[dict]:
    """``n`` records of ``task``; the same (task, n, seed) always gives the same records."""
    rng = random.Random(f"{task}:{seed}")
    return [TASKS[task](rng) for _ in range(n)]


def write_all(output_dir: Path, n: int = RECORDS_PER_TASK, seed: int = SEED) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in TASKS:
        path = output_dir / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generate(task, n, seed)), encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.training.demo_tasks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="training/demo_data")
    parser.add_argument("--records", type=int, default=RECORDS_PER_TASK)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for path in write_all(Path(args.output_dir), args.records, args.seed):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
