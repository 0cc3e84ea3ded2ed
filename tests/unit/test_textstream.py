"""Incremental detokenization and stop strings (the text a client sees)."""

from loraplex.server.textstream import TextAssembler


class ByteFallbackTokenizer:
    """Each id is one UTF-8 byte; incomplete characters decode to one U+FFFD per byte, as
    byte-fallback (SentencePiece-style) tokenizers do."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def _feed(assembler, text):
    out = "".join(assembler.add(b) for b in text.encode())
    return out + assembler.flush()


def test_multibyte_characters_are_never_split():
    assembler = TextAssembler(ByteFallbackTokenizer())
    pieces = [assembler.add(b) for b in "ab€ç日".encode()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) + assembler.flush() == "ab€ç日"


def test_the_earliest_stop_string_wins_whatever_its_order():
    assembler = TextAssembler(ByteFallbackTokenizer(), stop=["y", "xy"])
    assert _feed(assembler, "axy and more") == "a"
    assert assembler.stopped


def test_text_that_may_become_a_stop_string_is_held_back():
    assembler = TextAssembler(ByteFallbackTokenizer(), stop=["END"])
    out = [assembler.add(b) for b in "hello EN".encode()]
    assert "".join(out) == "hello "  # "EN" could still become "END"
    assert assembler.add(ord("D")) == "" and assembler.stopped
    no_stop = TextAssembler(ByteFallbackTokenizer(), stop=["END"])
    assert _feed(no_stop, "hello ENough") == "hello ENough"


class CountingTokenizer(ByteFallbackTokenizer):
    """Records how many ids each decode call is given."""

    def __init__(self):
        self.calls = []

    def decode(self, ids, skip_special_tokens=True):
        self.calls.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_token_decodes_a_bounded_window_whatever_the_length():
    """O(1) per token: 3,000 tokens in, no decode call ever sees more than a few ids (a
    re-decode of the whole text would see up to 3,000)."""
    tokenizer = CountingTokenizer()
    text = "naïve café, 日本語 and € signs. " * 100
    assert _feed(TextAssembler(tokenizer, stop=["STOP"]), text) == text
    assert len(tokenizer.calls) >= len(text.encode()) and max(tokenizer.calls) <= 4


def test_real_tokenizer_stream_equals_a_full_decode(tokenizer):
    """The SmolLM2 tokenizer (tokenizers' DecodeStream): the deltas add up to decoding all ids at
    once, for text with multi-byte characters split across byte tokens, and stop strings cut it."""
    text = "Grüße aus Köln! 日本語のテキスト 🙂🚀 and ASCII, done."
    ids = tokenizer.encode(text, add_special_tokens=False)
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    assembler = TextAssembler(tokenizer)
    pieces = [assembler.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + assembler.flush() == expected
    stopped = TextAssembler(tokenizer, stop=["Köln"])
    out = "".join(stopped.add(i) for i in ids) + stopped.flush()
    assert out == expected[: expected.index("Köln")] and stopped.stopped
