"""The web console (/ui) in a real headless chromium against a real `loraplex serve` subprocess
(tiny random Llama, random adapters, API keys on, --ui-allow-training). The playground's
columns are checked against the API's own answers to the same greedy requests."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import pytest

from loraplex.server.auth import KeyFile
from loraplex.server.store import AdapterManifest, sha256_file, write_manifest
from loraplex.server.store.manifest import EvalMetrics
from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter

PROMPT = "The capital of France is"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def console(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    store = root / "adapters"
    store.mkdir()
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        make_random_adapter(tiny_base, store / name, seed=i + 11, r=4)
    # an adapter trained on another base: refused at load, shown as failed with the reason
    make_random_adapter(tiny_base, store / "wrongbase", seed=99, r=4)
    write_manifest(store / "wrongbase", AdapterManifest(
        name="wrongbase", base_model_id="other", base_fingerprint="0" * 24, rank=4, alpha=16,
        target_modules=("q_proj",), weights_sha256=sha256_file(store / "wrongbase" / "adapter_model.safetensors")))
    keys = KeyFile(root / "keys.yaml")
    admin, _ = keys.add("ops", "admin", ["*"])
    user, _ = keys.add("app", "user", ["alpha", "tiny"])
    srv = ServerProcess(tiny_base, store, "--api-keys-file", str(root / "keys.yaml"), "--max-lora-rank", "8",
                        "--max-model-len", "256", "--preload", "alpha", "--ui-allow-training")
    with srv:
        fingerprint = httpx.get(srv.url + "/ready").json()["fingerprint"]
        # alpha gets a manifest with scores and a training report, as train-adapter writes them
        write_manifest(store / "alpha", AdapterManifest(
            name="alpha", task="toy task", base_model_id="tiny", base_fingerprint=fingerprint, rank=4, alpha=16,
            target_modules=("q_proj", "v_proj"), weights_sha256=sha256_file(store / "alpha" / "adapter_model.safetensors"),
            metrics=EvalMetrics(metric="accuracy", base=0.25, adapter=0.75, eval_examples=4)))
        report = {
            "adapter": "alpha", "metric": "accuracy", "base_score": 0.25, "adapter_score": 0.75, "train_loss": 1.5,
            "eval_loss": 1.25, "base_eval_loss": 3.0, "global_step": 30, "seconds": 12.0, "train_examples": 36, "eval_examples": 4,
            "log_history": [{"loss": 3.0 - s / 15, "step": s} for s in range(1, 31, 3)] + [{"eval_loss": 1.25, "step": 30}],
            "eval_samples": [{"prompt": "<|im_start|>user\nIs the sky green?<|im_end|>\n<|im_start|>assistant\n", "reference": "no", "prediction": "no"},
                             {"prompt": "<|im_start|>user\nIs water wet?<|im_end|>\n<|im_start|>assistant\n", "reference": "yes", "prediction": "no"}],
        }
        (store / "alpha" / "training_report.json").write_text(json.dumps(report))
        srv.store, srv.admin, srv.user = store, admin, user
        yield srv


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


def _login(page, srv, key):
    page.goto(srv.url + "/ui")
    page.wait_for_selector("#key-dialog[open]")
    page.fill("#key-input", key)
    page.click("#key-submit")
    page.wait_for_selector("body[data-ready='1']")
    page.wait_for_selector("#adapter-table tbody tr")


def _row(page, name):
    return page.locator(f"#adapter-table tbody tr[data-adapter='{name}']")


def test_wrong_key_is_refused_then_admin_sees_every_adapter(page, console):
    page.goto(console.url + "/ui")
    page.wait_for_selector("#key-dialog[open]")  # /v1/models answered 401: the page asks for a key
    page.fill("#key-input", "lpx-not-a-key")
    page.click("#key-submit")
    page.wait_for_function("document.querySelector('#key-error').textContent.includes('invalid API key')")
    assert page.locator("#key-dialog").get_attribute("open") is not None
    page.fill("#key-input", console.admin)
    page.click("#key-submit")
    page.wait_for_selector("#adapter-table tbody tr")
    names = page.locator("#adapter-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.adapter)")
    assert names == ["alpha", "beta", "gamma", "wrongbase"]
    assert "key ops (admin)" in page.inner_text("#key-label")
    alpha = _row(page, "alpha")
    assert alpha.locator(".state").inner_text() == "resident"
    assert alpha.locator(".score").inner_text() == "accuracy: 0.250 → 0.750"
    assert "toy task" in alpha.inner_text()
    assert _row(page, "beta").locator("[data-action=load]").count() == 1
    page.shot("adapters-admin")


def test_user_key_sees_only_its_adapters_and_no_admin_buttons(page, console):
    _login(page, console, console.user)
    names = page.locator("#adapter-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.adapter)")
    assert names == ["alpha"]
    assert page.locator("#adapter-table [data-action=load], #adapter-table [data-action=unload]").count() == 0
    page.click("#tabs button[data-tab=playground]")
    chips = page.locator("#play-models input").evaluate_all("xs => xs.map(x => x.value)")
    assert chips == ["tiny", "alpha"]
    page.click("#tabs button[data-tab=train]")
    assert "needs an admin key" in page.inner_text("#train-off")


def test_load_and_unload_from_the_page(page, console):
    _login(page, console, console.admin)
    _row(page, "beta").locator("[data-action=load]").click()
    page.wait_for_selector("#adapter-table tr[data-adapter='beta'] .state.resident")
    described = httpx.get(console.url + "/v1/adapters/beta", headers=_auth(console.admin)).json()
    assert described["state"] == "resident"
    assert _row(page, "beta").locator("td").nth(2).inner_text() == "4"  # rank from the loaded adapter
    page.shot("adapters-beta-loaded")
    _row(page, "beta").locator("[data-action=unload]").click()
    page.wait_for_selector("#adapter-table tr[data-adapter='beta'] .state.available")
    assert httpx.get(console.url + "/v1/adapters/beta", headers=_auth(console.admin)).json()["state"] == "available"
    # a refused adapter: failed, with the registry's reason on the row
    _row(page, "wrongbase").locator("[data-action=load]").click()
    page.wait_for_selector("#adapter-table tr[data-adapter='wrongbase'] .state.failed")
    assert "fingerprint" in _row(page, "wrongbase").locator(".reason").inner_text().lower()
    assert "wrongbase" in page.inner_text("#banner")


def test_detail_view_shows_report_loss_curve_and_predictions(page, console):
    _login(page, console, console.admin)
    _row(page, "alpha").locator("[data-action=details]").click()
    page.wait_for_selector("#detail-samples table.samples tbody tr")
    assert page.inner_text("#detail-title") == "alpha"
    rows = page.locator("#detail-samples tbody tr")
    assert rows.count() == 2
    assert rows.nth(0).locator("td").nth(0).inner_text() == "Is the sky green?"
    assert rows.nth(1).get_attribute("class") == "miss"
    points = page.locator("#detail-loss svg polyline.train").get_attribute("points").split()
    assert len(points) == 10  # one point per logged training loss
    assert page.locator("#detail-loss svg polyline.eval").count() == 1
    assert "train loss" in page.inner_text("#detail-summary")
    page.shot("adapter-detail")
    # files are served by adapter name only, and only to keys that may see the adapter
    assert httpx.get(console.url + "/ui/api/adapters/alpha/report", headers=_auth(console.user)).status_code == 200
    assert httpx.get(console.url + "/ui/api/adapters/beta/report", headers=_auth(console.user)).status_code == 404
    assert httpx.get(console.url + "/ui/api/adapters/alpha/report").status_code == 401
    assert httpx.get(console.url + "/ui/api/adapters/..%2F..%2Fetc/report", headers=_auth(console.admin)).status_code in (400, 404)
    assert httpx.get(console.url + "/ui/static/..%2Findex.html").status_code == 404


def _api_answer(srv, model, mode, adapters=None):
    body = {"model": model, "temperature": 0, "max_tokens": MAX_TOKENS, "top_p": 1}
    if adapters is not None:
        body["adapters"] = adapters
    if mode == "chat":
        body["messages"] = [{"role": "user", "content": PROMPT}]
        reply = httpx.post(srv.url + "/v1/chat/completions", json=body, headers=_auth(srv.admin), timeout=120).json()
        return reply["choices"][0]["message"]["content"], reply["usage"]["completion_tokens"]
    body["prompt"] = PROMPT
    reply = httpx.post(srv.url + "/v1/completions", json=body, headers=_auth(srv.admin), timeout=120).json()
    return reply["choices"][0]["text"], reply["usage"]["completion_tokens"]


@pytest.mark.parametrize("mode", ["completion", "chat"])
def test_playground_columns_equal_the_api_answers(page, console, mode):
    _login(page, console, console.admin)
    page.click("#tabs button[data-tab=playground]")
    page.select_option("#play-mode", mode)
    page.fill("#play-prompt", PROMPT)
    page.fill("#play-temperature", "0")
    page.fill("#play-max-tokens", str(MAX_TOKENS))
    models = ["tiny", "alpha", "gamma"]
    for box in page.locator("#play-models input").all():
        box.set_checked(box.get_attribute("value") in models)
    page.click("#play-run")
    try:
        page.wait_for_selector("#play-columns[data-done='1']", state="attached", timeout=120_000)
    finally:
        page.shot(f"playground-{mode}")
    columns = page.locator("#play-columns .column")
    assert columns.evaluate_all("cs => cs.map(c => c.dataset.model)") == models
    texts = {}
    for i, model in enumerate(models):
        column = columns.nth(i)
        assert column.get_attribute("data-state") == "done", column.inner_text()
        expected_text, expected_tokens = _api_answer(console, model, mode)
        texts[model] = column.locator(".output").text_content()
        assert texts[model] == expected_text, model
        assert column.locator(".tokens").inner_text() == f"{expected_tokens} tokens"
        assert re.fullmatch(r"\d+ ms", column.locator(".latency").inner_text())
    assert len(set(texts.values())) == 3  # the adapters really answer differently
    page.shot(f"playground-{mode}")


def test_live_view_charts_and_per_adapter_counts(page, console):
    # traffic first, so the counters have something to show
    for model in ("alpha", "tiny"):
        httpx.post(console.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 4}, headers=_auth(console.admin), timeout=120)
    _login(page, console, console.admin)
    page.click("#tabs button[data-tab=live]")
    page.wait_for_selector("#live-adapters tr[data-adapter='alpha']")
    page.wait_for_selector("#chart-running polyline", state="attached")  # two polls drawn
    metrics = httpx.get(console.url + "/metrics").text
    served = sum(float(v) for v in re.findall(r'^loraplex_requests_total\{adapter="alpha",status="[^"]+"\} (\S+)', metrics, re.M))
    shown = float(page.locator("#live-adapters tr[data-adapter='alpha'] .requests").inner_text())
    assert shown >= 1 and abs(shown - served) <= 2  # polled moments apart
    assert page.inner_text("#live-resident") != "-"
    page.shot("live")


def test_docs_render_offline(page, console):
    outside: list[str] = []

    def only_loopback(route):
        if urlparse(route.request.url).hostname not in ("127.0.0.1", "localhost"):
            outside.append(route.request.url)
            return route.abort()
        return route.continue_()

    page.route("**/*", only_loopback)
    page.goto(console.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "loraplex" in page.inner_text(".swagger-ui .info .title")
    page.wait_for_selector(".opblock-summary-path[data-path='/v1/completions']")
    assert outside == []
    page.js_errors.clear()  # swagger-ui's own console noise is not ours


def test_train_to_serve_from_the_page(page, console, tmp_path):
    records = [{"input": f"is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in range(40)]
    good = tmp_path / "parity.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in records))
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"input": "x", "output": "y"}\n{not json\n')
    _login(page, console, console.admin)
    page.click("#tabs button[data-tab=train]")
    page.wait_for_selector("#train-file option", state="attached")
    page.set_input_files("#train-upload", str(bad))
    page.wait_for_function("document.querySelector('#train-error').textContent.includes('not valid JSON')")
    assert "broken.jsonl:2" in page.inner_text("#train-error")
    page.fill("#train-name", "beta")  # taken: refused before anything runs
    page.set_input_files("#train-upload", str(good))
    page.wait_for_function("document.querySelector('#train-upload-status').textContent.startsWith('40 records')")
    page.click("#train-start")
    page.wait_for_function("document.querySelector('#train-error').textContent.includes('already exists')")
    page.fill("#train-name", "parity")
    page.fill("#train-steps", "4")
    page.fill("#train-rank", "4")
    page.fill("#train-lr", "0.005")
    page.click("#train-start")
    page.wait_for_selector("#train-jobs .job")
    page.wait_for_selector("#train-jobs .job[data-state=succeeded], #train-jobs .job[data-state=failed]", timeout=300_000)
    job = page.locator("#train-jobs .job").first
    assert job.get_attribute("data-state") == "succeeded", job.inner_text()
    assert "step 4/4" in job.inner_text()
    jobs = httpx.get(console.url + "/ui/api/train/jobs", headers=_auth(console.admin)).json()["data"]
    assert [step for step, _ in jobs[0]["losses"]] == [1, 2, 3, 4]  # read live from the trainer's progress bar
    assert jobs[0]["returncode"] == 0
    page.shot("train")
    assert (console.store / "parity" / "adapter_model.safetensors").is_file()
    page.click("#tabs button[data-tab=adapters]")
    page.wait_for_selector("#adapter-table tr[data-adapter='parity']")
    page.click("#tabs button[data-tab=playground]")
    assert "parity" in page.locator("#play-models input").evaluate_all("xs => xs.map(x => x.value)")
    reply = httpx.post(console.url + "/v1/completions", json={"model": "parity", "prompt": "is 3 even?", "max_tokens": 2}, headers=_auth(console.admin), timeout=120)
    assert reply.status_code == 200, reply.text


def test_training_routes_refuse_users_and_bad_forms(console):
    user, admin = _auth(console.user), _auth(console.admin)
    assert httpx.get(console.url + "/ui/api/train/jobs", headers=user).status_code == 403
    bad = httpx.post(console.url + "/ui/api/train", json={"name": "x", "data_file": "demo:sentiment.jsonl", "max_steps": 0}, headers=admin)
    assert bad.status_code == 400 and "max_steps" in bad.text
    extra = httpx.post(console.url + "/ui/api/train", json={"name": "x", "data_file": "demo:sentiment.jsonl", "epochs": 3}, headers=admin)
    assert extra.status_code == 400 and "epochs" in extra.text
    path = httpx.post(console.url + "/ui/api/train", json={"name": "x", "data_file": "/etc/passwd"}, headers=admin)
    assert path.status_code == 404 and "/ui/api/train/files" in path.text
    big = httpx.post(console.url + "/ui/api/train/upload?filename=big.jsonl", content=b"{}\n" * 1_000_000, headers=admin)
    assert big.status_code == 400 and "limit" in big.text
    exe = httpx.post(console.url + "/ui/api/train/upload?filename=run.sh", content=b"echo", headers=admin)
    assert exe.status_code == 400 and ".jsonl" in exe.text


def _processes_writing(target) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if proc.name.isdigit() and str(target).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_stopping_the_server_stops_its_training_run(tiny_base, tmp_path):
    store = tmp_path / "adapters"
    store.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)))
    srv = ServerProcess(tiny_base, store, "--ui-allow-training").start()
    try:
        upload = httpx.post(srv.url + "/ui/api/train/upload?filename=d.jsonl", content=data.read_bytes()).json()
        job = httpx.post(srv.url + "/ui/api/train", json={"name": "long", "data_file": upload["id"], "max_steps": 5000, "lora_r": 4}).json()
        assert job["state"] == "starting"
        deadline = time.monotonic() + 60
        while not _processes_writing(store / "long") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_writing(store / "long"), "train-adapter did not start"
    finally:
        srv.stop()
    deadline = time.monotonic() + 30
    while _processes_writing(store / "long") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_writing(store / "long") == []
    assert not (store / "long").exists()


def _playground(page, srv, mode, columns):
    """Log in as admin, open the playground with a greedy prompt and only ``columns`` ticked."""
    _login(page, srv, srv.admin)
    page.click("#tabs button[data-tab=playground]")
    page.select_option("#play-mode", mode)
    page.fill("#play-prompt", PROMPT)
    page.fill("#play-temperature", "0")
    page.fill("#play-max-tokens", str(MAX_TOKENS))
    for box in page.locator("#play-models input").all():
        box.set_checked(box.get_attribute("value") in columns)


def _mix_row(page, name):
    return page.locator(f"#play-mix-members .mix-member[data-adapter='{name}']")


def test_mix_column_streams_the_weighted_mix_set_by_the_sliders(page, console):
    _playground(page, console, "completion", ["alpha"])
    sent: list[dict] = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.method == "POST" and r.url.endswith("/v1/completions") else None)
    # alpha: the slider, moved from 1 with the keyboard as a person would (6 steps of 0.05 down)
    _mix_row(page, "alpha").locator(".mix-slider").focus()
    for _ in range(6):
        page.keyboard.press("ArrowLeft")
    # gamma: typed into the number box, which moves the slider too
    _mix_row(page, "gamma").locator(".mix-weight").fill("-0.35")
    assert _mix_row(page, "alpha").locator(".mix-weight").input_value() == "0.7"
    assert _mix_row(page, "gamma").locator(".mix-slider").input_value() == "-0.35"
    assert _mix_row(page, "alpha").locator(".mix-on").is_checked() and _mix_row(page, "gamma").locator(".mix-on").is_checked()
    assert not _mix_row(page, "beta").locator(".mix-on").is_checked()
    # the sliders stop at the server's limit (server/mixes.py MAX_MIX_WEIGHT)
    assert _mix_row(page, "beta").locator(".mix-slider").get_attribute("max") == "8"
    assert _mix_row(page, "beta").locator(".mix-slider").get_attribute("min") == "-8"
    page.click("#play-run")
    try:
        page.wait_for_selector("#play-columns[data-done='1']", state="attached", timeout=120_000)
    finally:
        page.shot("playground-mix")
    columns = page.locator("#play-columns .column")
    assert columns.evaluate_all("cs => cs.map(c => c.dataset.model)") == ["alpha", "mix"]
    mix = page.locator("#play-columns .column[data-model='mix']")
    assert mix.get_attribute("data-state") == "done", mix.inner_text()
    assert mix.get_attribute("data-mix") == "alpha:0.7+gamma:-0.35"
    # the weights the sliders set are what the server got, in the body field `adapters`
    mixed = [body for body in sent if "adapters" in body]
    assert len(mixed) == 1 and len(sent) == 2
    assert mixed[0]["model"] == "tiny"
    assert mixed[0]["adapters"] == [{"name": "alpha", "weight": 0.7}, {"name": "gamma", "weight": -0.35}]
    # the column's text is the API's greedy answer to the same mix, in both request forms
    expected, tokens = _api_answer(console, "tiny", "completion", adapters=[{"name": "alpha", "weight": 0.7}, {"name": "gamma", "weight": -0.35}])
    compact, _ = _api_answer(console, "alpha:0.7+gamma:-0.35", "completion")
    shown = mix.locator(".output").text_content()
    assert shown == expected == compact
    assert mix.locator(".tokens").inner_text() == f"{tokens} tokens"
    assert re.fullmatch(r"\d+ ms", mix.locator(".latency").inner_text())
    assert shown != _api_answer(console, "alpha", "completion")[0]  # the mix is not just alpha
    assert page.locator("#play-columns .column[data-model='alpha'] .output").text_content() == _api_answer(console, "alpha", "completion")[0]


def test_refused_mix_shows_the_servers_message(page, console):
    _playground(page, console, "chat", [])
    _mix_row(page, "alpha").locator(".mix-on").check()
    _mix_row(page, "beta").locator(".mix-weight").fill("0")  # in the sliders' range, refused by the server
    page.click("#play-run")
    page.wait_for_selector("#play-columns[data-done='1']", state="attached", timeout=120_000)
    mix = page.locator("#play-columns .column[data-model='mix']")
    assert mix.get_attribute("data-state") == "error"
    body = {"model": "tiny", "adapters": [{"name": "alpha", "weight": 1}, {"name": "beta", "weight": 0}],
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
    refused = httpx.post(console.url + "/v1/chat/completions", json=body, headers=_auth(console.admin), timeout=120)
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "adapters[1].weight is 0" in message
    assert mix.locator(".error").inner_text() == message
    assert mix.locator(".stats .refused").inner_text() == "refused by the server: HTTP 400"
    page.shot("playground-mix-refused")
    # one adapter is not a mix: said on the page, nothing sent
    _mix_row(page, "beta").locator(".mix-on").uncheck()
    page.click("#play-run")
    assert "at least 2 adapters" in page.inner_text("#play-mix-error")
    assert page.locator("#play-columns .column").count() == 0


def test_stop_button_ends_a_training_run_and_publishes_nothing(page, console, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"input": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(20)))
    _login(page, console, console.admin)
    page.click("#tabs button[data-tab=train]")
    page.wait_for_selector("#train-file option", state="attached")
    page.set_input_files("#train-upload", str(data))
    page.wait_for_function("document.querySelector('#train-upload-status').textContent.startsWith('20 records')")
    page.fill("#train-name", "stopme")
    page.fill("#train-steps", "5000")
    page.fill("#train-rank", "4")
    page.click("#train-start")
    job = page.locator("#train-jobs .job").first
    # the trainer is stepping (its progress bar says step 1 or more)
    page.wait_for_function("/step [1-9][0-9]*\\/5000/.test((document.querySelector('#train-jobs .job[data-state=training]') || {}).textContent || '')", timeout=180_000)
    assert job.locator(".job-stop").count() == 1
    pids = _processes_writing(console.store / "stopme")
    assert pids, "train-adapter is not running"
    job.locator(".job-stop").click()
    page.wait_for_selector("#train-jobs .job[data-state=stopped]", timeout=60_000)
    page.shot("train-stopped")
    assert "nothing was written" in job.inner_text()
    assert job.locator(".job-stop").count() == 0
    described = httpx.get(console.url + "/ui/api/train/jobs", headers=_auth(console.admin)).json()["data"][0]
    assert described["name"] == "stopme" and described["state"] == "stopped"
    assert described["returncode"] not in (None, 0)
    assert 1 <= described["step"] < 5000
    # the process is gone, and nothing of it is in the store: no adapter, no hidden staging folder
    # (the trainer's own checkpoint folder .runs/stopme may stay, as for any train-adapter run)
    assert _processes_writing(console.store / "stopme") == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists()
    assert [p.name for p in console.store.iterdir() if "stopme" in p.name] == []
    assert httpx.get(console.url + "/v1/adapters/stopme", headers=_auth(console.admin)).status_code == 404
    # stopping again changes nothing; an unknown job is a 404
    again = httpx.post(console.url + f"/ui/api/train/jobs/{described['id']}/stop", headers=_auth(console.admin))
    assert again.status_code == 200 and again.json()["state"] == "stopped"
    assert httpx.post(console.url + "/ui/api/train/jobs/nope/stop", headers=_auth(console.admin)).status_code == 404
    assert httpx.post(console.url + f"/ui/api/train/jobs/{described['id']}/stop", headers=_auth(console.user)).status_code == 403
