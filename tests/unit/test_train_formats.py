"""Data formats (OpenAI chat, alpaca, ShareGPT, input/output), loading through Hugging Face
datasets (parquet, csv, arrow, saved folders, hub names offline), and packing masks."""

from __future__ import annotations

import json

import pytest

from loraplex.training.cli import main
from loraplex.training.config import TrainConfig, TrainInputError
from loraplex.training.data import (
    IGNORE_INDEX,
    PackedCollator,
    PackedDataset,
    PromptRenderer,
    load_splits,
    make_splits,
    prepare_records,
    tokenize_example,
)
from loraplex.training.formats import check_records, detect_format, to_messages
from tests.conftest import write_jsonl

CHAT = {
    "messages": [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "blue"},
        {"role": "user", "content": "And of grass?"},
        {"role": "assistant", "content": "green"},
    ]
}


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data_files="x.jsonl", output_path="adapters/a", **kw)


@pytest.mark.parametrize(
    "record, expected",
    [
        (CHAT, "chat"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}, "sharegpt"),
        ({"instruction": "Add", "input": "1 2", "output": "3"}, "alpaca"),
        ({"instruction": "Say hi", "output": "hi"}, "alpaca"),
        ({"input": "x", "output": "y"}, "input_output"),
        ({"input": "x", "output": "y", "messages": None}, "input_output"),  # datasets fills absent keys with None
    ],
)
def test_format_is_detected_from_the_record(record, expected):
    assert detect_format(record, _cfg()) == expected


def test_ambiguous_and_unknown_records_are_clear_errors():
    with pytest.raises(TrainInputError, match=r"several data formats \(chat, alpaca\); pass --data_format chat\|alpaca"):
        detect_format({**CHAT, "instruction": "x", "output": "y"}, _cfg())
    with pytest.raises(TrainInputError, match=r"matches no known data format \(its fields: answer, question\)"):
        detect_format({"question": "q", "answer": "a"}, _cfg())
    assert detect_format({**CHAT, "instruction": "x", "output": "y"}, _cfg(data_format="chat")) == "chat"


def test_alpaca_and_sharegpt_become_chat_messages():
    alpaca = to_messages({"instruction": "Translate to French", "input": "cat", "output": "chat"}, 0, "alpaca", _cfg())
    assert alpaca == [{"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}]
    no_input = to_messages({"instruction": "Say hi", "input": "", "output": "hi"}, 0, "alpaca", _cfg())
    assert no_input[0] == {"role": "user", "content": "Say hi"}
    share = to_messages(
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        0, "sharegpt", _cfg(),
    )
    assert share == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


@pytest.mark.parametrize(
    "records, fragment",
    [
        ([CHAT, {"messages": [{"role": "user", "content": "hi"}]}], "record 1: 'messages' has no assistant turn"),
        ([CHAT, {"messages": [{"role": "robot", "content": "hi"}]}], "record 1: messages[0].role is 'robot'"),
        ([CHAT, {"messages": [{"role": "user", "content": ["a"]}]}], "record 1: messages[0].content is a list, not text"),
        ([CHAT, {"messages": CHAT["messages"][:4]}], "record 1: 'messages' must end with an assistant turn"),
        ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], "field 'output' (alpaca 'output') is absent from record 1"),
        ([{"input": "a", "output": "b"}, {"input": {"k": 1}, "output": "b"}], "field 'input' (--input_field) of record 1 is a dict, not text"),
    ],
)
def test_every_record_is_checked_with_its_index(records, fragment):
    with pytest.raises(TrainInputError) as info:
        check_records(records, _cfg())
    assert fragment in str(info.value)


def test_multi_turn_chat_trains_on_assistant_turns_only(tokenizer):
    example = PromptRenderer(_cfg(), tokenizer, "chat").render(CHAT, 0)
    item = tokenize_example(example, tokenizer, 512)
    trained = [t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE_INDEX]
    context = [t for t, label in zip(item["input_ids"], item["labels"]) if label == IGNORE_INDEX]
    trained_text, context_text = tokenizer.decode(trained), tokenizer.decode(context)
    assert "blue" in trained_text and "green" in trained_text
    assert trained_text.count(tokenizer.eos_token) == 2  # each answer ends with the end-of-turn token, trained
    assert "You answer in one word." in context_text and "Colour of the sky?" in context_text and "And of grass?" in context_text
    assert "sky" not in trained_text and "grass" not in trained_text and "one word" not in trained_text
    # the eval prompt is the conversation up to the last answer, ready for the assistant to speak
    assert example.reference == "green" and example.prompt.endswith("<|im_start|>assistant\n") and "blue" in example.prompt
    assert item["labels"][-len(trained):] != [IGNORE_INDEX] * len(trained)


