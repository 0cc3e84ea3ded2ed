"""Train-to-serve from the console: data files (the shipped demo sets and size-limited uploads,
validated by the trainer's own record reader in a subprocess, ``loraplex.training.inspect_data``),
one ``train-adapter`` subprocess at a time
writing into the store (it publishes atomically, so the registry's next scan lists the new
adapter), its progress (step, loss, ETA) read from the trainer's progress bar on stderr, and
stopping it (SIGTERM, then SIGKILL after ``STOP_GRACE_SECONDS``; the trainer stages into the
store only after its last step, so a stopped run publishes nothing).

Files are chosen by id (``demo:<file>`` or ``upload:<id>``), never by a client-given path.
Knows nothing of HTTP beyond raising loraplex errors, and never imports the training package
(it runs it: import contract ``server-not-training``).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplex.server.errors import AdapterExists, AdapterNotFound, Overloaded, RequestInvalid
from loraplex.server.store import AdapterStore, validate_adapter_name

#: largest upload accepted (the HTTP body limit of the app is above this)
MAX_UPLOAD_BYTES = 2 * 1024 * 1024
MAX_UPLOADS = 20
UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv")
MAX_STEPS = 5000
LOG_TAIL = 30
#: how long a stopped trainer gets after SIGTERM before SIGKILL
STOP_GRACE_SECONDS = 10.0

_PROGRESS = re.compile(r"(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+)")
_LOSS = re.compile(r"(?<![a-z_])loss=([0-9.eE+-]+)")
_EVAL_LOSS = re.compile(r"eval_loss=([0-9.eE+-]+)")


class TrainForm(BaseModel):
    """The console's training form; a field we do not honour is refused."""

    model_config = ConfigDict(extra="forbid")

    name: str
    data_file: str = Field(description="an id from GET /ui/api/train/files")
    method: Literal["lora", "qlora"] = "lora"
    max_steps: int = Field(100, ge=1, le=MAX_STEPS)
    learning_rate: float = Field(1e-3, gt=0, le=1)
    lora_r: int = Field(8, ge=1)
    metric: Literal["loss", "accuracy", "f1", "exact_match", "rouge"] = "loss"
    input_field: str = Field("input", min_length=1, max_length=64)
    output_field: str = Field("output", min_length=1, max_length=64)
    task_name: str | None = Field(None, max_length=200)


def _seconds(clock: str) -> float | None:
    if "?" in clock:
        return None
    total = 0.0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total


@dataclass
class TrainJob:
    id: str
    name: str
    form: dict[str, Any]
    argv: list[str]
    started: float = field(default_factory=time.time)
    state: str = "starting"  # starting -> training -> finishing -> succeeded | failed | stopped
    step: int = 0
    total: int = 0
    eta_seconds: float | None = None
    elapsed_seconds: float | None = None
    loss: float | None = None
    eval_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    error: str | None = None
    returncode: int | None = None
    finished: float | None = None
    stop_requested: bool = False
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    def progress(self, line: str) -> bool:
        """Read a progress-bar line (``train NAME: 40%|...| 60/150 [00:10<00:15, ..., loss=0.12]``)."""
        line = line.strip()
        found = _PROGRESS.search(line)
        if not (found and line.startswith("train ")):
            return False
        self.step, self.total = int(found.group(1)), int(found.group(2))
        self.elapsed_seconds = _seconds(found.group(3))
        self.eta_seconds = _seconds(found.group(4))
        if not self.stop_requested:
            self.state = "training" if self.step < self.total else "finishing"
        loss = _LOSS.search(line)
        if loss:
            self.loss = float(loss.group(1))
            if self.losses and self.losses[-1][0] == self.step:
                self.losses[-1] = (self.step, self.loss)
            else:
                self.losses.append((self.step, self.loss))
        eval_loss = _EVAL_LOSS.search(line)
        if eval_loss:
            self.eval_loss = float(eval_loss.group(1))
        return True

    def feed(self, line: str) -> None:
        """One finished line (or carriage-return update) of the trainer's output."""
        line = line.strip()
        if not line or self.progress(line):
            return
        self.log = (self.log + [line[:500]])[-LOG_TAIL:]
        if line.startswith("train-adapter: error:"):
            self.error = line[len("train-adapter: error:"):].strip()

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "form": self.form,
            "state": self.state,
            "step": self.step,
            "total": self.total,
            "eta_seconds": self.eta_seconds,
            "elapsed_seconds": self.elapsed_seconds,
            "loss": self.loss,
            "eval_loss": self.eval_loss,
            "losses": self.losses,
            "error": self.error,
            "log_tail": self.log[-8:],
            "returncode": self.returncode,
            "started": self.started,
            "finished": self.finished,
        }


