"""`loraplex export-onnx` on a tiny random Llama with adapters of different ranks, alphas and
target sets: the folder plain onnxruntime-genai loads (no loraplex code in the generation loop),
the LoRA weights as optional graph inputs with empty defaults and per-module rank dims, greedy
parity of the fp32 export with peft's PeftModel for every adapter and the bare base, the int4
variant, and the refusals."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from loraplex.server.cli import main as loraplex_main
from tests.oracle import make_random_adapter, reference_greedy

PROMPTS = [[1, 504, 2045, 314, 4423, 29], [1, 9, 8, 7], [1, 400, 401, 402, 403, 404, 405], [1, 77]]
N = 20


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx-adapters")
    return {
        "plain": make_random_adapter(tiny_base, root / "plain", seed=31, r=4),
        "attn": make_random_adapter(tiny_base, root / "attn", seed=32, r=2, targets=("q_proj", "v_proj")),
        # per-module ranks and alphas (rank_pattern / alpha_pattern) and rsLoRA scaling
        "mixed": make_random_adapter(tiny_base, root / "mixed", seed=7, r=4, lora_alpha=8, use_rslora=True,
                                     rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 6},
                                     alpha_pattern={"v_proj": 3, "model.layers.0.mlp.up_proj": 20}),
    }


def _export(tiny_base, adapters, out: Path, *extra: str) -> int:
    paths = ",".join(str(p) for p in adapters.values())
    return loraplex_main(["export-onnx", "--model_name_or_path", str(tiny_base), "--adapter_paths", paths, "--output_path", str(out), *extra])


@pytest.fixture(scope="module")
def fp32_export(tiny_base, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-fp32") / "multi-adapter"
    assert _export(tiny_base, adapters, out, "--precision", "fp32") == 0
    return out


def og_greedy(model_dir: Path, adapter: str | None, prompt: list[int], n: int = N) -> list[int]:
    """Plain onnxruntime-genai, its own greedy search: no loraplex code involved."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)  # greedy; no EOS in random weights' way: n tokens
    generator = og.Generator(model, params)
    adapters = og.Adapters(model)
    if adapter is not None:
        adapters.load(str(model_dir / f"{adapter}.onnx_adapter"), adapter)
        generator.set_active_adapter(adapters, adapter)  # once per Generator, before any token
    generator.append_tokens(np.asarray(prompt, dtype=np.int32))
    out = []
    while not generator.is_done() and len(out) < n:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    del generator
    return out


def test_folder_layout_and_manifest(fp32_export, adapters, tiny_base):
    from loraplex.server.basemodel import compute_fingerprint

    names = sorted(p.name for p in fp32_export.iterdir())
    for required in ("model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json", "loraplex-export.json"):
        assert required in names
    assert not (fp32_export / "model.onnx.data").is_symlink() and (fp32_export / "model.onnx.data").stat().st_size > 1_000_000
    assert not [n for n in names if n.startswith(".tmp")]
    manifest = json.loads((fp32_export / "loraplex-export.json").read_text())
    assert manifest["base_fingerprint"] == compute_fingerprint(tiny_base)
    assert manifest["precision"] == "fp32" and manifest["lora_targets"] == "all"
    assert len(manifest["lora_modules"]) == 2 * 7  # every projection of both layers
    listed = {a["name"]: a for a in manifest["adapters"]}
    assert sorted(listed) == sorted(adapters)
    for name, folder in adapters.items():
        source = hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert listed[name]["source_sha256"] == source
        assert listed[name]["file"] == f"{name}.onnx_adapter"
        assert listed[name]["file_sha256"] == hashlib.sha256((fp32_export / f"{name}.onnx_adapter").read_bytes()).hexdigest()
    assert listed["mixed"]["rank"] == 6 and listed["attn"]["modules"] == 4


def test_lora_weights_are_optional_inputs_with_empty_defaults(fp32_export):
    import onnx

    model = onnx.load(str(fp32_export / "model.onnx"), load_external_data=False)
    graph = model.graph
    inputs = {i.name: i for i in graph.input if ".lora_" in i.name}
    assert len(inputs) == 2 * 2 * 7
    initializers = {t.name: t for t in graph.initializer}
    rank_dims = set()
    for name, value in inputs.items():
        dims = value.type.tensor_type.shape.dim
        default = initializers[name]  # same-named initializer = the default when no adapter feeds it
        if name.endswith("lora_A.weight"):
            assert dims[0].dim_value > 0 and dims[1].dim_param.startswith("lora_r.")
            assert list(default.dims) == [dims[0].dim_value, 0]
            rank_dims.add(dims[1].dim_param)
        else:
            assert dims[0].dim_param.startswith("lora_r.") and dims[1].dim_value > 0
            assert list(default.dims) == [0, dims[1].dim_value]
    assert len(rank_dims) == 14  # one symbolic rank per module, never one shared name
    assert "model.layers.0.attn.q_proj.lora_A.weight" in inputs  # the builder's naming (attn, not self_attn)


@pytest.mark.parametrize("adapter", [None, "plain", "attn", "mixed"])
def test_fp32_parity_with_peft(fp32_export, adapters, tiny_base, adapter):
    for prompt in PROMPTS:
        expected = reference_greedy(tiny_base, adapters[adapter] if adapter else None, prompt, n=N)
        assert og_greedy(fp32_export, adapter, prompt) == expected, (adapter, prompt)


