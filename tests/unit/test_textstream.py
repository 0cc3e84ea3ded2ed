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
