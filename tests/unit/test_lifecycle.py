"""Readiness and the lifecycle: the one state object's moves, and a real runtime (tiny random
Llama, real engine thread, real warm-up forward) going loading -> ready -> draining -> stopped,
with the service and the gRPC-health listener reading that same object."""

from __future__ import annotations

import asyncio

import pytest

from loraplex.server.readiness import Phase, Readiness


def test_readiness_moves_once_each_way_and_tells_listeners():
    readiness, seen = Readiness(), []
    readiness.on_change(seen.append)
    assert readiness.phase is Phase.LOADING and not readiness.ready
    assert readiness.mark_ready() and readiness.ready
    assert not readiness.mark_ready()  # already ready: no second notification
    assert readiness.begin_drain() and not readiness.ready
    assert not readiness.begin_drain()  # a second SIGTERM changes nothing
    assert not readiness.mark_ready()  # draining never turns ready again
    assert readiness.mark_stopped() and readiness.phase is Phase.STOPPED
    assert seen == [True, False]


def test_a_drain_that_starts_while_loading_wins_over_a_late_warm_up():
    readiness, seen = Readiness(), []
    readiness.on_change(seen.append)
    assert readiness.begin_drain()
    assert not readiness.mark_ready()
    assert readiness.phase is Phase.DRAINING and seen == []


def test_a_failed_start_keeps_its_reason_and_is_never_ready():
    readiness = Readiness()
    assert readiness.mark_failed("no such base")
    assert readiness.error == "no such base" and not readiness.ready
    assert not readiness.mark_ready()
    assert readiness.mark_stopped()


@pytest.fixture
def settings(tiny_base, tmp_path):
    from loraplex.server.settings import ServerSettings

    (tmp_path / "adapters").mkdir()
    return ServerSettings(base=str(tiny_base), adapters_dir=str(tmp_path / "adapters"), grpc_port=0, shutdown_timeout=0.3, max_batch_size=2)


def test_a_real_runtime_goes_ready_then_drains_and_aborts_what_runs_past_the_deadline(settings):
    from loraplex.server import lifecycle
    from loraplex.server.errors import NotReady
    from loraplex.server.service import GenerationRequest
    from loraplex.server.wiring import build_runtime

    async def scenario():
        readiness, seen = Readiness(), []
        readiness.on_change(seen.append)
        runtime = await asyncio.to_thread(build_runtime, settings, readiness)
        assert runtime.service.readiness is readiness and not runtime.service.ready
        try:
            with pytest.raises(NotReady):  # loading: refused before anything is queued
                await anext(runtime.service.generate(GenerationRequest(model=runtime.service.base_name, prompt_token_ids=[1, 2])))
            await lifecycle.start_runtime(runtime)  # includes a real one-token warm-up forward
            assert runtime.service.ready and seen == [True]
            long = runtime.service.generate(GenerationRequest(model=runtime.service.base_name, prompt_token_ids=[1, 5, 9], max_tokens=1500, ignore_eos=True, temperature=0))
            first = await anext(long)
            assert first.finish_reason is None
            lifecycle.begin_drain(readiness, runtime)
            assert not runtime.service.ready and seen == [True, False]
            with pytest.raises(NotReady):  # draining: new work refused at once
                await anext(runtime.service.generate(GenerationRequest(model=runtime.service.base_name, prompt_token_ids=[1, 2])))
            events = [event async for event in long]  # the running request goes on until the deadline
            assert events[-1].finish_reason == "abort"
            assert 1 + len(events) < 1500
            # queue time ends at admission (the engine thread's hook), TTFT at the first token
            sample = lambda name: runtime.metrics.registry.get_sample_value(name, {"adapter": runtime.service.base_name})  # noqa: E731
            assert sample("loraplex_queue_time_seconds_count") == 1
            assert sample("loraplex_time_to_first_token_seconds_count") == 1
            assert 0 <= sample("loraplex_queue_time_seconds_sum") < sample("loraplex_time_to_first_token_seconds_sum")
        finally:
            lifecycle.stop_runtime(runtime)
        assert readiness.phase is Phase.STOPPED
        assert not runtime.scheduler._thread.is_alive()

    asyncio.run(scenario())
