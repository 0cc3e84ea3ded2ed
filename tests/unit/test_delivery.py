"""Engine thread -> event loop delivery (``generation.Outbox`` over ``Scheduler.after_pass``):
what the engine emits during one scheduler pass reaches the loop in one wakeup, in order; from
other threads at once. A real ``Scheduler`` thread over a small scripted engine (no model: the
delivery path is what is under test here; the engine itself is tested against peft elsewhere)."""

from __future__ import annotations

import asyncio
import threading

from loraplex.server.generation import Outbox
from loraplex.server.scheduler import EngineRequest, SamplingParams, Scheduler


class CountingOutbox(Outbox):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.wakeups = 0

    def _drain(self) -> None:
        self.wakeups += 1
        super()._drain()


class ScriptedEngine:
    """Each step gives every running request its next token (0, 1, 2, ...) and finishes it with
    "length" at ``max_tokens``; what the scheduler needs of the ``Engine`` protocol, nothing more."""

    max_batch_size = 8

    def __init__(self) -> None:
        self.running: list[list] = []  # [request, tokens made]
        self.steps = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_capacity(self, rows: int = 1) -> bool:
        return len(self.running) + rows <= self.max_batch_size

    def admit(self, request: EngineRequest) -> None:
        self.running.append([request, 0])

    def step(self) -> None:
        self.steps += 1
        keep = []
        for entry in self.running:
            request, made = entry
            if request.cancelled:
                request.emit(None, request.cancel_reason)
                continue
            request.emit(made, None)
            entry[1] = made + 1
            if entry[1] >= request.params.max_tokens:
                request.emit(None, "length")
            else:
                keep.append(entry)
        self.running = keep

    def fail_all(self, reason: str = "error") -> None:
        for request, _ in self.running:
            request.emit(None, reason)
        self.running = []


def test_outbox_holds_the_engine_threads_posts_until_the_pass_ends() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        deferred = threading.Event()
        outbox = CountingOutbox(loop, deferred.is_set)
        got: list[int] = []

        def engine_pass() -> None:  # another thread, "inside a pass": posts wait for flush
            deferred.set()
            for i in range(5):
                outbox.post(got.append, i)
            held.set()
            release.wait(5)
            outbox.flush()

        held, release = threading.Event(), threading.Event()
        worker = threading.Thread(target=engine_pass)
        worker.start()
        await asyncio.to_thread(held.wait, 5)
        await asyncio.sleep(0.05)
        assert got == [] and outbox.wakeups == 0  # nothing crosses before the pass ends
        release.set()
        await asyncio.to_thread(worker.join, 5)
        for _ in range(50):
            if got:
                break
            await asyncio.sleep(0.01)
        assert got == [0, 1, 2, 3, 4] and outbox.wakeups == 1  # in order, one wakeup

        deferred.clear()  # any other thread: handed over at once, without a flush
        threading.Thread(target=outbox.post, args=(got.append, 9)).start()
        for _ in range(50):
            if len(got) == 6:
                break
            await asyncio.sleep(0.01)
        assert got[-1] == 9

    asyncio.run(main())


def test_scheduler_delivers_each_pass_in_one_wakeup_and_in_order() -> None:
    engine = ScriptedEngine()
    scheduler = Scheduler(engine, max_queue=8)
    hook_threads: list[bool] = []
    scheduler.after_pass(lambda: hook_threads.append(scheduler.on_engine_thread()))

    async def main() -> tuple[dict, CountingOutbox]:
        loop = asyncio.get_running_loop()
        outbox = CountingOutbox(loop, scheduler.on_engine_thread)
        scheduler.after_pass(outbox.flush)
        received: dict[str, list] = {"a": [], "b": [], "c": []}
        done = {name: loop.create_future() for name in received}

        def emitter(name: str):
            def on_loop(token, finish) -> None:
                received[name].append(token if finish is None else finish)
                if finish is not None:
                    done[name].set_result(None)

            return lambda token, finish, logprob=None: outbox.post(on_loop, token, finish)

        scheduler.start()
        try:
            for name in received:
                scheduler.submit(EngineRequest(name, [1, 2, 3], None, SamplingParams(max_tokens=6, temperature=0.0), emitter(name)))
            await asyncio.wait_for(asyncio.gather(*done.values()), 10)
        finally:
            scheduler.stop()
        return received, outbox

    received, outbox = asyncio.run(main())
    for name, items in received.items():
        assert items == [0, 1, 2, 3, 4, 5, "length"], name
    # 3 requests x 7 emits = 21 deliveries, never more than one loop wakeup per engine step
    assert 1 <= outbox.wakeups <= engine.steps, (outbox.wakeups, engine.steps)
    assert hook_threads and all(hook_threads)  # hooks run on the engine thread
    assert not scheduler.on_engine_thread()  # ... and this thread is not it


def test_a_failing_callback_does_not_lose_the_others() -> None:
    async def main() -> list:
        loop = asyncio.get_running_loop()
        errors: list = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context["exception"]))
        outbox = Outbox(loop, lambda: True)  # as on the engine thread: held until flush
        got: list[int] = []
        outbox.post(got.append, 1)
        outbox.post(lambda: 1 / 0)
        outbox.post(got.append, 2)
        outbox.flush()
        await asyncio.sleep(0.05)
        assert got == [1, 2]
        return errors

    errors = asyncio.run(main())
    assert len(errors) == 1 and isinstance(errors[0], ZeroDivisionError)
