"""``loraplex export-onnx``: one base + N peft adapters -> one onnxruntime-genai model folder with
swappable LoRA inputs, plus one ``<name>.onnx_adapter`` per adapter.

Steps: resolve the base; validate every adapter against it (the same gate the server uses);
write a rank-1 TEMPLATE peft adapter over the LoRA targets (every Linear of every decoder layer
by default, so adapters trained later can be served without re-exporting; or the union of the
given adapters' modules); run the onnxruntime-genai model builder with it (its LoRA MatMuls
kept out of int4 quantization, whose fixed shapes would pin the rank); rewrite the graph so each
LoRA weight is an optional input with an empty default (``graph.py``), plus a second graph over
the same weights file whose LoRA inputs are stacked per adapter slot and picked per row (for the
onnx backend's mixed-adapter batches); write each adapter's file
(``A^T``, ``(scale * B)^T``); record everything in ``loraplex-export.json``; check that plain
onnxruntime-genai loads the model and every adapter; then move the folder into place
atomically. Olive is not needed (and its extraction uses one shared rank name, which breaks
adapters with per-module ranks).

Knows nothing of servers; the onnx backend only loads what this writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from loraplex.server.errors import AdapterInvalid, ExportError, RequestInvalid
from loraplex.server.onnx.graph import STACKED_GRAPH, expose_lora_inputs, lora_matmul_node_names, write_stacked_variant
from loraplex.server.onnx.manifest import ExportedAdapter, ExportManifest, write_export_manifest
from loraplex.server.store import ADAPTER_WEIGHTS, sha256_file, validate_adapter_name
from loraplex.server.store.targets import is_decoder_projection
from loraplex.server.store.onnx_adapter import ONNX_ADAPTER_SUFFIX, onnx_adapter_arrays, write_onnx_adapter

PRECISIONS = ("int4", "fp32")
LORA_TARGETS = ("all", "union")
_RESERVED_BUILDER_OPTIONS = {"adapter_path", "nodes_to_exclude", "filename", "config_only"}


@dataclass(frozen=True)
class ExportConfig:
    """Flags of ``loraplex export-onnx`` (the Olive ``generate-adapter`` names where they exist)."""

    output_path: Path
    model_name_or_path: str = "embedded"
    adapter_paths: tuple[Path, ...] = ()
    precision: Literal["int4", "fp32"] = "int4"
    lora_targets: Literal["all", "union"] = "all"
    max_lora_rank: int = 64
    overwrite: bool = False
    adapter_names: tuple[str, ...] = field(default=())  # default: each folder's name
    builder_options: tuple[str, ...] = field(default=())  # extra KEY=VALUE for the model builder (e.g. algo_config=k_quant)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise RequestInvalid(f"--precision {self.precision!r} is not supported; choose one of {', '.join(PRECISIONS)}", param="precision")
        if self.lora_targets not in LORA_TARGETS:
            raise RequestInvalid(f"--lora_targets {self.lora_targets!r} is not supported; choose one of {', '.join(LORA_TARGETS)}", param="lora_targets")
        if self.adapter_names and len(self.adapter_names) != len(self.adapter_paths):
            raise RequestInvalid(
                f"--adapter_names has {len(self.adapter_names)} names for {len(self.adapter_paths)} --adapter_paths", param="adapter_names"
            )
        for option in self.builder_options:
            key = option.split("=", 1)[0]
            if "=" not in option or key in _RESERVED_BUILDER_OPTIONS:
                raise RequestInvalid(f"--builder_option {option!r}: expected KEY=VALUE, not one of {', '.join(sorted(_RESERVED_BUILDER_OPTIONS))} (loraplex sets those)", param="builder_option")
        if self.lora_targets == "union" and not self.adapter_paths:
            raise RequestInvalid("--lora_targets union needs at least one --adapter_paths entry", param="lora_targets")


def _write_template(folder: Path, modules: list[str], shapes: dict[str, tuple[int, int]], base_path: Path) -> Path:
    """A rank-1 peft adapter over exactly ``modules`` (its values never reach the exported graph)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": modules,
        "base_model_name_or_path": str(base_path),
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {}
    for module in modules:
        in_features, out_features = shapes[module]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.zeros(1, in_features)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(out_features, 1)
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    return folder


def _run_builder(base_path: Path, build: Path, cache: Path, precision: str, template: Path, modules: list[str], log: Path, options: tuple[str, ...] = ()) -> None:
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    extra = [f"adapter_path={template}", *options]
    if precision == "int4":
        extra.append("nodes_to_exclude=" + ",".join(lora_matmul_node_names(modules)))
    sink = io.StringIO()
    quantizer_log = logging.getLogger("onnxruntime.quantization")
    previous_level = quantizer_log.level
    quantizer_log.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            options = parse_extra_options(str(base_path), str(base_path), str(build), precision, "cpu", str(cache), extra)
            create_model(str(base_path), str(base_path), str(build), precision, "cpu", str(cache), **options)
    except Exception as exc:
        log.write_text(sink.getvalue())
        tail = "\n".join(sink.getvalue().splitlines()[-8:])
        raise ExportError(f"the onnxruntime-genai model builder failed: {type(exc).__name__}: {exc}\n{tail}") from exc
    finally:
        quantizer_log.setLevel(previous_level)
    log.write_text(sink.getvalue())


def _copy_stored_answers(adapter_dir: Path, adapter_file: Path) -> None:
    """The held-out answers the adapter's training run stored (``eval_samples`` of its
    ``training_report.json``), beside its ``.onnx_adapter``: the onnx backend replays them on the
    export at load (``agreement.py``). Absent or unreadable reports are skipped."""
    from loraplex.server.onnx.agreement import REPORT_FILE, report_path

    try:
        samples = json.loads((adapter_dir / REPORT_FILE).read_text()).get("eval_samples")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(samples, list) and samples:
        report_path(adapter_file).write_text(json.dumps({"eval_samples": samples}, indent=1))


