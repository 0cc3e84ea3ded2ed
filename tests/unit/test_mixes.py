"""Weighted adapter mixes: the two request forms and their limits (``parse_mix``), the key's right
to every member (``Access.authorize_mix``), the metrics a mix counts under, and a named mix
written into the store (``store/mix.py``) checked against the independent reference: peft's
``add_weighted_adapter(combination_type="cat")`` on the same members gives the same logits and
greedy tokens as ``PeftModel.from_pretrained`` on the written folder, which also passes the gate."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from loraplex.server.access import Access
from loraplex.server.auth.keys import ApiKey
from loraplex.server.errors import AdapterExists, AdapterInvalid, PermissionDenied, RequestInvalid
from loraplex.server.metrics import AdapterActivity, RequestClock, ServerMetrics
from loraplex.server.mixes import MixSpec, mix_from_pairs, parse_members, parse_mix
from loraplex.server.store import AdapterStore, read_manifest, sha256_file
from loraplex.server.store.validation import BaseShapes, load_validated_adapter
from tests.oracle import make_random_adapter

BASE = "tiny"


def mix(model, adapters=None, max_members=4):
    return parse_mix(model, adapters, base_name=BASE, max_members=max_members)


# ------------------------------------------------------------------------------ parse_mix
def test_plain_names_are_not_mixes():
    assert mix("extract") is None and mix(BASE) is None and mix("a.b-c_d") is None


def test_the_two_request_forms_give_the_same_spec():
    body = mix(BASE, [{"name": "extract", "weight": 0.7}, {"name": "datefmt", "weight": 0.3}])
    compact = mix("extract:0.7+datefmt:0.3")
    assert body == compact == MixSpec((("extract", 0.7), ("datefmt", 0.3)))
    assert (body.field, compact.field) == ("adapters", "model")
    assert compact.label == "extract:0.7+datefmt:0.3" and compact.member_set == "datefmt+extract"
    assert mix("a:1,b:-0.25").members == (("a", 1.0), ("b", -0.25))
    assert mix(" a : 2 + b ").members == (("a", 2.0), ("b", 1.0))  # weight omitted = 1
    assert mix(BASE, [{"name": "a"}]).members == (("a", 1.0),)
    assert mix("a:0.5").members == (("a", 0.5),)  # one weighted adapter is a mix of one
    assert mix(BASE, [{"name": "a", "weight": 1 / 3}]).label == f"a:{1 / 3!r}"  # the label reads back exactly


@pytest.mark.parametrize(
    ("model", "adapters", "param", "message"),
    [
        ("extract", [{"name": "a", "weight": 1}], "adapters", "model must be the base's name 'tiny'; got model 'extract'"),
        (BASE, [], "adapters", "empty list"),
        (BASE, {"name": "a"}, "adapters", "must be a list"),
        (BASE, ["a"], "adapters", r"adapters\[0\] must be an object"),
        (BASE, [{"name": "a", "weight": 1, "scale": 2}], "adapters", r"unsupported keys \['scale'\]"),
        (BASE, [{"weight": 1}], "adapters", "has no name"),
        (BASE, [{"name": "a", "weight": "0.5"}], "adapters", r"adapters\[0\].weight must be a number, got '0.5'"),
        (BASE, [{"name": "a", "weight": True}], "adapters", "must be a number, got True"),
        (BASE, [{"name": "a", "weight": float("inf")}], "adapters", "must be finite"),
        (BASE, [{"name": "a", "weight": 0}], "adapters", "is 0"),
        (BASE, [{"name": "a", "weight": -8.5}], "adapters", r"is -8.5; \|weight\| may be at most 8"),
        (BASE, [{"name": "a", "weight": 1}, {"name": "a", "weight": 2}], "adapters", "names adapter 'a' twice"),
        (BASE, [{"name": n, "weight": 1} for n in "abcde"], "adapters", r"mixes 5 adapters; the limit is 4 \(--max-mix-adapters\)"),
        (BASE, [{"name": "../x", "weight": 1}], "adapters", "is not an adapter name"),
        (BASE, [{"name": BASE, "weight": 1}], "adapters", "is the base model"),
        ("a:0.5+a:1", None, "model", "names adapter 'a' twice"),
        ("a:x", None, "model", "is 'x', not a number"),
        ("a:nan", None, "model", "must be finite"),
        ("a:1e400", None, "model", "must be finite"),
        ("a:0", None, "model", "is 0"),
        ("a:9", None, "model", r"\|weight\| may be at most 8"),
        ("a:1+", None, "model", r"empty member \(#2\)"),
        ("a/b:1", None, "model", "is not an adapter name"),
        ("a:1+b:1+c:1+d:1+e:1", None, "model", r"mixes 5 adapters; the limit is 4"),
        ("+" * 100000, None, "model", "the limit is 4"),
    ],
)
def test_bad_mixes_are_refused_naming_the_field_and_the_value(model, adapters, param, message):
    with pytest.raises(RequestInvalid, match=message) as caught:
        mix(model, adapters)
    assert caught.value.param == param


def test_typed_pairs_get_the_same_checks():
    assert mix_from_pairs([("a", 0.5), ("b", 2)], max_members=4) == MixSpec((("a", 0.5), ("b", 2.0)))
    with pytest.raises(RequestInvalid, match=r"adapters\[1\].weight is 0"):
        mix_from_pairs([("a", 0.5), ("b", 0.0)], max_members=4)
    with pytest.raises(RequestInvalid, match="the limit is 1"):
        mix_from_pairs([("a", 0.5), ("b", 1.0)], max_members=1)


def test_the_member_limit_is_the_setting():
    from loraplex.server.settings import ServerSettings

    assert ServerSettings().max_mix_adapters == 4 and ServerSettings(max_mix_adapters=2).max_mix_adapters == 2
    assert mix("a+b+c+d+e+f", max_members=6).names == tuple("abcdef")
    with pytest.raises(RequestInvalid, match="the limit is 2"):
        mix("a+b+c", max_members=2)


# ------------------------------------------------------------------------------ access
def _key(*patterns):
    return ApiKey(name="k", role="user", adapters=patterns, sha256="0" * 64)


def test_every_member_must_be_allowed_for_the_key():
    access = Access.__new__(Access)  # authorize_mix reads only the key
    spec = mix("extract:0.7+datefmt:0.3")
    access.authorize_mix(None, spec)  # keys off
    access.authorize_mix(_key("extract", "date*"), spec)
    access.authorize_mix(_key("extract", "datefmt"), spec)  # the base's right is not needed
    with pytest.raises(PermissionDenied, match="may not use adapter 'datefmt', a member of the mix extract:0.7\\+datefmt:0.3") as caught:
        access.authorize_mix(_key("extract", BASE), spec)
    assert caught.value.param == "model"
    with pytest.raises(PermissionDenied, match="'extract'") as caught:
        access.authorize_mix(_key("datefmt"), mix(BASE, [{"name": "extract", "weight": 1}, {"name": "datefmt", "weight": 1}]))
    assert caught.value.param == "adapters"


# ------------------------------------------------------------------------------ metrics
def test_a_mix_counts_under_each_member_and_once_as_a_mix():
    metrics = ServerMetrics()
    spec = mix("b:0.5+a:0.5")
    clock = RequestClock(metrics, spec.names, submitted=10.0)
    clock.admitted(11.0)
    clock.token(12.0)
    clock.token(12.5)
    clock.finished(13.0)
    metrics.count_mix(spec.member_set, "stop")
    sample = metrics.registry.get_sample_value
    for member in ("a", "b"):
        assert sample("loraplex_queue_time_seconds_sum", {"adapter": member}) == 1.0
        assert sample("loraplex_time_to_first_token_seconds_sum", {"adapter": member}) == 2.0
        assert sample("loraplex_inter_token_latency_seconds_sum", {"adapter": member}) == 0.5
        assert sample("loraplex_e2e_request_latency_seconds_sum", {"adapter": member}) == 3.0
    assert sample("loraplex_mix_requests_total", {"members": "a+b", "status": "stop"}) == 1.0
    activity = AdapterActivity(metrics, 4, BASE)
    activity.enter(spec.names)
    activity.enter("a")
    activity.start(spec.names)
    assert activity.running == {"b": 1, "a": 1} and activity.waiting == {"a": 1}
    activity.leave(spec.names, started=True)
    assert activity.running == {} and activity.waiting == {"a": 1}


# ------------------------------------------------------------------------------ named mixes
PROMPT = [1, 520, 3000, 44, 17, 901]
#: (name, LoraConfig overrides): different ranks, targets, alphas, rsLoRA and a rank_pattern, so
#: the mix has modules only some members adapt and members with different scales
MEMBERS = {
    "a": dict(seed=5, r=4, lora_alpha=16),
    "b": dict(seed=6, r=2, targets=("q_proj", "v_proj"), lora_alpha=8, use_rslora=True),
    "c": dict(seed=7, r=3, targets=("q_proj", "down_proj"), lora_alpha=6, rank_pattern={"down_proj": 5}, alpha_pattern={"down_proj": 20}),
}


@pytest.fixture(scope="module")
def mix_store(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-store")
    for name, options in MEMBERS.items():
        make_random_adapter(tiny_base, root / name, **options)
    return AdapterStore(root)


@pytest.fixture(scope="module")
def shapes(tiny_base):
    from loraplex.server.basemodel import compute_fingerprint

    return BaseShapes.from_config(tiny_base, compute_fingerprint(tiny_base))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT])).logits[0].float()


def _greedy(model, n=8):
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
    return ids[len(PROMPT):]


def _peft_cat_reference(tiny_base, store, members):
    """peft's own rank concatenation of the same member folders (the first member is a plain
    LoRA: peft's cat copies the first member's config, rsLoRA included)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    (first, _), rest = members[0], members[1:]
    peft_model = PeftModel.from_pretrained(model, str(store.root / first), adapter_name=first)
    for name, _ in rest:
        peft_model.load_adapter(str(store.root / name), adapter_name=name)
    peft_model.add_weighted_adapter([n for n, _ in members], [w for _, w in members], "reference_mix", combination_type="cat")
    peft_model.set_adapter("reference_mix")
    peft_model.eval()
    return peft_model


