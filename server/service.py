"""The service: the one object both fronts (HTTP, gRPC) call. It holds four parts, one job each,
and adds nothing of its own but the front-facing method names:

- ``access.Access``: the API key behind a credential, who may see/use which model, admin role;
- ``catalog.Catalog``: the models and adapters a caller sees (store listing off the event loop);
- ``admin.AdapterAdmin``: load / unload / consistency for admin keys;
- ``generation.Generation``: the request pipeline (validate, tokenize, sample, admit, stream,
  account), and the tokenizer endpoints (``/tokenize``, ``/detokenize``, ``/tokenizer_info``).

It reads the server's one ``Readiness`` (moved only by the lifecycle). It never touches the
model (the engine is reached through the scheduler) and knows nothing of HTTP or gRPC.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

from loraplex.server.access import Access
from loraplex.server.admin import AdapterAdmin
from loraplex.server.auth import ApiKey, KeyRing
from loraplex.server.catalog import Catalog
from loraplex.server.generation import GenerationEvent, GenerationRequest, Generation
from loraplex.server.metrics import AdapterActivity, ServerMetrics
from loraplex.server.readiness import Readiness
from loraplex.server.registry import AdapterRegistry, AdapterState
from loraplex.server.scheduler import Scheduler
from loraplex.server.settings import ServerSettings

__all__ = ["GenerationEvent", "GenerationRequest", "GenerationService"]


class GenerationService:
    def __init__(
        self,
        *,
        tokenizer,
        scheduler: Scheduler,
        registry: AdapterRegistry,
        metrics: ServerMetrics,
        settings: ServerSettings,
        base_name: str,
        base_fingerprint: str,
        keys: KeyRing | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.keys = keys or KeyRing()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.registry = registry
        self.metrics = metrics
        self.settings = settings
        self.base_name = base_name
        self.base_fingerprint = base_fingerprint
        self.readiness = readiness or Readiness()  # moved by the lifecycle only; read here
        self.access = Access(self.keys)
        self.activity = AdapterActivity(metrics, settings.max_loras, base_name)  # vllm:lora_requests_info
        self.catalog = Catalog(registry, base_name=base_name, created=int(time.time()), max_model_len=settings.max_model_len)
        self.admin = AdapterAdmin(self.access, registry, scheduler, self.activity)
        self.generation = Generation(
            tokenizer=tokenizer,
            scheduler=scheduler,
            registry=registry,
            metrics=metrics,
            settings=settings,
            access=self.access,
            activity=self.activity,
            readiness=self.readiness,
            base_name=base_name,
        )

    @property
    def ready(self) -> bool:
        """Base loaded, warm-up done, not draining (the one ``Readiness``; /ready and gRPC health read it too)."""
        return self.readiness.ready

    # ---------------------------------------------------------------- access
    def authenticate(self, credential: str | None) -> ApiKey | None:
        return self.access.authenticate(credential)

    def authorize_model(self, key: ApiKey | None, model: str) -> None:
        """A key that may not use a model gets the same answer as for a model that doesn't exist."""
        self.access.authorize_model(key, model)

    def require_admin(self, credential: str | None) -> ApiKey | None:
        return self.access.require_admin(credential)

    # --------------------------------------------------------------- catalog
    def adapter_for(self, model: str) -> str | None:
        """None for the bare base; the adapter name otherwise (AdapterNotFound if unknown)."""
        return self.generation.resolve(model)

    async def models(self, credential: str | None = None) -> list[dict[str, Any]]:
        """``/v1/models``: the base, then the adapters the caller may use."""
        return await self.catalog.models(self.authenticate(credential))

    async def adapters(self, credential: str | None = None) -> list[dict[str, Any]]:
        """``/v1/adapters`` and gRPC ``ListAdapters``."""
        return await self.catalog.adapters(self.authenticate(credential))

    def describe_adapters(self, credential: str | None = None) -> list[dict[str, Any]]:
        """The same as ``adapters``, synchronously: the store scan runs on the calling thread (the
        fronts use ``adapters``, which scans off the event loop)."""
        key = self.authenticate(credential)
        self.registry.scan()
        return [entry.describe() for name, entry in sorted(self.registry.entries.items()) if Access.visible(key, name)]

    def describe_adapter(self, name: str, credential: str | None = None) -> dict[str, Any]:
        self.authorize_model(self.authenticate(credential), name)
        return self.catalog.adapter(name)

    # ----------------------------------------------------------------- admin
    async def load_adapter(self, name: str, path: str | None = None, credential: str | None = None) -> dict[str, Any]:
        return await self.admin.load(name, path, credential)

    async def unload_adapter(self, name: str, credential: str | None = None) -> dict[str, Any]:
        return await self.admin.unload(name, credential)

    async def consistency(self, credential: str | None = None) -> dict[str, Any]:
        return await self.admin.consistency(credential)

    # ------------------------------------------------------------ generation
    def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream events for one request; closing the iterator cancels the request."""
        return self.generation.generate(req)

    async def tokenize(
        self, *, model: str | None, prompt: str | None = None, messages: list[dict[str, Any]] | None = None, add_special_tokens: bool = True, add_generation_prompt: bool = True, credential: str | None = None
    ) -> dict[str, Any]:
        """``/tokenize`` (vLLM's shape): ``{tokens, count, max_model_len}``."""
        return await self.generation.tokenize_text(model=model, prompt=prompt, messages=messages, add_special_tokens=add_special_tokens, add_generation_prompt=add_generation_prompt, credential=credential)

    async def detokenize(self, *, model: str | None, tokens: list[int], credential: str | None = None) -> dict[str, Any]:
        """``/detokenize`` (vLLM's shape): ``{prompt}``."""
        return await self.generation.detokenize(model=model, tokens=tokens, credential=credential)

    def tokenizer_info(self, credential: str | None = None) -> dict[str, Any]:
        """``/tokenizer_info`` (vLLM's; lm-eval's ``tokenizer_backend=remote`` reads it)."""
        self.authenticate(credential)
        return self.generation.tokenizer_info()

    def check_prompt_count(self, count: int) -> None:
        """/v1/completions with a list of prompts: at most ``--max-prompts``."""
        self.generation.check_prompt_count(count)

    @property
    def inflight(self) -> dict:
        return self.generation.inflight

    def abort_all(self, reason: str = "abort") -> int:
        """End every request in flight (the shutdown deadline); returns how many."""
        return self.generation.abort_all(reason)

    def resident_count(self) -> int:
        return sum(1 for e in self.registry.entries.values() if e.state == AdapterState.RESIDENT)
