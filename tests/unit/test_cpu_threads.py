"""One OpenMP team per server process (server/engine/cpu_threads.py): the engine thread runs torch
on ENGINE_THREADS threads, helper threads on one and open no libgomp pool, start-up's loader
thread takes every core and its pool ends with it; the scheduler's thread, the server app's
asyncio executor and the LoRA refold thread follow the rule.

Each check runs in a fresh interpreter (OMP_NUM_THREADS=2, so a team exists even on a one-CPU
runner): torch's thread settings are per thread and leave a process-wide default behind, which
must neither leak into the rest of the suite nor come from it. A libgomp pool is observed as OS
threads of the process (/proc/self/task) that appear when a thread first runs a parallel op.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")

_PRELUDE = """
import asyncio, json, os, threading, torch
from loraplex.server.engine import cpu_threads

def os_threads():
    return len(os.listdir("/proc/self/task"))

def parallel_op():
    torch.ones(8_000_000).mul_(2.0)  # far past torch's grain size: an OpenMP region

def on_thread(fn, keep_alive):
    # run fn on a new thread and keep that thread alive (blocked) while the caller looks
    box, done, release = {}, threading.Event(), threading.Event()
    def target():
        box["value"] = fn()
        done.set()
        release.wait()
    t = threading.Thread(target=target, daemon=True)
    t.start()
    done.wait()
    if not keep_alive:
        release.set(); t.join()
    return box["value"], release, t
"""


def _run(body: str) -> dict:
    script = _PRELUDE + textwrap.dedent(body)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_plain_thread_opens_a_team_and_a_helper_thread_does_not():
    out = _run("""
        before = os_threads()
        def plain():  # first: torch's default for a new thread is still ENGINE_THREADS
            parallel_op()
            return torch.get_num_threads()
        plain_count, release1, t1 = on_thread(plain, keep_alive=True)
        with_plain = os_threads() - before  # the plain thread and its pool's worker
        def helper():
            cpu_threads.helper_thread()
            parallel_op()
            return torch.get_num_threads()
        helper_count, release2, t2 = on_thread(helper, keep_alive=True)
        with_helper = os_threads() - before - with_plain  # the helper thread alone
        print(json.dumps({"engine_threads": cpu_threads.ENGINE_THREADS, "helper": helper_count, "plain": plain_count,
                          "with_helper": with_helper, "with_plain": with_plain}))
    """)
    assert out["engine_threads"] == 2
    assert out["helper"] == 1
    assert out["with_helper"] == 1, out  # only the helper thread
    assert out["plain"] == 2
    assert out["with_plain"] == 2, out  # the plain thread and one libgomp worker of its pool


def test_engine_and_loader_threads_take_engine_threads_whatever_default_a_helper_left():
    out = _run("""
        on_thread(cpu_threads.helper_thread, keep_alive=False)  # leaves torch's default for new threads at 1
        fresh, _, _ = on_thread(torch.get_num_threads, keep_alive=False)
        def engine():
            cpu_threads.engine_thread()
            return torch.get_num_threads()
        engine_count, _, _ = on_thread(engine, keep_alive=False)
        after_engine, _, _ = on_thread(torch.get_num_threads, keep_alive=False)  # the default stays one

        import contextvars
        var = contextvars.ContextVar("var", default="unset")
        async def load():
            var.set("seen")
            return await cpu_threads.in_own_thread(lambda: (torch.get_num_threads(), var.get()))
        loader, context_value = asyncio.run(load())
        after_loader, _, _ = on_thread(torch.get_num_threads, keep_alive=False)

        before = os_threads()
        async def heavy():
            return await cpu_threads.in_own_thread(lambda: (parallel_op(), torch.get_num_threads())[1])
        asyncio.run(heavy())
        import time
        deadline = time.monotonic() + 10
        while os_threads() > before and time.monotonic() < deadline:  # the thread is ending
            time.sleep(0.01)
        after = os_threads()  # the loader thread ended, and its pool with it

        async def fails():
            try:
                await cpu_threads.in_own_thread(lambda: 1 / 0)
            except ZeroDivisionError:
                return "raised"
        print(json.dumps({"fresh": fresh, "engine": engine_count, "loader": loader, "leftover": after - before,
                          "error": asyncio.run(fails()), "after_engine": after_engine, "after_loader": after_loader,
                          "context": context_value}))
    """)
    assert out["fresh"] == 1  # the trap: a thread that does not set its count inherits a helper's 1
    assert out["engine"] == 2
    assert out["loader"] == 2
    assert out["leftover"] == 0, out
    assert out["error"] == "raised"
    assert out["after_engine"] == out["after_loader"] == 1  # a thread nobody sets up opens no team
    assert out["context"] == "seen"  # the caller's contextvars reach the thread, as with asyncio.to_thread


def test_the_server_pieces_follow_the_rule():
    """The scheduler's engine thread, the server app's default executor (what asyncio.to_thread
    uses: adapter reads and installs) and the LoRA refold thread."""
    out = _run("""
        from fastapi.testclient import TestClient
        from loraplex.server.runtime import create_server_app
        from loraplex.server.scheduler import Scheduler
        from loraplex.server.settings import ServerSettings

        on_thread(cpu_threads.helper_thread, keep_alive=False)  # a helper ran first: the default is 1

        class Idle:  # the scheduler only asks an idle engine how many rows run
            num_running = 0
            max_batch_size = 1
        scheduler = Scheduler(Idle(), max_queue=1)
        scheduler.start()
        engine_count = scheduler.call(lambda engine: torch.get_num_threads()).result(timeout=30)
        scheduler.stop()

        # the app's lifespan installs the executor before the runtime boots (a missing base
        # fails the boot: not what is checked here)
        settings = ServerSettings(base="/nonexistent-base-folder", grpc_port=0)
        with TestClient(create_server_app(settings)) as client:
            executor_count = client.portal.call(asyncio.to_thread, torch.get_num_threads)

        from loraplex.server.engine import llama_forward
        seen = {}
        class Once:  # stands in for the forward's refold: records the thread's count
            _refresh_state = threading.Condition()
            _refresh_wanted = True
            _refresher = True
            def refresh_lora(self, lock):
                seen["refold"] = torch.get_num_threads()
        def refold():
            torch.set_num_threads(2)  # as if the thread had inherited the engine's count
            llama_forward.LlamaStepForward._refresh_loop(Once(), None)
            return seen["refold"]
        refold_count, _, _ = on_thread(refold, keep_alive=False)
        print(json.dumps({"engine": engine_count, "executor": executor_count, "refold": refold_count}))
    """)
    assert out == {"engine": 2, "executor": 1, "refold": 1}
