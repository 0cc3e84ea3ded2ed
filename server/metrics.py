"""Prometheus metrics of one server (its own CollectorRegistry, so several servers can live in
one process in tests). Per-adapter series use the label ``adapter`` (the bare base counts under
its served name). Also exports the names the Kubernetes Gateway API Inference Extension reads
(``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``,
``vllm:lora_requests_info``) so adapter-affinity routing works unchanged.

A weighted mix request (docs/mixes.md) counts under EACH member's ``adapter`` label in every
per-adapter series (requests, tokens, latencies, ``vllm:lora_requests_info``), so an adapter's
series show all the traffic it served, and ONCE in ``loraplex_mix_requests_total{members,status}``
(``members`` = the member names sorted and joined by ``+``, weights left out so that tuning a
weight does not make a new series)."""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


#: the only findings `promtool check metrics` reports: colons are reserved for recording rules,
#: but these four names are what the Gateway API Inference Extension reads verbatim from vLLM.
VLLM_COMPAT_NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:lora_requests_info")


class ServerMetrics:
    def __init__(self, vllm_compat: bool = True) -> None:
        self.vllm_compat = vllm_compat
        r = self.registry = CollectorRegistry()
        self.requests = Counter("loraplex_requests", "Finished requests by adapter and status.", ["adapter", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", ["adapter"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.", ["adapter"], registry=r)
        self.e2e_latency = Histogram("loraplex_e2e_request_latency_seconds", "End-to-end request latency.", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token.", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between tokens of one request.", ["adapter"], buckets=_TOKEN_BUCKETS, registry=r)
        self.queue_time = Histogram("loraplex_queue_time_seconds", "Time from submission to admission into the running batch.", ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("loraplex_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("loraplex_num_requests_waiting", "Requests waiting to join the batch.", registry=r)
        self.resident = Gauge("loraplex_adapters_resident", "Adapters resident in memory.", registry=r)
        self.load_seconds = Histogram("loraplex_adapter_load_seconds", "Adapter load (validate + install) duration.", buckets=_LATENCY_BUCKETS, registry=r)
        self.key_requests = Counter("loraplex_key_requests", "Finished requests per API key (its name, never the secret).", ["key", "adapter", "status"], registry=r)
        self.key_tokens = Counter("loraplex_key_tokens", "Prompt + generated tokens per API key.", ["key"], registry=r)
        self.batch_size = Histogram("loraplex_batch_size", "Sequences in the running batch at each decode step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.evictions = Counter("loraplex_adapter_evictions", "Adapters evicted by LRU.", registry=r)
        self.mix_requests = Counter(
            "loraplex_mix_requests",
            "Finished weighted-mix requests by member set (names sorted, joined by +) and status; each member also counts under its adapter label.",
            ["members", "status"],
            registry=r,
        )
        self.load_failures = Counter("loraplex_adapter_load_failures", "Adapter loads refused.", ["adapter"], registry=r)
        # names the Gateway API Inference Extension (endpoint picker) scrapes from vLLM
        vllm_registry = r if vllm_compat else CollectorRegistry()
        self.vllm_running = Gauge("vllm:num_requests_running", "Requests running (vLLM-compatible).", registry=vllm_registry)
        self.vllm_waiting = Gauge("vllm:num_requests_waiting", "Requests waiting (vLLM-compatible).", registry=vllm_registry)
        self.vllm_kv = Gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0-1 (vLLM-compatible).", registry=vllm_registry)
        self.vllm_lora = Gauge(
            "vllm:lora_requests_info",
            "Running and waiting LoRA adapters (vLLM-compatible); value = last update time.",
            ["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
            registry=vllm_registry,
        )

    def bind(self, running: Callable[[], int], waiting: Callable[[], int], kv_usage: Callable[[], float], resident: Callable[[], int]) -> None:
        for gauge, fn in ((self.running, running), (self.vllm_running, running), (self.waiting, waiting), (self.vllm_waiting, waiting), (self.vllm_kv, kv_usage), (self.resident, resident)):
            gauge.set_function(fn)

    def observe_batch(self, running: int) -> None:
        """Engine thread, after each step: the size of the running batch (idle steps not counted)."""
        if running:
            self.batch_size.observe(running)

    def set_lora_info(self, max_lora: int, running: Iterable[str], waiting: Iterable[str]) -> None:
        self.vllm_lora.clear()
        self.vllm_lora.labels(str(max_lora), ",".join(sorted(set(running))), ",".join(sorted(set(waiting)))).set(time.time())

    def count_mix(self, members: str, status: str) -> None:
        """One finished mix request (``members``: ``MixSpec.member_set``). The per-adapter series
        are counted by the caller under each member's name (``labels_of``)."""
        self.mix_requests.labels(members, status).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def labels_of(adapter: str | Sequence[str]) -> tuple[str, ...]:
    """The ``adapter`` labels a request counts under: its adapter (or the base's served name),
    or each member of a mix."""
    return (adapter,) if isinstance(adapter, str) else tuple(adapter)


class RequestClock:
    """The latency series of one request, each observed at the moment that defines it (under
    each label in ``labels_of(adapter)``: a mix's members each get the observation):

    - queue time: submitted to the scheduler -> admitted into the engine's batch (``admitted``,
      reported from the engine thread through the request's admission hook);
    - time to first token: submitted -> first token; inter-token latency: between two tokens;
    - end-to-end: submitted -> finished (whatever the finish reason).

    Times are ``time.perf_counter()`` values; the caller passes the time an event happened (a token
    stamped on the engine thread), so queueing on the event loop does not skew them.
    """

    def __init__(self, metrics: ServerMetrics, adapter: str | Sequence[str], submitted: float | None = None) -> None:
        self.metrics, self.labels = metrics, labels_of(adapter)
        self.adapter = self.labels[0] if len(self.labels) == 1 else "+".join(self.labels)
        self.submitted = time.perf_counter() if submitted is None else submitted
        self.admitted_at: float | None = None
        self.last_token_at: float | None = None

    def admitted(self, at: float) -> None:
        if self.admitted_at is None:
            self.admitted_at = at
            for label in self.labels:
                self.metrics.queue_time.labels(label).observe(at - self.submitted)

    def token(self, at: float) -> None:
        for label in self.labels:
            if self.last_token_at is None:
                self.metrics.ttft.labels(label).observe(at - self.submitted)
            else:
                self.metrics.itl.labels(label).observe(at - self.last_token_at)
        self.last_token_at = at

    @property
    def started(self) -> bool:
        """A first token was seen."""
        return self.last_token_at is not None

    def finished(self, at: float | None = None) -> None:
        elapsed = (time.perf_counter() if at is None else at) - self.submitted
        for label in self.labels:
            self.metrics.e2e_latency.labels(label).observe(elapsed)



class AdapterActivity:
    """Adapters with requests waiting and running, published as ``vllm:lora_requests_info`` (the
    Gateway API Inference Extension routes on it) at every change. The bare base is counted but
    never listed. Event-loop thread only."""

    def __init__(self, metrics: ServerMetrics, max_loras: int, base_name: str) -> None:
        self.metrics, self.max_loras, self.base_name = metrics, max_loras, base_name
        self.waiting: dict[str, int] = {}
        self.running: dict[str, int] = {}
        self.publish()

    def _add(self, table: dict[str, int], name: str, delta: int) -> None:
        table[name] = table.get(name, 0) + delta
        if table[name] <= 0:
            table.pop(name, None)

    def enter(self, name: str | Sequence[str]) -> None:
        """A request for ``name`` (or each member of a mix) is waiting for its first token."""
        for label in labels_of(name):
            self._add(self.waiting, label, +1)
        self.publish()

    def start(self, name: str | Sequence[str]) -> None:
        """Its first token arrived: waiting -> running."""
        for label in labels_of(name):
            self._add(self.waiting, label, -1)
            self._add(self.running, label, +1)
        self.publish()

    def leave(self, name: str | Sequence[str], started: bool) -> None:
        """It ended (after ``start`` when ``started``)."""
        for label in labels_of(name):
            self._add(self.running if started else self.waiting, label, -1)
        self.publish()

    def publish(self) -> None:
        listed = lambda table: [n for n in table if n != self.base_name]  # noqa: E731
        self.metrics.set_lora_info(self.max_loras, listed(self.running), listed(self.waiting))
