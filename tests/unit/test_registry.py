"""The adapter registry against a real engine (tiny random Llama, the torch backend built by
``build_runtime``, its scheduler thread running): references are taken atomically with loading,
only idle adapters are evicted, an engine that refuses an eviction keeps the victim resident in
both views, an overload waits a bounded time and is never the adapter's failure, and a
republished adapter is swapped in beside the old copy (never unloaded first), and a weighted
mix (``acquire_many``) holds all its members or none, and two mixes never wait on each other's
slots. After every test the registry and the engine agree (``check_consistent``)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time

import pytest

from loraplex.server.errors import AdapterInvalid, AdapterNotFound, Overloaded, RequestInvalid
from loraplex.server.registry import AdapterState
from loraplex.server.settings import ServerSettings
from loraplex.server.store.fingerprint import signature
from loraplex.server.wiring import build_runtime
from tests.oracle import greedy_request, make_random_adapter, reference_greedy

PROMPT = [1, 520, 3000, 44]
N = 6


@pytest.fixture(scope="module")
def pool(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry-pool")
    return {name: make_random_adapter(tiny_base, root / name, seed=i + 11, r=4) for i, name in enumerate(["a", "b", "c"])}


@pytest.fixture
def make_runtime(tiny_base, pool, tmp_path):
    """A real runtime over a store holding copies of the pool (``build_runtime``, engine thread started)."""
    made = []

    def make(**settings):
        store = tmp_path / "adapters"
        store.mkdir(exist_ok=True)
        for name, folder in pool.items():
            if not (store / name).exists():
                shutil.copytree(folder, store / name)
        runtime = build_runtime(ServerSettings(base=str(tiny_base), adapters_dir=str(store), grpc_port=0, dtype="float32", **settings))
        runtime.scheduler.start()
        runtime.registry.scan()
        runtime.events = []
        sink = runtime.registry.on_event
        runtime.registry.on_event = lambda kind, entry: (runtime.events.append((kind, entry.name)), sink(kind, entry))
        made.append(runtime)
        return runtime

    yield make
    for runtime in made:
        runtime.scheduler.stop()


async def engine_names(runtime) -> list[str]:
    return await asyncio.wrap_future(runtime.scheduler.call(lambda engine: list(engine.resident_adapters)))


async def assert_consistent(runtime) -> dict:
    report = await runtime.registry.check_consistent(lambda: engine_names(runtime))
    assert report["consistent"], report
    return report


async def generate(runtime, engine_name, n=N, prompt=PROMPT):
    """A greedy request straight through the scheduler on one engine copy; its token ids."""
    request, sink = greedy_request(f"t-{time.monotonic_ns()}", prompt, engine_name, n)
    runtime.scheduler.submit(request)
    while sink.finish is None:
        await asyncio.sleep(0.01)
    assert sink.finish == "length", sink.finish
    return sink.tokens


def test_a_load_never_evicts_an_adapter_a_request_is_about_to_use(make_runtime):
    """max-loras 1, two requests for different adapters at once (the 500s of issue 16): the
    second waits for the first to release, and each one's copy is in the engine while it holds it."""
    runtime = make_runtime(max_loras=1, adapter_wait_timeout=30)
    registry = runtime.registry

    async def one(name, hold):
        lease = await registry.acquire(name)
        assert lease.engine_name in await engine_names(runtime)  # resident while held
        tokens = await generate(runtime, lease.engine_name)
        await asyncio.sleep(hold)
        assert lease.engine_name in await engine_names(runtime)
        await registry.release(lease)
        return tokens

    async def run():
        results = await asyncio.gather(*(one(name, 0.05) for name in ["a", "b", "a", "c", "b", "a"]))
        await assert_consistent(runtime)
        return results

    results = asyncio.run(run())
    assert results[0] == results[2] == results[5] and results[1] == results[4] and results[0] != results[1]
    assert registry.evictions >= 2 and not [e for e in runtime.events if e[0] == "failed"]


