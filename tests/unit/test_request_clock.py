"""RequestClock: each latency series is observed at its own moment (queue time at admission,
TTFT at the first token, ITL between tokens, e2e at the end), so queue time and TTFT differ."""

from __future__ import annotations

import pytest

from loraplex.server.metrics import RequestClock, ServerMetrics


def _sample(metrics, name, adapter="a"):
    return metrics.registry.get_sample_value(name, {"adapter": adapter})


def test_each_series_is_measured_from_its_own_event():
    metrics = ServerMetrics()
    clock = RequestClock(metrics, "a", submitted=100.0)
    clock.admitted(100.5)
    clock.admitted(100.9)  # a second report changes nothing
    assert not clock.started
    clock.token(102.0)
    clock.token(102.25)
    clock.token(102.75)
    clock.finished(103.0)
    assert _sample(metrics, "loraplex_queue_time_seconds_count") == 1
    assert _sample(metrics, "loraplex_queue_time_seconds_sum") == pytest.approx(0.5)
    assert _sample(metrics, "loraplex_time_to_first_token_seconds_sum") == pytest.approx(2.0)
    assert _sample(metrics, "loraplex_inter_token_latency_seconds_count") == 2
    assert _sample(metrics, "loraplex_inter_token_latency_seconds_sum") == pytest.approx(0.75)
    assert _sample(metrics, "loraplex_e2e_request_latency_seconds_sum") == pytest.approx(3.0)
    assert clock.started


def test_a_request_that_never_got_admitted_has_no_queue_time_but_an_e2e():
    metrics = ServerMetrics()
    clock = RequestClock(metrics, "b", submitted=5.0)
    clock.finished(6.0)
    assert _sample(metrics, "loraplex_queue_time_seconds_count", "b") is None
    assert _sample(metrics, "loraplex_e2e_request_latency_seconds_count", "b") == 1


def _lora_info(metrics):
    for family in metrics.registry.collect():
        if family.name == "vllm:lora_requests_info":
            return [(s.labels["running_lora_adapters"], s.labels["waiting_lora_adapters"], s.labels["max_lora"]) for s in family.samples]
    raise AssertionError("vllm:lora_requests_info is missing")


def test_adapter_activity_lists_waiting_then_running_adapters_but_never_the_base():
    from loraplex.server.metrics import AdapterActivity

    metrics = ServerMetrics()
    activity = AdapterActivity(metrics, max_loras=4, base_name="base")
    assert _lora_info(metrics) == [("", "", "4")]  # published from the start
    activity.enter("a")
    activity.enter("base")
    activity.enter("b")
    assert _lora_info(metrics) == [("", "a,b", "4")]
    activity.start("a")
    activity.start("base")
    assert _lora_info(metrics) == [("a", "b", "4")]
    activity.leave("a", started=True)
    activity.leave("b", started=False)
    activity.leave("base", started=True)
    assert _lora_info(metrics) == [("", "", "4")]
    assert activity.waiting == {} and activity.running == {}
