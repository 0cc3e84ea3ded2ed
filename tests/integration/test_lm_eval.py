"""lm-evaluation-harness against a live server: the `lm_eval` CLI (PyPI `lm-eval[api]`, in its own
venv `.venv-lmeval` that `make test` creates) runs `local-completions` with
`tokenizer_backend=remote` (the server's /tokenizer_info, /tokenize, /detokenize) on two local
tasks in tests/data/lm_eval/ (no hub download): a `generate_until` task scored by exact match and
a multiple-choice task scored by accuracy from loglikelihoods (`echo` + `logprobs`). Runs for the
base and for one adapter, and checks every item of lm-eval's logged samples against peft's
`PeftModel` computed directly here at the served dtype (fp32): each choice's summed continuation
logprob and is-greedy flag, each generated text, and the aggregate scores."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter

REPO = Path(__file__).resolve().parents[2]
LM_EVAL = REPO / ".venv-lmeval" / "bin" / "lm_eval"
TASKS_DIR = REPO / "tests" / "data" / "lm_eval"
ADAPTER = "quiz"
#: |lm-eval's summed continuation logprob - peft's| for one choice: the server's fp32 forward
#: against one plain fp32 forward of peft (observed: 0.0 on every choice); the bound leaves room
#: for fp32 reassociation only.
LOGPROB_TOL = 1e-4

# The tasks' prompts, written out again from tests/data/lm_eval/*.yaml (the check that lm-eval
# built the same strings is below): the reference builds its inputs from the data files itself.
GEN_PROMPT = "Q: {question}\nA:"
GEN_STOP = ("\n", "Q:")
GEN_MAX_TOKENS = 8
MC_PROMPT = "Question: {question}\nAnswer:"

pytestmark = pytest.mark.skipif(
    not LM_EVAL.exists(), reason=f"lm-eval is not installed at {LM_EVAL.parent.parent}: `make test` creates it (Makefile target .venv-lmeval/.stamp-lmeval)"
)


def _records(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS_DIR / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def lm_eval_runs(tiny_base, tmp_path_factory):
    """One server (the tiny base + adapter ADAPTER) and two `lm_eval` runs against it at the same
    time, one for the base and one for the adapter (so their requests share the server's batches);
    {model: (results, samples, adapter folder or None)}."""
    root = tmp_path_factory.mktemp("lm-eval")
    (root / "adapters").mkdir()
    adapter_dirs = {"tiny": None, ADAPTER: make_random_adapter(tiny_base, root / "adapters" / ADAPTER, seed=11)}
    with ServerProcess(tiny_base, root / "adapters") as srv:
        procs = {model: _start_lm_eval(srv.url, model, root / f"out-{model}") for model in adapter_dirs}
        try:
            runs = {model: _finish_lm_eval(proc, root / f"out-{model}") for model, proc in procs.items()}
        finally:
            for proc in procs.values():  # the other run, when one failed
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return {model: (*runs[model], adapter_dirs[model]) for model in adapter_dirs}


def _start_lm_eval(url: str, model: str, out: Path) -> subprocess.Popen:
    """`lm_eval` as a subprocess, run from the tasks' folder (their data_files are relative)."""
    model_args = ",".join(
        [f"base_url={url}/v1/completions", f"model={model}", "tokenizer_backend=remote", "num_concurrent=1", "max_retries=1", "timeout=120", "max_length=512"]
    )
    cmd = [str(LM_EVAL), "--model", "local-completions", "--model_args", model_args, "--tasks", "loraplex_gen,loraplex_mc", "--include_path", str(TASKS_DIR), "--output_path", str(out), "--log_samples"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(out / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    out.mkdir(parents=True)
    with open(out / "lm_eval.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=TASKS_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)


def _finish_lm_eval(proc: subprocess.Popen, out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """Waits for the run; returns (results["results"], {task: samples sorted by doc_id})."""
    code = proc.wait(timeout=600)
    assert code == 0, f"lm_eval failed ({code}):\n{(out / 'lm_eval.log').read_text()[-8000:]}"
    (results_file,) = out.rglob("results_*.json")
    samples = {}
    for task in ("loraplex_gen", "loraplex_mc"):
        (sample_file,) = out.rglob(f"samples_{task}_*.jsonl")
        samples[task] = sorted((json.loads(line) for line in sample_file.read_text().splitlines() if line.strip()), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text())["results"], samples


class Reference:
    """peft's PeftModel (adapter None = the bare base) at fp32, one plain forward per question."""

    def __init__(self, base_dir: Path, adapter_dir: Path | None) -> None:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        self.model = (PeftModel.from_pretrained(model, str(adapter_dir)) if adapter_dir is not None else model).eval()
        self.eos_ids = {self.tokenizer.eos_token_id, model.config.eos_token_id} - {None}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """Summed log-probability of the continuation's tokens after the context, and whether
        each of them is the argmax (the causal-LM convention: the continuation's tokens are those
        of context+continuation after the context's own tokens)."""
        whole, ctx = self.encode(context + continuation), self.encode(context)
        assert whole[: len(ctx)] == ctx and len(whole) > len(ctx)
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(input_ids=torch.tensor([whole])).logits[0].float(), dim=-1)  # [T, vocab]
        total, greedy = 0.0, True
        for pos in range(len(ctx), len(whole)):
            row = logprobs[pos - 1]  # predicts token `pos`
            total += float(row[whole[pos]])
            greedy &= int(torch.argmax(row)) == whole[pos]
        return total, greedy

    def generate(self, prompt: str, stops: tuple[str, ...], max_tokens: int) -> str:
        """Greedy continuation (whole sequence recomputed per token) until EOS or max_tokens, its
        text cut before the first stop string (OpenAI's `stop`: the stop string is not returned)."""
        ids = self.encode(prompt)
        out: list[int] = []
        with torch.no_grad():
            for _ in range(max_tokens):
                token = int(torch.argmax(self.model(input_ids=torch.tensor([ids + out])).logits[0, -1]))
                if token in self.eos_ids:
                    break
                out.append(token)
                text = self.tokenizer.decode(out, skip_special_tokens=True)
                if any(s in text for s in stops):
                    break
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        cut = min((text.index(s) for s in stops if s in text), default=len(text))
        return text[:cut]


@pytest.mark.parametrize("model", ["tiny", ADAPTER])
def test_lm_eval_scores_equal_peft_item_by_item(lm_eval_runs, tiny_base, model):
    results, samples, adapter_dir = lm_eval_runs[model]
    ref = Reference(tiny_base, adapter_dir)
    stops = (*GEN_STOP, ref.tokenizer.eos_token)  # lm-eval adds the eos string from /tokenizer_info

    # multiple choice: every choice's loglikelihood and is-greedy flag, then acc per item
    mc_docs = _records("loraplex_mc.jsonl")
    assert [s["doc"] for s in samples["loraplex_mc"]] == mc_docs
    mc_acc = []
    for sample, doc in zip(samples["loraplex_mc"], mc_docs):
        context = MC_PROMPT.format(**doc)
        assert [a["arg_0"] for a in sample["arguments"].values()] == [context] * len(doc["choices"])
        assert [a["arg_1"] for a in sample["arguments"].values()] == [" " + c for c in doc["choices"]]
        expected = [ref.loglikelihood(context, " " + choice) for choice in doc["choices"]]
        got = [(float(lp), greedy == "True") for ((lp, greedy),) in sample["resps"]]
        for choice, (ref_lp, ref_greedy), (lp, greedy) in zip(doc["choices"], expected, got):
            assert math.isfinite(lp) and abs(lp - ref_lp) <= LOGPROB_TOL, f"doc {sample['doc_id']} choice {choice!r}: lm-eval {lp} vs peft {ref_lp}"
            assert greedy == ref_greedy, f"doc {sample['doc_id']} choice {choice!r}: is_greedy {greedy} vs peft {ref_greedy}"
        scores = [lp for lp, _ in expected]
        best = max(range(len(scores)), key=scores.__getitem__)
        margin = sorted(scores)[-1] - sorted(scores)[-2]
        assert margin > 2 * LOGPROB_TOL, f"doc {sample['doc_id']}: the two best choices are within the tolerance ({margin}); pick other data"
        mc_acc.append(float(best == doc["label"]))
        assert sample["acc"] == mc_acc[-1], f"doc {sample['doc_id']}"
    assert results["loraplex_mc"]["acc,none"] == pytest.approx(sum(mc_acc) / len(mc_acc), abs=1e-12)

    # generate_until: the raw generated text of every item, then exact match after strip
    gen_docs = _records("loraplex_gen.jsonl")
    assert [s["doc"] for s in samples["loraplex_gen"]] == gen_docs
    gen_em = []
    for sample, doc in zip(samples["loraplex_gen"], gen_docs):
        prompt = GEN_PROMPT.format(**doc)
        assert sample["arguments"]["gen_args_0"]["arg_0"] == prompt
        expected = ref.generate(prompt, stops, GEN_MAX_TOKENS)
        ((text,),) = sample["resps"]
        assert text == expected, f"doc {sample['doc_id']}: lm-eval got {text!r}, peft greedy {expected!r}"
        gen_em.append(float(expected.strip() == doc["answer"]))
        assert sample["exact_match"] == gen_em[-1], f"doc {sample['doc_id']}"
    assert results["loraplex_gen"]["exact_match,strip"] == pytest.approx(sum(gen_em) / len(gen_em), abs=1e-12)
