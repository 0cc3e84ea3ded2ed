"""The independent reference for serving correctness: peft's PeftModel with ONE adapter (or
peft's own weighted mix, ``add_weighted_adapter(combination_type="cat")``), greedy, recomputing
the whole sequence at every step (no KV cache, no batching); its teacher-forced logits for
logprob checks; plus random adapters that visibly change the model."""

from __future__ import annotations

import torch

def make_random_adapter(base_dir, folder, *, seed, r=4, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), **lora):
    """A peft LoRA folder with random non-zero B (so each adapter visibly changes outputs);
    ``lora`` overrides LoraConfig fields (lora_alpha, rank_pattern, alpha_pattern, use_rslora...)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = {"lora_alpha": 4 * r, **lora}
    peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=list(targets), init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(str(folder))
    return folder


def two_adapters(base_dir, root) -> dict:
    """The two adapters the feature tests share: "a" (rank 4, every projection) and "b" (rank 8,
    q/v/down only), seeds 11 and 12."""
    return {
        "a": make_random_adapter(base_dir, root / "a", seed=11),
        "b": make_random_adapter(base_dir, root / "b", seed=12, r=8, targets=("q_proj", "v_proj", "down_proj")),
    }


def reference_greedy(base_dir, adapter_dir, prompt_ids, n=12, quantization_config=None):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"quantization_config": quantization_config, "device_map": "cpu"} if quantization_config else {}
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), **kwargs)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(torch.argmax(logits)))
    return ids[len(prompt_ids):]




class Collector:
    """An engine request's ``emit``: collects tokens (and their logprobs), the finish reason, and
    how many finishes were emitted (exactly one is the contract)."""

    def __init__(self):
        self.tokens, self.finish, self.logprobs, self.finishes = [], None, [], 0
        self.prompt_logprobs = None  # set by on_prompt_logprobs
        self.prompt_calls = 0

    def __call__(self, token, finish, logprob=None):
        if token is not None:
            self.tokens.append(token)
            self.logprobs.append(logprob)
        if finish is not None:
            self.finish = finish
            self.finishes += 1

    def on_prompt_logprobs(self, logprobs):
        assert not self.tokens, "prompt logprobs must come before the first token"
        self.prompt_logprobs = logprobs
        self.prompt_calls += 1


def greedy_request(request_id, prompt, adapter, n):
    """A greedy EngineRequest (ignoring EOS) and its Collector."""
    from loraplex.server.engine.rows import EngineRequest
    from loraplex.server.engine.sampling import SamplingParams

    sink = Collector()
    return EngineRequest(request_id, list(prompt), adapter, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink), sink


def cached_oracle(base_dir, adapters: dict, n_default: int):
    """reference_greedy memoized per (adapter name, prompt, n); adapter None = the bare base."""
    cache = {}

    def expected(adapter, prompt, n=n_default):
        key = (adapter, tuple(prompt), n)
        if key not in cache:
            cache[key] = reference_greedy(base_dir, adapters[adapter] if adapter else None, prompt, n=n)
        return cache[key]

    return expected


def reference_mix_model(base_dir, adapters: dict, weights: dict, *, dtype=None):
    """peft's own weighted mix: ``add_weighted_adapter(combination_type="cat")`` over the given
    adapter folders (name -> folder) with ``weights`` (name -> weight), at ``dtype``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(adapters)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or torch.float32)
    model = PeftModel.from_pretrained(model, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.add_weighted_adapter(names, [weights[n] for n in names], "mix", combination_type="cat")
    model.set_adapter("mix")
    return model.eval()


def greedy_with(model, prompt_ids, n):
    """Greedy continuation of ``prompt_ids`` by ``model``, recomputing the whole sequence per token."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(torch.argmax(model(input_ids=torch.tensor([ids])).logits[0, -1])))
    return ids[len(prompt_ids):]


def reference_logits(base_dir, adapter_dir, ids, *, dtype=None):
    """peft's PeftModel with one adapter (None = bare base) at ``dtype``: next-token logits
    [len(ids), vocab] (fp32) for every prefix of ``ids``, in one forward (teacher forcing)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype or torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0].float()


def check_greedy_within(logits, prompt_len, tokens, tol):
    """The check for engines at reduced precision: ``tokens`` (the engine's greedy output after a
    prompt of ``prompt_len``) against the reference ``logits`` over prompt + tokens. At every step
    the engine's token must score within ``tol`` of the reference's best, and must BE the
    reference's best wherever the reference's top-2 margin exceeds ``tol`` (elsewhere a near-tie
    may legitimately go either way, after which both continue from the engine's choice, since the
    reference is teacher-forced on it). Returns the number of steps that were near-ties."""
    ties = 0
    for i, token in enumerate(tokens):
        row = logits[prompt_len - 1 + i]
        top2 = torch.topk(row, 2).values
        best = int(torch.argmax(row))
        assert float(row[token]) >= float(top2[0]) - tol, (i, token, best, float(top2[0] - row[token]))
        if float(top2[0] - top2[1]) > tol:
            assert token == best, (i, token, best, float(top2[0] - top2[1]))
        else:
            ties += 1
    return ties


def run_engine(engine, arrivals, on_step=None, max_steps=500):
    """Drive an engine directly: ``arrivals`` maps a step number to the requests admitted before
    that step; steps until every request has finished (at most ``max_steps``)."""
    step = 0
    while engine.num_running or any(s >= step for s in arrivals):
        for request in arrivals.get(step, []):
            engine.admit(request)
        engine.step()
        if on_step:
            on_step(step)
        step += 1
        assert step < max_steps, f"the engine did not finish within {max_steps} steps"
    return step
