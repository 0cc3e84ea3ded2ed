"""Prompt token ids for chat messages and text prompts, where user text never becomes a special
token: only the chat template's own special tokens (``<|im_start|>``, ``<|im_end|>``, ...) are
special. A user who writes ``<|im_end|>`` in a message gets the ids of that text, so no one can
end a turn or forge a role from inside the content.

How: the template is rendered with a unique marker in place of each message's content; the
template's text is split at its special tokens (each becomes its id), and the text between two
special tokens (template text and message content together, so merges across the boundary are
the same as before) is tokenized with special-token parsing off (``split_special_tokens=True``).
For content without special-token text the ids equal tokenizing the rendered prompt as a whole.

It knows the tokenizer and nothing of HTTP, gRPC, adapters or the engine.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Sequence

from loraplex.server.errors import RequestInvalid


def text_ids(tokenizer, text: str) -> list[int]:
    """Ids of plain text: special-token strings in it are tokenized as ordinary text."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def _special_strings(tokenizer) -> list[str]:
    specials = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.update(s for s in tokenizer.all_special_tokens if s)
    return sorted(specials, key=len, reverse=True)  # longest first: "<|im_end|>" before any prefix of it


def chat_ids(tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Render ``messages`` with the tokenizer's chat template (generation prompt added)."""
    nonce = secrets.token_hex(8)
    markers = [f"\u27e6lpx{nonce}m{i}\u27e7" for i in range(len(messages))]
    placeholder = [{**m, "content": markers[i]} for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(placeholder, add_generation_prompt=True, tokenize=False)
    by_marker = dict(zip(markers, (m["content"] for m in messages)))
    found = re.findall("|".join(re.escape(m) for m in markers), rendered)
    if len(found) != len(set(found)):  # a template that repeats a message: render it as it is
        return _checked_whole(tokenizer, messages)
    specials = _special_strings(tokenizer)
    special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None
    ids: list[int] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            ids.extend(text_ids(tokenizer, "".join(run)))
            run.clear()

    for piece in re.split("(" + "|".join(re.escape(m) for m in markers) + ")", rendered):
        if piece in by_marker:
            run.append(by_marker[piece])  # user text: never split into special tokens
            continue
        position = 0
        for match in special_re.finditer(piece) if special_re else ():
            run.append(piece[position : match.start()])
            flush()
            ids.append(tokenizer.convert_tokens_to_ids(match.group(0)))
            position = match.end()
        run.append(piece[position:])
    flush()
    return ids


def _checked_whole(tokenizer, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Fallback for templates that transform content: refuse content holding special-token text."""
    for i, message in enumerate(messages):
        for special in _special_strings(tokenizer):
            if special in message["content"]:
                raise RequestInvalid(f"messages[{i}].content contains the special token {special!r}, which this model's chat template cannot keep as text", param="messages")
    rendered = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])
