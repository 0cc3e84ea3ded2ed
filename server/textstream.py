"""Token ids -> text deltas for one request: incremental detokenization in O(1) per token that
never splits a UTF-8 character, and stop strings (the text is cut before the first stop string,
and text that could still become a stop string is held back until it can't).

Decoding: a fast (``tokenizers``) tokenizer goes through ``tokenizers.decoders.DecodeStream``,
which keeps a small window of ids and returns only the new text (None while a character is
incomplete); any other tokenizer through the same prefix-offset idea written out here: decode
only the ids since the last complete character, and emit what extends the text already decoded
from them. Either way a token costs the same whatever the length of the text so far.

Only the text not yet emitted (held back for stop strings or incomplete characters) is kept, so
stop-string search is bounded too. Knows tokenizers and strings; nothing of requests or HTTP.
"""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class _PrefixOffsetDecoder:
    """Incremental decoding with ``tokenizer.decode`` over a bounded window of ids."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []  # the window: ids since the last complete character (and one before)
        self.prefix = 0  # ids[:prefix] are context: their text was emitted already
        self.prefix_text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self._decode(self.ids)
        if text.endswith(REPLACEMENT) or len(text) <= len(self.prefix_text) or not text.startswith(self.prefix_text):
            return ""  # an incomplete character (or nothing new yet): wait for more ids
        delta = text[len(self.prefix_text) :]
        # keep the last id as context (tokenizers that merge spaces across ids decode it differently alone)
        self.ids = self.ids[-1:]
        self.prefix_text = self._decode(self.ids)
        return delta

    def rest(self) -> str:
        """What the window holds beyond the emitted text (an incomplete character, replaced)."""
        text = self._decode(self.ids)
        return text[len(self.prefix_text) :] if text.startswith(self.prefix_text) else ""


class _StreamDecoder:
    """``tokenizers``' ``DecodeStream`` over a fast tokenizer's backend."""

    def __init__(self, tokenizer, backend) -> None:
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=True)
        self.pending: list[int] = []  # ids whose text the stream has not returned yet

    def step(self, token_id: int) -> str:
        chunk = self.stream.step(self.backend, token_id)
        if chunk is None:
            self.pending.append(token_id)
            return ""
        self.pending = []
        return chunk

    def rest(self) -> str:
        if not self.pending:
            return ""
        return self.tokenizer.decode(self.pending, skip_special_tokens=True)


def _decoder_for(tokenizer):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        try:
            return _StreamDecoder(tokenizer, backend)
        except ImportError:  # tokenizers without DecodeStream (< 0.21)
            pass
    return _PrefixOffsetDecoder(tokenizer)


class TextAssembler:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.decoder = _decoder_for(tokenizer)
        self.pending = ""  # decoded text not emitted yet (held back), bounded by the longest stop string
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is safe to emit (may be empty)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.step(token_id)
        text = self.pending
        hits = [at for stop in self.stop if (at := text.find(stop)) != -1]
        if hits:  # the earliest stop string in the text wins, whatever its place in the list
            self.stopped = True
            return self._take(min(hits))
        safe = len(text) - self.hold
        # incomplete multi-byte characters decode as one or more U+FFFD (byte-fallback tokenizers): hold them all
        safe = min(safe, len(text.rstrip(REPLACEMENT)))
        return self._take(safe)

    def flush(self) -> str:
        if self.stopped:
            return ""
        self.pending += self.decoder.rest()
        return self._take(len(self.pending))

    def _take(self, end: int) -> str:
        end = max(0, end)
        delta, self.pending = self.pending[:end], self.pending[end:]
        return delta


class TokenPieces:
    """One token id -> (its text, its bytes), as logprobs show each token on its own (OpenAI's
    ``token`` and ``bytes``). Byte-level BPE tokenizers (GPT-2 style, SmolLM2) map the token's
    string back through ``transformers``' byte table, so a token holding half of a UTF-8
    character has its true bytes (its text shows U+FFFD); other tokenizers go through
    ``decode``. Special tokens keep their written form. Cached per id (bounded by the vocab)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        self._byte_of = None
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        if decoder is not None and type(decoder).__name__ == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode

            self._byte_of = {char: byte for byte, char in bytes_to_unicode().items()}

    def piece(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is not None:
            return cached
        raw = None
        if self._byte_of is not None:
            token = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(token, str) and all(ch in self._byte_of for ch in token):
                raw = bytes(self._byte_of[ch] for ch in token)
        if raw is None:
            raw = self.tokenizer.decode([token_id], skip_special_tokens=False).encode("utf-8")
        result = (raw.decode("utf-8", errors="replace"), list(raw))
        self._cache[token_id] = result
        return result