def test_input_field_pointing_at_a_conversation_is_refused_before_the_base_loads(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [CHAT] * 6)
    argv = ["--data_files", str(data), "--output_path", str(tmp_path / "adapters/a"), "--input_field", "messages",
            "--model_name_or_path", str(tmp_path / "no-such-model")]  # a base load would fail with a different message
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "field 'messages' (--input_field) of record 0 is a list, not text" in err and "--data_format chat" in err
    assert "no-such-model" not in err
    assert not (tmp_path / "adapters").exists()


def test_datasets_reads_parquet_csv_arrow_and_saved_folders(tmp_path):
    import datasets

    rows = [{"input": f"q{i}", "output": f"a{i}"} for i in range(6)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "saved"))
    assert [r["output"] for r in load_splits([tmp_path / "d.parquet"])["train"]] == [r["output"] for r in rows]
    assert load_splits([tmp_path / "d.csv"])["train"] == rows
    saved = load_splits([tmp_path / "saved"])
    assert sorted(saved) == ["test", "train"] and saved["test"] == rows[:2]
    # arrow files as datasets writes them (one per saved split)
    arrow = next((tmp_path / "saved" / "train").glob("*.arrow"))
    assert load_splits([arrow])["train"] == rows
    # split syntax across named splits of a saved dataset
    cfg = TrainConfig(data_files=str(tmp_path / "saved"), output_path="adapters/a", train_split="train[:4]", eval_split="test")
    train, evaluation = make_splits(saved, cfg)
    assert train == rows[:4] and evaluation == rows[:2]


def test_date_like_answers_stay_text(tmp_path):
    """pyarrow's JSON reader would turn "1983-02-12" into a timestamp (the datefmt demo task)."""
    rows = [{"input": "12 Feb 1983", "output": "1983-02-12"}, {"input": "noon", "output": "2020-01-01T12:00:00"}]
    for name in ("d.jsonl", "d.json"):
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows) if name.endswith("l") else json.dumps(rows))
        assert load_splits([path])["train"] == rows


def test_hub_dataset_offline_is_a_clear_error_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = TrainConfig(data_name="someone/not-cached-anywhere", data_config="v2", output_path="adapters/a").validate()
    with pytest.raises(TrainInputError) as info:
        prepare_records(cfg)
    message = str(info.value)
    assert "hub dataset 'someone/not-cached-anywhere' (config 'v2') could not be loaded" in message and "--data_files" in message


def test_chat_file_prepares_with_labels_for_a_stratified_holdout(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"Is {i} even?"}, {"role": "assistant", "content": "yes" if i % 2 == 0 else "no"}]}
        for i in range(40)
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", records)
    fmt, train, evaluation = prepare_records(TrainConfig(data_files=str(data), output_path="adapters/a").validate())
    assert fmt == "chat" and len(train) == 36 and len(evaluation) == 4
    answers = [r["messages"][-1]["content"] for r in evaluation]
    assert answers.count("yes") == 2 and answers.count("no") == 2  # stratified on the last assistant turn


def test_packed_examples_do_not_see_each_other(tiny_base):
    """A row packing three examples gives each the logits it gets alone (block-diagonal mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base)).eval()
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},
        {"input_ids": [12, 13, 14, 15, 16], "labels": [IGNORE_INDEX, 13, 14, 15, 16]},
    ]
    packed = PackedDataset(examples, max_seq_length=12)
    assert len(packed) == 1 and packed.examples == 3
    batch = PackedCollator(pad_token_id=2)([packed[0], {"input_ids": [5, 6], "labels": [5, 6], "position_ids": [0, 1]}])
    assert batch["input_ids"].shape == (2, 12) and batch["position_ids"][0].tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert batch["labels"][0].tolist()[4] == IGNORE_INDEX  # an example's first token is not predicted from its neighbour
    with torch.no_grad():
        out = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]  # [12, V]
        start = 0
        for ex in examples:
            n = len(ex["input_ids"])
            alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]  # [n, V]
            torch.testing.assert_close(out[start : start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
        # the check has teeth: without position restarts the third example sees the first two
        plain = model(input_ids=batch["input_ids"][:1], use_cache=False).logits[0]
        assert not torch.allclose(plain[7:], out[7:], atol=1e-3)
