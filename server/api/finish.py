"""THE finish-reason map: why the service ended a request -> what each front says.

HTTP speaks OpenAI's values: ``stop`` (end-of-sequence, a stop token or a stop string) and
``length`` (``max_tokens`` or ``--max-model-len``). Where OpenAI has no value, HTTP says ours, as
documented extensions: ``timeout`` (``--request-timeout`` ended it) and ``abort`` (still running
at the shutdown deadline). ``cancelled`` (the client left) reaches nobody on HTTP; it is mapped
for completeness. gRPC has three values; both extensions are ``FINISH_REASON_CANCELLED`` there
("ended by the server"). A reason missing here is a bug: it maps to the cancelled spelling and is
logged, never passed through raw.

Knows the protocol spellings only; nothing of the engine or the service's internals.
"""

from __future__ import annotations

import logging

from loraplex.v1 import inference_pb2 as pb

log = logging.getLogger("loraplex.api")

#: service finish reason -> (HTTP ``finish_reason``, gRPC ``FinishReason``)
FINISH_REASONS: dict[str, tuple[str, int]] = {
    "stop": ("stop", pb.FINISH_REASON_STOP),
    "length": ("length", pb.FINISH_REASON_LENGTH),
    "timeout": ("timeout", pb.FINISH_REASON_CANCELLED),  # extension: OpenAI has no value for it
    "abort": ("abort", pb.FINISH_REASON_CANCELLED),  # extension: OpenAI has no value for it
    "cancelled": ("cancelled", pb.FINISH_REASON_CANCELLED),
}
_UNKNOWN = FINISH_REASONS["cancelled"]


def _lookup(reason: str) -> tuple[str, int]:
    spelled = FINISH_REASONS.get(reason)
    if spelled is None:
        log.error("finish reason %r has no protocol spelling; answering %r", reason, _UNKNOWN[0])
        return _UNKNOWN
    return spelled


def http_finish_reason(reason: str | None) -> str | None:
    """OpenAI ``finish_reason`` (None while the request goes on)."""
    return None if reason is None else _lookup(reason)[0]


def grpc_finish_reason(reason: str | None) -> int:
    """gRPC ``FinishReason`` (UNSPECIFIED while the request goes on)."""
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _lookup(reason)[1]
