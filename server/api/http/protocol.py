"""Request bodies of the HTTP API (OpenAI / vLLM field names), as pydantic models.

Nothing is silently ignored: a field that is not declared here is refused with 400 naming it
(``extra="forbid"``, OpenAI's "Unrecognized request argument"); integer and boolean fields are
strict (``true``, ``"8"`` and ``8.0`` are not integers). Fields that OpenAI or vLLM define and
that loraplex does not implement yet are declared in ``NOT_YET`` so that their neutral value
(``best_of: 1``, ``min_p: 0``, ...) is accepted and any other value is refused
with 400 saying so. Value ranges are checked by the service (one place for both fronts).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model, StrictBool, StrictFloat, StrictInt, StrictStr

from loraplex.server.errors import RequestInvalid

Number = StrictInt | StrictFloat


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: StrictBool = False


def _neutral(value: Any, allowed: tuple) -> bool:
    """True when ``value`` is one of ``allowed`` with a matching JSON type (0 is not false)."""
    for neutral in allowed:
        if isinstance(neutral, bool) or neutral is None or isinstance(value, bool):
            if value is neutral or (isinstance(value, bool) and isinstance(neutral, bool) and value == neutral):
                return True
        elif isinstance(neutral, (int, float)) and isinstance(value, (int, float)):
            if value == neutral:
                return True
        elif value == neutral and type(value) is type(neutral):
            return True
    return False


#: field -> the values that mean "off" (accepted); any other value gets 400 "not supported yet"
NOT_YET_COMMON: dict[str, tuple] = {
    "min_p": (None, 0),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "structured_outputs": (None,),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
    "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,),
}
NOT_YET_CHAT: dict[str, tuple] = {
    **NOT_YET_COMMON,
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "store": (None, False),
    "metadata": (None,),
    "service_tier": (None, "auto", "default"),
    "echo": (None, False),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "chat_template": (None,),
    "chat_template_kwargs": (None,),
}
NOT_YET_COMPLETION: dict[str, tuple] = {
    **NOT_YET_COMMON,
    "suffix": (None, ""),
}


class _Sampling(_Body):
    model: StrictStr
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = Field(None, description="vLLM extension: -1 or 0 = off")
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = Field(None, description="vLLM extension")
    n: StrictInt = Field(1, description="choices, 1 to --max-n (default 8); with a seed, choice i samples with seed + i")
    ignore_eos: StrictBool = Field(False, description="vLLM extension")
    presence_penalty: Number | None = Field(None, description="[-2, 2]; 0 = off")
    frequency_penalty: Number | None = Field(None, description="[-2, 2]; 0 = off")
    repetition_penalty: Number | None = Field(None, description="vLLM extension: (0, 10]; 1 = off")
    logit_bias: dict[str, Any] | None = Field(None, description="token id (string) -> bias in [-100, 100]; at most --max-logit-bias entries")
    min_tokens: StrictInt | None = Field(None, description="vLLM extension: stop tokens are masked until this many tokens are out (<= max_tokens)")
    response_format: dict[str, Any] | None = Field(None, description="{type: text | json_object | json_schema}")
    guided_json: Any = Field(None, description="vLLM extension: a JSON schema (object or string)")
    guided_regex: StrictStr | None = Field(None, description="vLLM extension: a regular expression")
    guided_choice: list[StrictStr] | None = Field(None, description="vLLM extension: one of these strings")
    guided_grammar: StrictStr | None = Field(None, description="vLLM extension: a grammar (see docs/api.md)")
    adapters: list[Any] | None = Field(None, description='loraplex extension: a weighted adapter mix [{"name", "weight"}, ...]; model = the base')
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, description="an end-user id (metadata; does not change the output)")

    #: fields declared (with ``Any``) by the subclasses; only their neutral value is accepted
    NOT_YET: ClassVar[dict[str, tuple]] = {}

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def refuse_unsupported(self) -> None:
        """400 for an OpenAI/vLLM field set to anything but its neutral value."""
        for name, allowed in self.NOT_YET.items():
            value = getattr(self, name)
            if not _neutral(value, allowed):
                shown = ", ".join(json.dumps(a) for a in allowed)
                raise RequestInvalid(f"{name} is not supported yet by loraplex (accepted values: {shown}); see docs/api.md", param=name)


def _not_yet_fields(table: dict[str, tuple]) -> dict[str, Any]:
    return {name: (Any, Field(None, description="not supported yet: only its neutral value is accepted")) for name in table}


class ChatMessage(_Body):
    role: StrictStr
    content: StrictStr | list[dict[str, Any]] | None = None
    name: Any = Field(None, description="not supported: must be absent")
    tool_calls: Any = Field(None, description="not supported: must be absent")
    tool_call_id: Any = Field(None, description="not supported: must be absent")
    function_call: Any = Field(None, description="not supported: must be absent")

    def text(self, index: int) -> str:
        """The message text: a string, or text parts joined; any other part type is refused."""
        for name in ("name", "tool_calls", "tool_call_id", "function_call"):
            if getattr(self, name) is not None:
                raise RequestInvalid(f"messages[{index}].{name} is not supported yet by loraplex", param=f"messages[{index}].{name}")
        if isinstance(self.content, str):
            return self.content
        if self.content is None:
            raise RequestInvalid(f"messages[{index}].content is required (a string or a list of text parts)", param=f"messages[{index}].content")
        parts = []
        for j, part in enumerate(self.content):
            param = f"messages[{index}].content[{j}]"
            kind = part.get("type")
            if kind != "text":
                shown = kind if isinstance(kind, str) else "(missing)"
                raise RequestInvalid(
                    f"messages[{index}].content[{j}] has type {ascii(shown)[1:-1]!r}: only text parts are supported (this server serves text-only models)", param=param
                )
            extra = sorted(set(part) - {"type", "text"})
            if extra:
                raise RequestInvalid(f"messages[{index}].content[{j}] has unrecognized keys: {', '.join(ascii(k) for k in extra)}", param=param)
            if not isinstance(part.get("text"), str):
                raise RequestInvalid(f"messages[{index}].content[{j}].text must be a string", param=param + ".text")
            parts.append(part["text"])
        return "".join(parts)


class _ChatBody(_Sampling):
    messages: list[ChatMessage]
    logprobs: StrictBool | None = Field(None, description="each generated token's logprob")
    top_logprobs: StrictInt | None = Field(None, description="0 to 20 most likely tokens per position (needs logprobs: true)")
    NOT_YET: ClassVar[dict[str, tuple]] = NOT_YET_CHAT


class _CompletionBody(_Sampling):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]] = Field(
        ..., description="text, token ids, or a list of either (one choice set per prompt; at most --max-prompts)"
    )
    logprobs: StrictInt | None = Field(None, description="0 to 20: each token's logprob and that many alternatives")
    echo: StrictBool | None = Field(None, description="the prompt first (and its tokens' logprobs); max_tokens 0 scores the prompt only")
    NOT_YET: ClassVar[dict[str, tuple]] = NOT_YET_COMPLETION


ChatCompletionRequest = create_model("ChatCompletionRequest", __base__=_ChatBody, **_not_yet_fields(NOT_YET_CHAT))
CompletionRequest = create_model("CompletionRequest", __base__=_CompletionBody, **_not_yet_fields(NOT_YET_COMPLETION))


class LoadLoraRequest(_Body):
    lora_name: StrictStr
    lora_path: StrictStr | None = None


class UnloadLoraRequest(_Body):
    lora_name: StrictStr


class TokenizeRequest(_Body):
    """vLLM's ``/tokenize``: ``prompt`` or chat ``messages``."""

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: list[StrictInt]
