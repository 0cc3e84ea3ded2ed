"""``ServerSettings``: every knob of ``loraplex serve``, from flags or ``LORAPLEX_*`` env vars.

Validated once here (pydantic-settings); the CLI builds its flags from these fields, and flags
given on the command line override the environment. Read at call time, never at import.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAPLEX_", extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="HTTP port")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 disables gRPC)")
    base: str = Field("embedded", description="base model: 'embedded', a model folder or a hub id (torch backend)")
    backend: Literal["torch", "onnx"] = Field(
        "torch", description="torch (transformers, CPU or CUDA) or onnx (onnxruntime-genai on CPU, serving a folder from loraplex export-onnx)"
    )
    model: str | None = Field(None, description="--backend onnx: the exported model folder (loraplex export-onnx --output_path)")
    onnx_batching: Literal["mixed", "per-request"] = Field(
        "mixed",
        description="--backend onnx: mixed = rows of different adapters in one onnxruntime forward (model.stacked.onnx); "
        "per-request = one onnxruntime-genai Generator per request",
    )
    served_model_name: str | None = Field(None, description="name clients use for the bare base (default: the base id)")
    adapters_dir: str = Field("adapters", description="the adapter store")
    quantize: Literal["auto", "none", "int8", "nf4"] = Field(
        "auto", description="bitsandbytes quantization of the base; auto = none on CPU, nf4 on CUDA"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where the model runs")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="torch backend compute dtype; auto = bfloat16 on CUDA and on CPUs with AMX or AVX512-BF16, float32 elsewhere"
    )
    max_num_batched_tokens: int = Field(
        512, ge=1, description="torch backend: tokens per engine step (one per decoding sequence, the rest prompt chunks)"
    )
    int4_decode_rows: int = Field(
        8,
        ge=0,
        description="torch backend on CPU at bf16, when the base's weights are exactly int4 (the embedded Q4_1 base): steps of at most this many rows use int4 weight-only GEMMs; 0 = never",
    )
    compile_decode: bool = Field(
        False,
        description="torch backend with int4 decode GEMMs: compile the one-row decode step with torch.compile for single streams (needs g++; each signature, the adapter's targets and ranks or the bare base, compiles in the background on first use: minutes of a core, seconds from inductor's disk cache; docs/benchmarks.md)",
    )
    decode_row: Literal["kernel", "torch"] = Field(
        "kernel",
        description="torch backend with int4 decode GEMMs (the embedded base at bf16 on CPU): how a stream decoding alone (nothing else in the step) steps; kernel = the whole step, every layer, as one C call (built with gcc on first use, needs AVX512-BF16; else torch, logged), torch = one torch op at a time (or the compiled step with --compile-decode) (docs/benchmarks.md)",
    )
    lora_expand: Literal["kernel", "gemm"] = Field(
        "kernel",
        description="torch backend at bf16 on CPU: how mixed steps add each token's LoRA B product; kernel = one C call per projection group reading only each token's own adapter rows (built with gcc on first use, needs AVX512-BF16; else the gemm path, logged), gemm = masked oneDNN GEMMs (docs/benchmarks.md)",
    )
    decode_attention: Literal["kernel", "sdpa"] = Field(
        "kernel",
        description="torch backend at bf16 on CPU: how decode tokens attend; kernel = one C call per layer, each token over its own KV row and length (built with gcc on first use, needs AVX512-BF16; else sdpa, logged), sdpa = torch's scaled_dot_product_attention over the padded rows (docs/benchmarks.md)",
    )
    max_loras: int = Field(64, ge=1, description="adapters resident at once (LRU eviction of idle ones beyond)")
    max_lora_rank: int = Field(64, ge=1, description="largest LoRA rank accepted")
    max_mix_adapters: int = Field(4, ge=1, description="adapters one weighted mix may combine (the adapters field or model 'a:0.7+b:0.3'; docs/mixes.md)")
    adapter_wait_timeout: float = Field(
        5.0, ge=0, description="seconds a request for a non-resident adapter waits for a slot when all --max-loras are busy, then 429"
    )
    max_batch_size: int = Field(16, ge=1, description="sequences decoded together in one forward")
    max_model_len: int = Field(2048, ge=8, description="prompt + generated tokens per request")
    max_queue: int = Field(256, ge=0, description="requests waiting beyond the running batch; more get 429")
    request_timeout: float = Field(0, ge=0, description="seconds a request may run before it ends with finish_reason 'timeout' (0 = no limit)")
    shutdown_timeout: float = Field(30, ge=0, description="on SIGTERM, seconds in-flight requests get before they end with finish_reason 'abort'")
    max_tokens_default: int = Field(256, ge=1, description="max_tokens when a request gives none")
    max_n: int = Field(8, ge=1, description="choices per request at most (n); each choice takes a batch row, its own seed = seed + index")
    max_prompts: int = Field(64, ge=1, description="/v1/completions: prompts in one request at most (a list of prompts, as lm-eval sends)")
    max_logit_bias: int = Field(300, ge=0, description="logit_bias entries per request at most")
    preload: Annotated[list[str], NoDecode] = Field(default_factory=list, description="adapters to load at start (comma-separated)")
    watch: bool = Field(False, description="poll the store and pick up adapters published while running")
    watch_interval: float = Field(2.0, gt=0, description="seconds between store polls with --watch")
    allow_external_adapter_paths: bool = Field(False, description="let load_lora_adapter take paths outside the store")
    api_keys_file: str | None = Field(None, description="YAML key file (loraplex keys add); enables API keys")
    api_key: str | None = Field(None, description="a single admin key for everything (simple mode)")
    metrics_require_key: bool = Field(False, description="with API keys on, /metrics also needs a valid key (any role)")
    vllm_metrics: bool = Field(True, description="also export vllm:* metric names (Gateway API Inference Extension routing)")
    ui_allow_training: bool = Field(False, description="let admin keys start train-adapter from the web console (/ui), writing into the store")
    http_header_timeout: float = Field(30, ge=0, description="seconds a connection has to send a complete request head; then 408 and closed (0 = no limit)")
    http_body_timeout: float = Field(60, ge=0, description="seconds a request body has to arrive once its head is in; then 408 and closed (0 = no limit)")
    http_keep_alive_timeout: float = Field(5, gt=0, description="seconds an idle keep-alive connection stays open between requests")
    http_max_connections: int = Field(1000, ge=0, description="open HTTP connections at most; more get 503 and are closed (0 = no limit)")
    log_level: str = Field("info", description="uvicorn log level")

    @field_validator("preload", mode="before")
    @classmethod
    def _split_names(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @model_validator(mode="after")
    def _backend_needs(self):
        if self.backend == "onnx" and not self.model:
            raise ValueError("--backend onnx needs --model <folder written by loraplex export-onnx>")
        if self.backend == "torch" and self.model:
            raise ValueError(f"--model {self.model!r} is for --backend onnx; the torch backend takes --base")
        return self

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_quantize(self) -> str:
        if self.quantize != "auto":
            return self.quantize
        return "nf4" if self.resolved_device() == "cuda" else "none"
