"""The web console on the onnx backend: adapters that come with an ONNX export (not in the store)
are listed without a manifest, and the playground's columns equal the API's answers."""

from __future__ import annotations

import httpx
import pytest

from loraplex.server.cli import main as loraplex_main
from tests.integration.server_harness import ServerProcess
from tests.oracle import make_random_adapter

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def onnx_console(tiny_base, tmp_path_factory):
    work = tmp_path_factory.mktemp("onnx-console")
    x1 = make_random_adapter(tiny_base, work / "pool" / "x1", seed=41, r=4)
    x2 = make_random_adapter(tiny_base, work / "pool" / "x2", seed=42, r=2, targets=("q_proj", "v_proj"))
    model = work / "model"
    assert loraplex_main(["export-onnx", "--base", str(tiny_base), "--adapter_paths", f"{x1},{x2}", "--output_path", str(model), "--precision", "fp32"]) == 0
    store = work / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "big", seed=44, r=16)  # rank above --max-lora-rank: refused at load
    with ServerProcess(tiny_base, store, "--backend", "onnx", "--model", str(model), "--max-lora-rank", "8", "--max-model-len", "256") as srv:
        yield srv


def test_onnx_adapters_table_and_playground(page, onnx_console):
    srv = onnx_console
    page.goto(srv.url + "/ui")
    page.wait_for_selector("#adapter-table tbody tr")
    assert "onnx" in page.inner_text("#base-name")
    names = page.locator("#adapter-table tbody tr").evaluate_all("rows => rows.map(r => r.dataset.adapter)")
    assert names == ["big", "x1", "x2"]
    page.locator("#adapter-table tr[data-adapter='big'] [data-action=load]").click()
    page.wait_for_selector("#adapter-table tr[data-adapter='big'] .state.failed")
    assert "rank" in page.locator("#adapter-table tr[data-adapter='big'] .reason").inner_text()
    page.click("#tabs button[data-tab=playground]")
    page.select_option("#play-mode", "completion")
    page.fill("#play-prompt", PROMPT)
    page.fill("#play-max-tokens", "10")
    models = ["tiny", "x1", "x2"]
    for box in page.locator("#play-models input").all():
        box.set_checked(box.get_attribute("value") in models)
    page.click("#play-run")
    page.wait_for_selector("#play-columns[data-done='1']", state="attached", timeout=120_000)
    columns = page.locator("#play-columns .column")
    for i, model in enumerate(models):
        reply = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 10, "temperature": 0, "top_p": 1}, timeout=120).json()
        assert columns.nth(i).get_attribute("data-state") == "done"
        assert columns.nth(i).locator(".output").text_content() == reply["choices"][0]["text"], model
    page.shot("onnx-playground")
