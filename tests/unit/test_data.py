"""Training data: reading, split slicing, rendering, response-only label masking."""

import pytest

from loraplex.training.config import TrainConfig, TrainInputError
from loraplex.training.data import (
    IGNORE_INDEX,
    PromptRenderer,
    default_holdout,
    load_records,
    make_splits,
    split_indices,
    tokenize_example,
)
from tests.conftest import write_jsonl


@pytest.mark.parametrize(
    "spec, n, expected",
    [
        ("train", 10, list(range(10))),
        ("train[:4]", 10, [0, 1, 2, 3]),
        ("train[4:6]", 10, [4, 5]),
        ("train[8:]", 10, [8, 9]),
        ("train[-3:]", 10, [7, 8, 9]),
        ("train[:50%]", 10, [0, 1, 2, 3, 4]),
        ("train[90%:]", 10, [9]),
        ("train[4096:4224]", 100, []),
        (" train[ 1 : 3 ] ", 10, [1, 2]),
        ("train[:2]+train[-1:]", 10, [0, 1, 9]),
    ],
)
def test_split_slicing(spec, n, expected):
    assert split_indices(spec, n) == expected


@pytest.mark.parametrize("spec", ["test[:4]", "train[a:b]", "train[1:2:3]", "train(:4)"])
def test_bad_split_specs_are_named(spec):
    with pytest.raises(TrainInputError, match="is not understood"):
        split_indices(spec, 10)


def test_default_holdout_is_stratified_and_deterministic():
    labels = ["a"] * 90 + ["b"] * 10
    train, held = default_holdout(labels, seed=1)
    assert len(held) == 10 and not set(train) & set(held)
    picked = [labels[i] for i in held]
    assert picked.count("a") == 9 and picked.count("b") == 1
    assert default_holdout(labels, seed=1) == (train, held)


def test_empty_splits_are_refused(tmp_path):
    records = [{"input": str(i), "output": str(i)} for i in range(5)]
    cfg = TrainConfig(data_files="x.jsonl", output_path="adapters/a", train_split="train[:5]")
    with pytest.raises(TrainInputError, match="eval split is empty after splitting 5 records"):
        make_splits(records, cfg)
    cfg = TrainConfig(data_files="x.jsonl", output_path="adapters/a", train_split="train[10:]", eval_split="train[:2]")
    with pytest.raises(TrainInputError, match="training split is empty"):
        make_splits(records, cfg)


def test_load_records_errors(tmp_path):
    with pytest.raises(TrainInputError, match="does not exist"):
        load_records([tmp_path / "missing.jsonl"])
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(TrainInputError, match="unsupported extension '.txt'"):
        load_records([tmp_path / "data.txt"])
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(TrainInputError, match="bad.jsonl:2: not valid JSON"):
        load_records([tmp_path / "bad.jsonl"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(TrainInputError, match="record 0 is a int"):
        load_records([tmp_path / "list.json"])
    (tmp_path / "e.jsonl").write_text("")
    with pytest.raises(TrainInputError, match="hold no records"):
        load_records([tmp_path / "e.jsonl"])


def test_load_records_reads_all_formats(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"input": "x", "output": "y"}])
    (tmp_path / "b.json").write_text('[{"input": "x2", "output": "y2"}]')
    (tmp_path / "c.csv").write_text("input,output\nx3,y3\n")
    records = load_records([tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "c.csv"])
    assert [r["output"] for r in records] == ["y", "y2", "y3"]


def test_chat_mode_masks_every_prompt_token(tokenizer):
    cfg = TrainConfig(data_files="x", output_path="adapters/a")
    example = PromptRenderer(cfg, tokenizer).render({"input": "Is it good?", "output": "yes"}, 0)
    assert "<|im_start|>assistant" in example.prompt and example.reference == "yes"
    item = tokenize_example(example, tokenizer, 512)
    prompt_len = len(tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    answer = item["labels"][prompt_len:]
    assert IGNORE_INDEX not in answer
    assert tokenizer.decode(answer).startswith("yes" + tokenizer.eos_token)
    assert item["input_ids"][prompt_len:] == answer


def test_template_mode_trains_on_the_whole_text(tokenizer):
    cfg = TrainConfig(data_files="x", output_path="adapters/a", text_template="Q: {question}\nA: {output}")
    example = PromptRenderer(cfg, tokenizer).render({"question": "2+2?", "output": "4"}, 3)
    assert example.prompt == "Q: 2+2?\nA: " and example.reference == "4"
    item = tokenize_example(example, tokenizer, 512)
    assert IGNORE_INDEX not in item["labels"] and item["labels"] == item["input_ids"]
    assert tokenizer.decode(item["input_ids"]) == "Q: 2+2?\nA: 4" + tokenizer.eos_token


def test_template_field_missing_names_field_and_record(tokenizer):
    cfg = TrainConfig(data_files="x", output_path="adapters/a", text_template="Q: {question} A: {output}")
    with pytest.raises(TrainInputError, match=r"field \{question\} is absent from record 7"):
        PromptRenderer(cfg, tokenizer).render({"output": "4"}, 7)
    chat = TrainConfig(data_files="x", output_path="adapters/a", input_field="prompt")
    with pytest.raises(TrainInputError, match=r"field 'prompt' \(--input_field\) is absent from record 2"):
        PromptRenderer(chat, tokenizer).render({"input": "x", "output": "y"}, 2)


def test_truncation_that_removes_the_answer_drops_the_example(tokenizer):
    cfg = TrainConfig(data_files="x", output_path="adapters/a")
    example = PromptRenderer(cfg, tokenizer).render({"input": "word " * 50, "output": "yes"}, 0)
    assert tokenize_example(example, tokenizer, 16) is None
