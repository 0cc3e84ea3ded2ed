"""Token ids -> text deltas for one request: incremental detokenization that never splits a
UTF-8 character, and stop strings (the text is cut before the first stop string, and text that
could still become a stop string is held back until it can't)."""

from __future__ import annotations

from typing import Sequence


class TextAssembler:
    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already returned
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append a token; return the new text that is safe to emit (may be empty)."""
        self.ids.append(token_id)
        text = self._text()
        hits = [at for stop in self.stop if (at := text.find(stop, max(0, self.emitted - len(stop)))) != -1]
        if hits:  # the earliest stop string in the text wins, whatever its place in the list
            self.stopped = True
            return self._take(text, min(hits))
        safe = len(text) - self.hold
        # incomplete multi-byte characters decode as one or more U+FFFD (byte-fallback tokenizers): hold them all
        safe = min(safe, len(text.rstrip("\ufffd")))
        return self._take(text, safe)

    def flush(self) -> str:
        if self.stopped:
            return ""
        return self._take(self._text(), None)

    def _take(self, text: str, end: int | None) -> str:
        end = len(text) if end is None else max(self.emitted, end)
        delta = text[self.emitted : end]
        self.emitted = end
        return delta
