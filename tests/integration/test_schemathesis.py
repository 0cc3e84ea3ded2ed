"""Schemathesis fuzzes the HTTP API from its own OpenAPI schema (bounded examples, in CI): no
server errors, and every status code, content type and response body matches the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance
from schemathesis.checks import not_a_server_error

from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter


@pytest.fixture(scope="module")
def live(tiny_base, tmp_path_factory):
    store = tmp_path_factory.mktemp("schemathesis") / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "st", seed=80)
    with ServerProcess(tiny_base, store, "--max-model-len", "64", "--max-tokens-default", "4") as srv:
        yield srv


def test_api_conforms_to_its_schema(live):
    api = schemathesis.openapi.from_url(live.url + "/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in api.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/load_lora_adapter"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            case.call_and_validate(checks=checks, timeout=60)

        check()