def _served(tiny_base, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(folder)).eval()


def test_a_named_mix_equals_peft_cat_and_passes_the_gate(tiny_base, mix_store, shapes):
    from loraplex.server.store.mix import write_mix

    members = [("a", 0.7), ("b", -0.4), ("c", 1.5)]
    folder = write_mix(mix_store, "abc", members, shapes, base_model_id="tiny-base", max_lora_rank=64)
    assert folder == mix_store.root / "abc" and "abc" in mix_store.names()

    # the reference: peft's add_weighted_adapter(cat) on the same folders
    reference = _peft_cat_reference(tiny_base, mix_store, members)
    expected_logits, expected_tokens = _logits(reference), _greedy(reference)
    ours = _served(tiny_base, folder)
    got_logits = _logits(ours)
    base_logits = _logits(_served(tiny_base, mix_store.root / "a").get_base_model())
    assert (expected_logits - base_logits).abs().max() > 0.1  # the mix visibly changes the model
    torch.testing.assert_close(got_logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert _greedy(ours) == expected_tokens

    # the gate every adapter passes; ranks add up per module, no zero padding
    validated = load_validated_adapter(folder, "abc", shapes, max_lora_rank=64)
    ranks = {m.split("layers.", 1)[1]: w.rank for m, w in validated.modules.items()}
    assert ranks["0.self_attn.q_proj"] == 4 + 2 + 3
    assert ranks["0.self_attn.v_proj"] == 4 + 2
    assert ranks["1.mlp.down_proj"] == 4 + 5
    assert ranks["1.self_attn.k_proj"] == 4
    assert all(w.scale == 1.0 for w in validated.modules.values())

    manifest = read_manifest(folder)
    assert manifest.method == "mix" and manifest.base_fingerprint == shapes.fingerprint
    assert manifest.weights_sha256 == sha256_file(folder / "adapter_model.safetensors")
    recipe = manifest.mix
    assert [(m.name, m.weight) for m in recipe.members] == members and recipe.combination == "cat"
    for member in recipe.members:
        assert member.weights_sha256 == sha256_file(mix_store.root / member.name / "adapter_model.safetensors")
    assert recipe.members[2].rank == 5
    assert not list(mix_store.root.glob(".tmp-*"))  # nothing staged left behind


def test_a_mix_of_members_with_one_rank_needs_no_patterns_and_lists_suffixes(tiny_base, mix_store, shapes):
    from loraplex.server.store.mix import write_mix

    folder = write_mix(mix_store, "aa", [("a", 0.5), ("c", 2.0)], shapes, base_model_id="tiny-base", max_lora_rank=64)
    config = json.loads((folder / "adapter_config.json").read_text())
    # c adapts q_proj and down_proj of every layer: those modules get 4+3 and 4+5, the rest 4
    assert config["r"] == 4 and config["lora_alpha"] == 4
    assert config["rank_pattern"] == config["alpha_pattern"] and set(config["rank_pattern"].values()) == {7, 9}
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    reference = _peft_cat_reference(tiny_base, mix_store, [("a", 0.5), ("c", 2.0)])
    torch.testing.assert_close(_logits(_served(tiny_base, folder)), _logits(reference), rtol=1e-4, atol=1e-4)


def test_bad_named_mixes_are_refused_and_publish_nothing(tiny_base, mix_store, shapes, tmp_path):
    from loraplex.server.store.mix import write_mix

    def write(name, members, **options):
        return write_mix(mix_store, name, members, shapes, base_model_id="tiny-base", **{"max_lora_rank": 64, **options})

    with pytest.raises(AdapterInvalid, match=r"rank 9 at .*\(the members' ranks add up: 4 \+ 5\), above --max-lora-rank 8"):
        write("toobig", [("a", 1.0), ("c", 1.0)], max_lora_rank=8)
    with pytest.raises(AdapterInvalid, match="would replace its own member 'a'"):
        write("a", [("a", 1.0), ("b", 1.0)], overwrite=True)
    shutil.copytree(mix_store.root / "a", tmp_path / "other-base")
    other = AdapterStore(tmp_path)
    manifest_text = json.dumps({"name": "other-base", "base_model_id": "x", "base_fingerprint": "f" * 24, "rank": 4, "alpha": 16,
                                "target_modules": ["q_proj"], "weights_sha256": sha256_file(tmp_path / "other-base" / "adapter_model.safetensors")})
    (tmp_path / "other-base" / "loraplex.json").write_text(manifest_text)
    shutil.copytree(mix_store.root / "b", tmp_path / "b")
    with pytest.raises(AdapterInvalid, match="trained on base fingerprint f{24}"):
        write_mix(other, "m", [("b", 1.0), ("other-base", 1.0)], shapes, base_model_id="tiny-base", max_lora_rank=64)
    write("ab", [("a", 1.0), ("b", 1.0)])
    with pytest.raises(AdapterExists, match="--overwrite"):
        write("ab", [("a", 2.0), ("b", 1.0)])
    assert read_manifest(mix_store.root / "ab").mix.members[0].weight == 1.0
    write("ab", [("a", 2.0), ("b", 1.0)], overwrite=True)
    assert read_manifest(mix_store.root / "ab").mix.members[0].weight == 2.0
    assert not (set(mix_store.names()) & {"toobig", "m"}) and not list(mix_store.root.glob(".t*"))


def test_the_cli_recipe_accepts_both_separators():
    assert parse_members("a:0.7,b:0.3", param="RECIPE", max_members=8) == parse_members("a:0.7+b:0.3", param="RECIPE", max_members=8)