def test_overload_waits_a_bounded_time_and_is_not_the_adapters_failure(make_runtime):
    runtime = make_runtime(max_loras=1, adapter_wait_timeout=0.3)
    registry = runtime.registry

    async def run():
        held = await registry.acquire("a")
        started = time.monotonic()
        with pytest.raises(Overloaded, match="adapter-wait-timeout"):
            await registry.acquire("b")
        waited = time.monotonic() - started
        b = registry.get("b")
        assert (b.state, b.error, b.refcount) == (AdapterState.AVAILABLE, None, 0)
        assert ("failed", "b") not in runtime.events
        # with a slot freeing within the wait, the request is served instead of refused
        registry.wait_timeout = 10
        waiting = asyncio.create_task(registry.acquire("b"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await registry.release(held)
        lease = await asyncio.wait_for(waiting, 10)
        assert lease.engine_name == "b" and registry.get("a").state == AdapterState.AVAILABLE
        await registry.release(lease)
        await assert_consistent(runtime)
        return waited

    waited = asyncio.run(run())
    assert 0.25 <= waited < 5
    assert runtime.metrics.registry.get_sample_value("loraplex_adapter_load_failures_total", {"adapter": "b"}) is None


def test_an_eviction_the_engine_refuses_leaves_the_victim_resident_in_both(make_runtime):
    """A row the registry does not know of (submitted to the scheduler directly) keeps adapter a
    busy in the engine: the eviction is refused, a stays resident in the registry too, and the
    newcomer gets a 429-class Overloaded rather than a registry/engine split."""
    runtime = make_runtime(max_loras=1, adapter_wait_timeout=0.5)
    registry = runtime.registry

    async def run():
        await registry.load("a")
        request, sink = greedy_request("outside", PROMPT, "a", 400)
        runtime.scheduler.submit(request)
        while not sink.tokens:
            await asyncio.sleep(0.01)
        with pytest.raises(Overloaded):
            await registry.acquire("b")
        assert registry.get("a").state == AdapterState.RESIDENT and await engine_names(runtime) == ["a"]
        await assert_consistent(runtime)
        runtime.scheduler.cancel(request, "cancelled")
        while sink.finish is None:
            await asyncio.sleep(0.01)
        lease = await registry.acquire("b")  # now a is idle in the engine too
        await registry.release(lease)
        await assert_consistent(runtime)

    asyncio.run(run())


def test_load_seconds_are_observed_for_on_demand_loads(make_runtime):
    runtime = make_runtime(max_loras=2)

    async def run():
        for name in ["a", "b", "c"]:
            await runtime.registry.release(await runtime.registry.acquire(name))

    asyncio.run(run())
    assert [e for e in runtime.events if e[0] == "loaded"] == [("loaded", "a"), ("loaded", "b"), ("loaded", "c")]
    assert runtime.metrics.registry.get_sample_value("loraplex_adapter_load_seconds_count") == 3
    assert runtime.metrics.registry.get_sample_value("loraplex_adapter_evictions_total") == 1


def test_a_resident_adapter_keeps_no_second_copy_of_its_tensors_in_the_registry(make_runtime):
    """The engine holds the weights; the registry keeps what describes them (rank, targets,
    digest), not the validated fp32 tensors (they were ~1x the file of RSS per adapter)."""
    runtime = make_runtime()

    async def run():
        await runtime.registry.release(await runtime.registry.acquire("a"))

    asyncio.run(run())
    entry = runtime.registry.entries["a"]
    assert entry.state == AdapterState.RESIDENT
    assert entry.copy.adapter.modules == {}
    info = entry.describe()
    assert info["rank"] == 4
    assert info["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _republish_in_place(folder, source):
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())


def test_republish_swaps_beside_the_old_copy_and_running_requests_finish_on_it(make_runtime, tiny_base, pool, tmp_path):
    runtime = make_runtime(max_loras=2)
    registry = runtime.registry
    folder = tmp_path / "adapters" / "a"
    new = make_random_adapter(tiny_base, tmp_path / "new-a", seed=99, r=4)
    old_expected = reference_greedy(tiny_base, pool["a"], PROMPT, n=N)
    new_expected = reference_greedy(tiny_base, new, PROMPT, n=N)
    assert old_expected != new_expected

    async def run():
        running = await registry.acquire("a")  # a request in flight on the old copy
        _republish_in_place(folder, new)
        assert await registry.republish("a", signature(folder)) == "swapped"
        fresh = await registry.acquire("a")
        assert (running.engine_name, fresh.engine_name) == ("a", "a@1")
        assert sorted(await engine_names(runtime)) == ["a", "a@1"]
        await assert_consistent(runtime)
        assert await generate(runtime, running.engine_name) == old_expected
        assert await generate(runtime, fresh.engine_name) == new_expected
        await registry.release(running)  # the old copy leaves with its last request
        await registry.release(fresh)
        await assert_consistent(runtime)
        assert await engine_names(runtime) == ["a@1"]
        assert await registry.republish("a", signature(folder)) == "unchanged"

    asyncio.run(run())
    assert ("republished", "a") in runtime.events


def test_a_refused_republish_keeps_the_resident_copy_serving(make_runtime, tiny_base, pool, tmp_path):
    runtime = make_runtime(max_loras=2)
    registry = runtime.registry
    folder = tmp_path / "adapters" / "b"
    expected = reference_greedy(tiny_base, pool["b"], PROMPT, n=N)

    async def run():
        await registry.load("b")
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        with pytest.raises(AdapterInvalid, match="DoRA"):
            await registry.republish("b", signature(folder))
        entry = registry.get("b")
        assert entry.state == AdapterState.RESIDENT
        lease = await registry.acquire("b")
        assert await generate(runtime, lease.engine_name) == expected
        await registry.release(lease)
        await assert_consistent(runtime)

    asyncio.run(run())


# ------------------------------------------------------------------ weighted mixes (acquire_many)
def _pins(registry, *names):
    return [registry.get(name).refcount for name in names]


def test_a_mix_holds_every_member_or_none(make_runtime, tiny_base, pool, tmp_path):
    runtime = make_runtime(max_loras=3)
    registry = runtime.registry
    broken = tmp_path / "adapters" / "broken"
    shutil.copytree(pool["c"], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    registry.scan()

    async def run():
        with pytest.raises(AdapterInvalid, match="DoRA"):
            await registry.acquire_many(["a", "broken"])
        assert _pins(registry, "a", "broken") == [0, 0]
        assert registry.get("broken").state == AdapterState.FAILED and registry.get("a").state != AdapterState.FAILED
        with pytest.raises(AdapterNotFound, match="nosuch"):
            await registry.acquire_many(["b", "nosuch"])
        assert _pins(registry, "b") == [0]
        with pytest.raises(RequestInvalid, match="'a' twice"):
            await registry.acquire_many(["a", "b", "a"])
        leases = await registry.acquire_many(["b", "a"])
        assert [lease.name for lease in leases] == ["b", "a"]
        assert _pins(registry, "a", "b") == [1, 1]
        assert {lease.engine_name for lease in leases} <= set(await engine_names(runtime))
        # the members serve as themselves through their leases' engine copies
        assert await generate(runtime, leases[1].engine_name) == reference_greedy(tiny_base, pool["a"], PROMPT, n=N)
        again = await registry.acquire_many(["a", "b"])  # all resident: pinned at once
        assert _pins(registry, "a", "b") == [2, 2]
        await registry.release_many(leases + again)
        await registry.release_many(leases)  # a lease is given back once
        assert _pins(registry, "a", "b") == [0, 0]
        await assert_consistent(runtime)

    asyncio.run(run())
    assert ("failed", "a") not in runtime.events


def test_a_mix_with_more_members_than_max_loras_is_refused_naming_both_numbers(make_runtime):
    runtime = make_runtime(max_loras=2)
    registry = runtime.registry

    async def run():
        with pytest.raises(RequestInvalid, match=r"combines 3 adapters but at most 2 .*--max-loras 2") as caught:
            await registry.acquire_many(["a", "b", "c"])
        assert caught.value.param == "adapters"
        assert _pins(registry, "a", "b", "c") == [0, 0, 0]
        assert await engine_names(runtime) == []

    asyncio.run(run())


def test_a_mix_waits_a_bounded_time_for_slots_then_429_holding_nothing(make_runtime):
    """max-loras 2 with c busy: the mix (a, b) gets a but no slot for b within the wait, so it
    is an Overloaded that pins nothing and fails no adapter; cancelled while waiting, it also
    pins nothing; once c is released, the waiting mix gets both. A mix waiting for its turn
    behind another mix's loads also gives up after the wait."""
    runtime = make_runtime(max_loras=2, adapter_wait_timeout=0.3)
    registry = runtime.registry

    async def run():
        held = await registry.acquire("c")
        started = time.monotonic()
        with pytest.raises(Overloaded, match="no slot freed within --adapter-wait-timeout 0.3s"):
            await registry.acquire_many(["a", "b"])
        waited = time.monotonic() - started
        assert 0.25 <= waited < 5, waited
        assert _pins(registry, "a", "b", "c") == [0, 0, 1]
        assert registry.get("b").error is None and registry.get("b").state == AdapterState.AVAILABLE
        registry.wait_timeout = 10
        cancelled = asyncio.create_task(registry.acquire_many(["a", "b"]))
        await asyncio.sleep(0.2)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert _pins(registry, "a", "b") == [0, 0]
        waiting = asyncio.create_task(registry.acquire_many(["a", "b"]))
        await asyncio.sleep(0.2)
        with pytest.raises(Overloaded, match="waited 0.1s .* while other mixes loaded"):
            await registry.acquire_many(["b", "a"], wait=0.1)  # its turn comes after the waiting mix
        assert not waiting.done()
        await registry.release(held)
        leases = await asyncio.wait_for(waiting, 10)
        assert sorted(await engine_names(runtime)) == ["a", "b"] and _pins(registry, "a", "b", "c") == [1, 1, 0]
        await registry.release_many(leases)
        await assert_consistent(runtime)

    asyncio.run(run())
    assert not [e for e in runtime.events if e[0] == "failed"]


def test_two_mixes_never_wait_on_each_others_slots(make_runtime, tiny_base, tmp_path):
    """max-loras 2, mixes (a, b) and (c, d) at once: loaded member by member in parallel, each
    would hold one slot and wait for the other forever (until both 429). Mixes load one at a
    time, so both are served, one after the other."""
    store = tmp_path / "adapters"
    make_random_adapter(tiny_base, store / "d", seed=41, r=4)
    runtime = make_runtime(max_loras=2, adapter_wait_timeout=30)
    registry = runtime.registry

    async def one(names):
        leases = await registry.acquire_many(names, wait=30)
        assert {lease.engine_name for lease in leases} <= set(await engine_names(runtime))
        await asyncio.sleep(0.1)
        await registry.release_many(leases)

    async def run():
        await asyncio.wait_for(asyncio.gather(one(["a", "b"]), one(["c", "d"]), one(["b", "a"]), one(["d", "c"])), 60)
        assert _pins(registry, "a", "b", "c", "d") == [0, 0, 0, 0]
        await assert_consistent(runtime)

    asyncio.run(run())
    assert registry.overloads == 0 and registry.evictions >= 2