def _check_loads(folder: Path, adapters: list[ExportedAdapter]) -> None:
    """Plain onnxruntime-genai (no loraplex code) must load the model and every adapter."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    for adapter in adapters:
        container = og.Adapters(model)
        container.load(str(folder / adapter.file), adapter.name)
        container.unload(adapter.name)


def export_onnx(config: ExportConfig, *, say: Callable[[str], None] = print) -> ExportManifest:
    """Run the export; returns the manifest written into ``config.output_path``."""
    import onnxruntime_genai as og

    from loraplex.server import __version__
    from loraplex.server.basemodel import resolve_base
    from loraplex.server.store.validation import BaseShapes, load_validated_adapter

    output = Path(config.output_path)
    if output.exists() and any(output.iterdir()) and not config.overwrite:
        raise RequestInvalid(f"--output_path {output} exists and is not empty (pass --overwrite to replace it)", param="output_path")
    ref = resolve_base(config.model_name_or_path)
    for source in (ref.path, *config.adapter_paths):  # --overwrite must never delete an input
        real_out, real_src = os.path.realpath(output), os.path.realpath(source)
        if os.path.commonpath([real_out, real_src]) in (real_out, real_src):
            raise RequestInvalid(f"--output_path {output} overlaps the input {source}; choose another folder", param="output_path")
    say(f"base: {ref.id} (fingerprint {ref.fingerprint}, {ref.path})")
    shapes = BaseShapes.from_config(ref.path, ref.fingerprint)

    names = list(config.adapter_names) or [Path(p).resolve().name for p in config.adapter_paths]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise RequestInvalid(f"--adapter_paths gives the adapter name(s) {', '.join(duplicates)} twice; pass --adapter_names to rename", param="adapter_paths")
    validated = []
    for name, path in zip(names, config.adapter_paths):
        validate_adapter_name(name)
        folder = Path(path)
        if not folder.is_dir():
            raise AdapterInvalid(f"--adapter_paths entry {str(path)!r} is not a folder (expected a peft adapter folder)", param="adapter_paths")
        adapter = load_validated_adapter(folder, name, shapes, max_lora_rank=config.max_lora_rank)
        validated.append(adapter)
        say(f"adapter {name}: rank {adapter.max_rank}, {len(adapter.modules)} modules, from {folder}")

    if config.lora_targets == "all":
        modules = sorted(m for m in shapes.linear_shapes if is_decoder_projection(m))
    else:
        modules = sorted({m for adapter in validated for m in adapter.modules})
    outside = sorted({m for adapter in validated for m in adapter.modules} - set(modules))
    if outside:
        raise AdapterInvalid(f"adapter modules {', '.join(outside[:4])} cannot carry LoRA in the exported graph (only decoder-layer attention/MLP projections can)")

    work = output.parent / f".tmp-export-{uuid.uuid4().hex[:8]}"
    build = work / "model"
    try:
        work.mkdir(parents=True)
        template = _write_template(work / "template", modules, dict(shapes.linear_shapes), ref.path)
        say(f"building the {config.precision} graph with LoRA inputs on {len(modules)} modules (onnxruntime-genai {og.__version__} model builder) ...")
        _run_builder(ref.path, build, work / "cache", config.precision, template, modules, work / "builder.log", config.builder_options)
        inputs = expose_lora_inputs(build / "model.onnx")
        write_stacked_variant(build / "model.onnx", build / STACKED_GRAPH)
        graph_modules = sorted({i.module for i in inputs})
        if graph_modules != modules:
            missing = sorted(set(modules) - set(graph_modules))
            raise ExportError(f"the builder emitted LoRA nodes for {len(graph_modules)} of {len(modules)} modules (missing e.g. {missing[:3]})")
        exported = []
        for adapter in validated:
            file = f"{adapter.name}{ONNX_ADAPTER_SUFFIX}"
            write_onnx_adapter(build / file, onnx_adapter_arrays(adapter.modules))
            _copy_stored_answers(Path(adapter.path), build / file)
            exported.append(
                ExportedAdapter(
                    name=adapter.name,
                    file=file,
                    file_sha256=sha256_file(build / file),
                    source_path=str(adapter.path),
                    source_sha256=adapter.weights_sha256,
                    rank=adapter.max_rank,
                    modules=len(adapter.modules),
                    base_fingerprint=adapter.manifest.base_fingerprint if adapter.manifest else None,
                )
            )
        manifest = ExportManifest(
            base_model_id=ref.id,
            base_fingerprint=ref.fingerprint,
            precision=config.precision,
            builder_options=list(config.builder_options),
            lora_targets=config.lora_targets,
            lora_modules={m: tuple(shapes.linear_shapes[m]) for m in modules},
            stacked_graph=STACKED_GRAPH,
            adapters=exported,
            loraplex_version=__version__,
            onnxruntime_genai_version=og.__version__,
        )
        write_export_manifest(build, manifest)
        _check_loads(build, exported)
        previous = work / "previous"
        if output.exists():
            os.replace(output, previous)
        try:
            os.replace(build, output)
        except OSError:
            if previous.exists():  # put the old model back before the work folder goes
                os.replace(previous, output)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"wrote {output}: model.onnx ({_size(output)}), {len(exported)} adapter file(s), {len(modules)} LoRA modules")
    return manifest


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return f"{total / 2**20:.1f} MiB in all"