class TrainingJobs:
    """Data files and training subprocesses of one server process."""

    def __init__(self, store: AdapterStore, *, base: str, max_rank: int) -> None:
        self.store = store
        self.base = base
        self.max_rank = max_rank
        self.jobs: dict[str, TrainJob] = {}
        self._uploads: dict[str, Path] = {}
        self._upload_dir: Path | None = None
        self._tasks: set[asyncio.Task] = set()
        atexit.register(self.close)  # a server that exits takes its training run and uploads with it

    # ------------------------------------------------------------ data files
    @staticmethod
    def _demo_files() -> dict[str, Path]:
        import importlib.util

        spec = importlib.util.find_spec("loraplex.training")  # located, never imported
        folder = Path(list(spec.submodule_search_locations)[0]) / "demo_data"
        return {f"demo:{p.name}": p for p in sorted(folder.glob("*.jsonl"))}

    def files(self) -> list[dict[str, Any]]:
        out = [{"id": fid, "label": f"demo data: {p.name}", "bytes": p.stat().st_size} for fid, p in self._demo_files().items()]
        out += [{"id": fid, "label": f"uploaded: {p.name.split('-', 1)[1]}", "bytes": p.stat().st_size} for fid, p in self._uploads.items() if p.is_file()]
        return out

    def resolve(self, file_id: str) -> Path:
        path = self._demo_files().get(file_id) or self._uploads.get(file_id)
        if path is None or not path.is_file():
            raise AdapterNotFound(f"data file {file_id!r} is not one of GET /ui/api/train/files", param="data_file")
        return path

    async def upload(self, filename: str, body: bytes) -> dict[str, Any]:
        suffix = Path(filename).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            raise RequestInvalid(f"filename {filename!r}: use a {', '.join(UPLOAD_SUFFIXES)} file", param="filename")
        if len(body) > MAX_UPLOAD_BYTES:
            raise RequestInvalid(f"the upload is {len(body)} bytes; the limit is {MAX_UPLOAD_BYTES}", param="file")
        if not body:
            raise RequestInvalid("the upload is empty", param="file")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestInvalid(f"the upload is not UTF-8 text (byte {exc.start})", param="file") from exc
        if len(self._uploads) >= MAX_UPLOADS:
            raise RequestInvalid(f"{MAX_UPLOADS} uploads are kept per server process; restart to clear them", param="file")
        if self._upload_dir is None:
            self._upload_dir = Path(tempfile.mkdtemp(prefix="loraplex-ui-uploads-"))
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", Path(filename).name)[:80]
        file_id = uuid.uuid4().hex[:12]
        path = self._upload_dir / f"{file_id}-{safe}"
        path.write_bytes(body)
        try:
            summary = await _inspect_records(path)
        except RequestInvalid:
            path.unlink(missing_ok=True)
            raise
        self._uploads[f"upload:{file_id}"] = path
        return {"id": f"upload:{file_id}", "records": summary["records"], "fields": summary["fields"]}

    # ------------------------------------------------------------ jobs
    def running(self) -> TrainJob | None:
        return next((j for j in self.jobs.values() if j.finished is None), None)

    async def start(self, form: TrainForm) -> dict[str, Any]:
        validate_adapter_name(form.name)
        if form.lora_r > self.max_rank:
            raise RequestInvalid(f"lora_r={form.lora_r} is above the server's --max-lora-rank {self.max_rank}", param="lora_r")
        busy = self.running()
        if busy is not None:
            raise Overloaded(f"training job {busy.id} ({busy.name!r}) is still running; one job at a time")
        target = self.store.path_for(form.name)
        if target.exists():
            raise AdapterExists(f"adapter {form.name!r} already exists in the store; choose another name", param="name")
        data = self.resolve(form.data_file)
        argv = [
            sys.executable, "-m", "loraplex.training.cli",
            "--model_name_or_path", self.base,
            "--data_files", str(data),
            "--output_path", str(target),
            "--method", form.method,
            "--max_steps", str(form.max_steps),
            "--learning_rate", str(form.learning_rate),
            "--lora_r", str(form.lora_r),
            "--lora_alpha", str(2 * form.lora_r),
            "--metric", form.metric,
            "--input_field", form.input_field,
            "--output_field", form.output_field,
            "--logging_steps", str(max(1, form.max_steps // 25)),
        ]
        if form.task_name:
            argv += ["--task_name", form.task_name]
        job = TrainJob(id=uuid.uuid4().hex[:8], name=form.name, form=form.model_dump(), argv=argv)
        self.jobs[job.id] = job
        task = asyncio.create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job.describe()

    async def _run(self, job: TrainJob) -> None:
        env = {**os.environ, "TQDM_MININTERVAL": "0.5", "PYTHONUNBUFFERED": "1"}
        try:
            proc = await asyncio.create_subprocess_exec(*job.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
        except OSError as exc:
            job.state, job.error, job.finished = "failed", f"could not start train-adapter: {exc}", time.time()
            return
        job.process = proc
        if job.stop_requested:  # stopped while the subprocess was being started
            self._signal(job)
        buffer = ""
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(4096):
            buffer += chunk.decode("utf-8", errors="replace")
            *lines, buffer = re.split(r"[\r\n]", buffer)
            for line in lines:
                job.feed(line)
            job.progress(buffer)  # tqdm ends its latest update with no separator: read it now
        job.feed(buffer)
        job.returncode = await proc.wait()
        job.finished = time.time()
        published = (self.store.root / job.name).is_dir()  # start() refused a name already there
        if published and (job.returncode == 0 or job.stop_requested):
            job.state = "succeeded"  # with a stop: it came after the trainer had published
        elif job.stop_requested:
            job.state, job.error = "stopped", None
            # killed while staging (after its last step): drop the half-written hidden folder
            for leftover in self.store.root.glob(f".tmp-{job.name}-*"):
                shutil.rmtree(leftover, ignore_errors=True)
        else:
            job.state = "failed"
            job.error = job.error or f"train-adapter exited with {job.returncode}"

    async def stop(self, job_id: str) -> dict[str, Any]:
        """Stop a running job: SIGTERM now, SIGKILL if it is still there after the grace period.
        The job ends as ``stopped`` (or ``succeeded`` if the trainer had already published).
        Stopping a finished job changes nothing."""
        job = self.jobs.get(job_id)
        if job is None:
            raise AdapterNotFound(f"no training job {job_id!r} (GET /ui/api/train/jobs lists them)", param="job_id")
        if job.finished is None and not job.stop_requested:
            job.stop_requested = True
            job.state = "stopping"
            if job.process is not None:
                self._signal(job)
        return job.describe()

    def _signal(self, job: TrainJob) -> None:
        assert job.process is not None
        try:
            job.process.terminate()
        except ProcessLookupError:
            return
        task = asyncio.create_task(self._kill_later(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _kill_later(job: TrainJob) -> None:
        await asyncio.sleep(STOP_GRACE_SECONDS)
        if job.finished is None and job.process is not None:
            try:
                job.process.kill()
            except ProcessLookupError:
                pass

    def describe(self) -> list[dict[str, Any]]:
        return [j.describe() for j in sorted(self.jobs.values(), key=lambda j: j.started, reverse=True)]

    def close(self) -> None:
        """Stop running training subprocesses (the store never sees half an adapter: it publishes
        by rename) and delete the uploads."""
        for job in self.jobs.values():
            if job.process is not None and job.finished is None:
                try:
                    os.kill(job.process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)


async def _inspect_records(path: Path) -> dict[str, Any]:
    """The trainer's own reader, run in a subprocess (same errors as the CLI gives for a bad file)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loraplex.training.inspect_data", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    except asyncio.TimeoutError:
        proc.kill()
        raise RequestInvalid("reading the upload took more than 120 s", param="file") from None
    if proc.returncode != 0:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        message = lines[-1] if lines else f"the data reader exited with code {proc.returncode}"
        raise RequestInvalid(message.replace(str(path), path.name.split("-", 1)[1]), param="file")
    return json.loads(out.decode().strip().splitlines()[-1])
