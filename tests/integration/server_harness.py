"""Start `loraplex serve` as a real subprocess on a free loopback port, wait for /ready, stop it.
Tests talk to it only over its socket (127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


#: a request that must still be running when a test acts on it (a timeout, a drain, a full queue):
#: LONG_TOKENS tokens, on a server started with LONG_ARGS. A 2000-token request was long enough
#: while a tiny model's stream ran at a few hundred tok/s; with one OpenMP team per process it ran
#: at over 1000 and finished inside a 2 s timeout (docs/benchmarks.md, ninth session).
LONG_TOKENS = 30000
LONG_ARGS = ("--max-model-len", "32768")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> None:
    """Poll GET /ready until 200 (the kubelet's readiness probe); fail if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout}s")


class ServerProcess:
    def __init__(self, base: Path, adapters_dir: Path, *extra: str, env: dict[str, str] | None = None, log_path: Path | None = None) -> None:
        self.port = free_port()
        self.grpc_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.log_path = log_path or adapters_dir.parent / f"server-{self.port}.log"
        self.args = [sys.executable, "-m", "loraplex.server.cli", "serve", "--base", str(base), "--adapters-dir", str(adapters_dir), "--port", str(self.port), "--grpc-port", str(self.grpc_port), "--log-level", "warning", "--served-model-name", "tiny", *extra]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return Path(self.log_path).read_text() if Path(self.log_path).exists() else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def complete(srv, model, prompt, n, **extra):
    """A greedy /v1/completions call (EOS ignored) with token-id prompts."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True, **extra}
    return httpx.post(srv.url + "/v1/completions", json=body, timeout=120)


def text_of(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=True)


def concurrent_completions(srv, plan, n) -> list[dict]:
    """All of ``plan`` ([(adapter or None for the base "tiny", prompt ids)]) at once, greedy, n tokens."""
    import asyncio

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(adapter, prompt):
                body = {"model": adapter or "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
                return (await client.post(srv.url + "/v1/completions", json=body)).json()
            return await asyncio.gather(*(one(a, p) for a, p in plan))

    return asyncio.run(run())
