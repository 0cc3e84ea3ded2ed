"""Steps of the generation pipeline that need no engine: tokenization (large prompts off the
event loop, same ids either way) and the catalog's store listing (off the loop, shared, cached)."""

from __future__ import annotations

import asyncio
import threading

from loraplex.server.chat_prompt import text_ids
from loraplex.server.generation import TOKENIZE_INLINE_CHARS, Generation, GenerationRequest


class _Recording:
    """The real tokenizer, noting which thread each call ran on."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self.threads = tokenizer, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __len__(self):
        return len(self._tokenizer)


def _generation(tokenizer) -> Generation:
    return Generation(tokenizer=tokenizer, scheduler=None, registry=None, metrics=None, settings=None, access=None, activity=None, readiness=None, base_name="base")


def test_small_prompts_tokenize_inline_and_large_ones_in_the_tokenizer_thread(tokenizer):
    recording = _Recording(tokenizer)
    generation = _generation(recording)
    small = "Convert the date: 3 March 2021."
    large = "The quick brown fox jumps over the lazy dog. " * (TOKENIZE_INLINE_CHARS // 40)
    assert len(large) > TOKENIZE_INLINE_CHARS

    async def run():
        return await generation.tokenize(GenerationRequest(model="base", prompt=small)), await generation.tokenize(GenerationRequest(model="base", prompt=large))

    small_ids, large_ids = asyncio.run(run())
    assert small_ids == text_ids(tokenizer, small)
    assert large_ids == text_ids(tokenizer, large)
    assert recording.threads[0] == "MainThread"
    assert recording.threads[1].startswith("loraplex-tokenize")


def test_the_catalog_lists_the_store_off_the_loop_once_per_max_age(tmp_path):
    """A real store and registry; only the store's listing is wrapped to see its thread."""
    from loraplex.server.catalog import Catalog
    from loraplex.server.registry import AdapterRegistry, BaseShapes
    from loraplex.server.store import AdapterStore

    for name in ("alpha", "beta"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    store = AdapterStore(tmp_path)
    listings: list[str] = []
    real_names = store.names

    def names():
        listings.append(threading.current_thread().name)
        return real_names()

    store.names = names
    registry = AdapterRegistry(store, BaseShapes("fp", {}), installer=None, max_loras=2, max_lora_rank=8)
    catalog = Catalog(registry, base_name="base", created=0, max_age=60)

    async def run():
        await asyncio.gather(catalog.refresh(), catalog.refresh(), catalog.refresh())
        await catalog.refresh()
        return await catalog.models(None)

    models = asyncio.run(run())
    assert [m["id"] for m in models] == ["base", "alpha", "beta"]
    assert [m["state"] for m in models[1:]] == ["available", "available"]
    assert len(listings) == 1 and listings[0] != "MainThread"  # four callers, one listing, in a worker thread


def test_token_pieces_give_each_tokens_true_bytes(tokenizer):
    """A character split over two byte-level tokens: each token's bytes are its own part of the
    UTF-8 sequence (its text shows U+FFFD), and the parts join to the character."""
    from loraplex.server.textstream import TokenPieces

    pieces = TokenPieces(tokenizer)
    ids = tokenizer("日本 <|im_end|>", add_special_tokens=False)["input_ids"]
    parts = [pieces.piece(i) for i in ids]
    assert b"".join(bytes(raw) for _, raw in parts) == "日本 <|im_end|>".encode()
    assert any("\ufffd" in text for text, _ in parts)  # some token holds only part of a character
    assert parts[-1] == ("<|im_end|>", list(b"<|im_end|>"))


def test_choice_seeds_are_seed_plus_index_wrapped_to_int64():
    from loraplex.server.generation import Plan
    from loraplex.server.scheduler import SamplingParams

    def plan(seed):
        return Plan("r", None, None, "base", [1], SamplingParams(seed=seed, temperature=1.0), (), n=3)

    assert [plan(7).choice_params(i).seed for i in range(3)] == [7, 8, 9]
    assert plan(2**63 - 1).choice_params(1).seed == -(2**63)
    assert plan(None).choice_params(2).seed is None


def test_a_feature_the_backend_lacks_is_refused_naming_the_field_and_the_backend(tokenizer):
    """The service checks ``Scheduler.features`` before anything reaches the engine."""
    from types import SimpleNamespace

    import pytest

    from loraplex.server.errors import RequestInvalid
    from loraplex.server.settings import ServerSettings

    settings = ServerSettings(backend="onnx", model="unused", onnx_batching="per-request")
    scheduler = SimpleNamespace(features=frozenset({"logprobs", "penalties"}))
    generation = Generation(tokenizer=tokenizer, scheduler=scheduler, registry=None, metrics=None, settings=settings, access=None, activity=None, readiness=None, base_name="base")

    def plan(**fields):
        return asyncio.run(generation.plan(GenerationRequest(model="base", prompt="x", max_tokens=2, **fields), None, None, None, [1, 2]))

    assert plan(logprobs=3, presence_penalty=0.5).logprobs == 3  # what it has passes
    for fields, param in (({"n": 2}, "n"), ({"echo": True, "logprobs": 1}, "echo"), ({"guided_regex": "[a-z]+"}, "guided_regex")):
        with pytest.raises(RequestInvalid) as refused:
            plan(**fields)
        assert refused.value.param == param and "the onnx (per-request) backend" in refused.value.message