def test_adapters_change_the_output_and_unload_in_use_is_refused(fp32_export):
    import onnxruntime_genai as og

    base = og_greedy(fp32_export, None, PROMPTS[0])
    assert all(og_greedy(fp32_export, name, PROMPTS[0]) != base for name in ("plain", "attn", "mixed"))
    model = og.Model(str(fp32_export))
    adapters = og.Adapters(model)
    adapters.load(str(fp32_export / "plain.onnx_adapter"), "plain")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "plain")
    with pytest.raises(Exception, match="in use"):
        adapters.unload("plain")
    del generator
    adapters.unload("plain")


def test_int4_export_keeps_lora_float_and_swappable(tiny_base, adapters, tmp_path):
    import onnx

    out = tmp_path / "int4"
    assert _export(tiny_base, adapters, out, "--lora_targets", "union") == 0  # int4 is the default
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    ops = {n.name: n.op_type for n in model.graph.node}
    assert any(op == "MatMulNBits" for op in ops.values())  # the base is 4-bit
    lora_nodes = {name: op for name, op in ops.items() if "/lora_" in name}
    assert lora_nodes and set(lora_nodes.values()) == {"MatMul"}  # LoRA kept out of quantization
    manifest = json.loads((out / "loraplex-export.json").read_text())
    assert manifest["precision"] == "int4" and manifest["lora_targets"] == "union"
    base = og_greedy(out, None, PROMPTS[0])
    outputs = {name: og_greedy(out, name, PROMPTS[0]) for name in adapters}
    assert all(len(o) == N for o in outputs.values()) and all(o != base for o in outputs.values())


def test_refusals(tiny_base, adapters, tmp_path, capsys, fp32_export):
    # output exists
    assert _export(tiny_base, adapters, fp32_export, "--precision", "fp32") == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # adapter trained on another base (its manifest says so)
    foreign = tmp_path / "foreign"
    make_random_adapter(tiny_base, foreign, seed=5)
    weights_sha = hashlib.sha256((foreign / "adapter_model.safetensors").read_bytes()).hexdigest()
    (foreign / "loraplex.json").write_text(json.dumps({
        "name": "foreign", "base_model_id": "other", "base_fingerprint": "0" * 24, "rank": 4, "alpha": 16,
        "target_modules": ["q_proj"], "weights_sha256": weights_sha,
    }))
    code = loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", str(foreign), "--output_path", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and "base fingerprint 000000000000000000000000" in err
    # the same folder name twice
    code = loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", f"{adapters['plain']},{adapters['plain']}", "--output_path", str(tmp_path / "y")])
    assert code == 2 and "twice" in capsys.readouterr().err
    # --overwrite never deletes an input: an output inside an adapter folder is refused
    code = loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", str(adapters["plain"]),
                          "--output_path", str(adapters["plain"] / "out"), "--overwrite"])
    assert code == 2 and "overlaps the input" in capsys.readouterr().err
    assert (adapters["plain"] / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export")]


def test_adapter_file_round_trip(fp32_export, adapters, tiny_base):
    """The .onnx_adapter file read back through the server's validation gives A and scale*B."""
    from safetensors.torch import load_file

    from loraplex.server.basemodel import compute_fingerprint
    from loraplex.server.store.validation import BaseShapes, load_validated_adapter

    shapes = BaseShapes.from_config(tiny_base, compute_fingerprint(tiny_base))
    validated = load_validated_adapter(fp32_export / "attn.onnx_adapter", "attn", shapes, max_lora_rank=64)
    tensors = load_file(str(adapters["attn"] / "adapter_model.safetensors"))
    config = json.loads((adapters["attn"] / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    module = validated.modules["model.layers.1.self_attn.v_proj"]
    a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    assert module.scale == 1.0 and module.a.shape == a.shape
    assert np.allclose(module.a.numpy(), a.numpy()) and np.allclose(module.b.numpy(), scale * b.numpy(), rtol=1e-6)
    assert os.stat(fp32_export / "attn.onnx_adapter").st_mode & 0o044  # readable by the serving user


def test_int4_weights_served_equal_the_training_round_trip(tiny_base, tmp_path):
    """``train-adapter --quantization_aware onnx-int4`` trains on exactly the base weights the
    int4 export computes with: every MatMulNBits initializer of a real export, dequantized
    (server/onnx/int4_reference.py), equals the torch base after apply_onnx_int4_weights, bit for
    bit, and nothing else is quantized."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraplex.server.onnx.int4_reference import dequantized_weights
    from loraplex.training.quantization import apply_onnx_int4_weights

    out = tmp_path / "int4"
    assert loraplex_main(["export-onnx", "--model_name_or_path", str(tiny_base), "--output_path", str(out)]) == 0
    served = dequantized_weights(out)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_base))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    changed = apply_onnx_int4_weights(model)
    assert sorted(served) == sorted(f"{name}.weight" for name in changed)
    assert "lm_head.weight" in served and len(served) == 2 * 7 + 1  # 2 layers x 7 projections + lm_head
    state = model.state_dict()
    for name, values in served.items():
        assert torch.equal(state[name], torch.from_numpy(values)), name
        assert not torch.equal(state[name], original[name])  # really quantized
    # the tied embedding follows lm_head (the export gathers rows of the same int4 tensor)
    assert torch.equal(state["model.embed_tokens.weight"], state["lm_head.weight"])
    untouched = [k for k in state if k not in served and k != "model.embed_tokens.weight"]
    assert untouched and all(torch.equal(state[k], original[k]) for k in untouched)
