"""The one finish-reason map both fronts use (server/api/finish.py)."""

from __future__ import annotations

import logging

import pytest

from loraplex.server.api.finish import FINISH_REASONS, grpc_finish_reason, http_finish_reason
from loraplex.server.engine.rows import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP
from loraplex.v1 import inference_pb2 as pb

#: what OpenAI's API defines for choices[].finish_reason
OPENAI = {"stop", "length", "tool_calls", "content_filter", "function_call"}


@pytest.mark.parametrize(
    "reason, http, grpc",
    [
        ("stop", "stop", pb.FINISH_REASON_STOP),
        ("length", "length", pb.FINISH_REASON_LENGTH),
        ("timeout", "timeout", pb.FINISH_REASON_CANCELLED),
        ("abort", "abort", pb.FINISH_REASON_CANCELLED),
        ("cancelled", "cancelled", pb.FINISH_REASON_CANCELLED),
        (None, None, pb.FINISH_REASON_UNSPECIFIED),
    ],
)
def test_each_reason_has_one_spelling_per_front(reason, http, grpc):
    assert http_finish_reason(reason) == http
    assert grpc_finish_reason(reason) == grpc


def test_every_engine_reason_a_client_can_see_is_mapped():
    for reason in (FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED):
        assert reason in FINISH_REASONS


def test_http_uses_openai_values_wherever_openai_has_one():
    extensions = {http for http, _ in FINISH_REASONS.values()} - OPENAI
    assert extensions == {"timeout", "abort", "cancelled"}  # the documented extensions, nothing else


def test_an_unmapped_reason_is_logged_and_never_passed_through(caplog):
    with caplog.at_level(logging.ERROR, logger="loraplex.api"):
        assert http_finish_reason("rejected") == "cancelled"
        assert grpc_finish_reason("rejected") == pb.FINISH_REASON_CANCELLED
    assert "rejected" in caplog.text
