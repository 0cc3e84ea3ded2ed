"""Take the console screenshots in docs/img/ from a running server (not a test).

    loraplex serve --adapters-dir /tmp/store --ui-allow-training &   # a copy of adapters/
    .venv/bin/python -m tests.browser.screenshots --url http://127.0.0.1:8000 --out docs/img
    .venv/bin/python -m tests.browser.screenshots --views playground   # only ui-playground.png

Uses Debian's chromium like the tests. With --train it also starts a short training job on the
server (it publishes a new adapter into that server's store: point it at a copy of adapters/).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

VIEWS = ("adapters", "detail", "live", "playground", "train")
#: the playground's mix column in the screenshot (adapters from adapters/)
MIX = {"extract": "0.7", "datefmt": "0.3"}
PROMPT = "Extract the order as JSON with the keys item, quantity, size and city.\nOrder: Please send three large coffees to Boston."


def main() -> None:
    from playwright.sync_api import sync_playwright

    from tests.browser.conftest import CHROMIUM

    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--out", default="docs/img")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--views", default=",".join(VIEWS), help=f"comma-separated, of {','.join(VIEWS)}")
    args = parser.parse_args()
    views = set(args.views.split(","))
    unknown = views - set(VIEWS)
    if unknown:
        parser.error(f"unknown views {sorted(unknown)}; choose from {','.join(VIEWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1360, "height": 760}, device_scale_factor=1)
        page = context.new_page()
        page.set_default_timeout(300_000)
        page.goto(args.url + "/ui")
        page.wait_for_selector("#adapter-table tbody tr")
        for name in ("sentiment", "extract"):
            row = page.locator(f"#adapter-table tr[data-adapter='{name}']")
            if row.locator("[data-action=load]").count():
                row.locator("[data-action=load]").click()
                page.wait_for_selector(f"#adapter-table tr[data-adapter='{name}'] .state.resident")
        if "adapters" in views:
            page.screenshot(path=str(out / "ui-adapters.png"))

        page.locator("#adapter-table tr[data-adapter='sentiment'] [data-action=details]").click()
        page.wait_for_selector("#detail-samples table.samples")
        page.wait_for_timeout(500)
        page.locator("#adapter-detail").scroll_into_view_if_needed()
        if "detail" in views:
            page.screenshot(path=str(out / "ui-detail.png"))

        live = context.new_page()
        live.goto(args.url + "/ui")
        live.wait_for_selector("body[data-ready='1']")
        live.click("#tabs button[data-tab=live]")

        page.click("#tabs button[data-tab=playground]")
        page.select_option("#play-mode", "chat")
        page.fill("#play-prompt", PROMPT)
        page.fill("#play-max-tokens", "48")
        for box in page.locator("#play-models input").all():
            box.set_checked(True)
        for name, weight in MIX.items():
            page.locator(f"#play-mix-members .mix-member[data-adapter='{name}'] .mix-weight").fill(weight)
        page.click("#play-run")
        time.sleep(10)  # a few polls while the columns decode together
        if "live" in views:
            live.screenshot(path=str(out / "ui-live.png"))
        page.wait_for_selector("#play-columns[data-done='1']", state="attached")
        if "playground" in views:
            page.screenshot(path=str(out / "ui-playground.png"), full_page=True)  # the mix column wraps below
        if "train" not in views:
            browser.close()
            return

        page.click("#tabs button[data-tab=train]")
        page.wait_for_selector("#train-file option", state="attached")
        if args.train:
            page.select_option("#train-file", "demo:sentiment.jsonl")
            page.fill("#train-name", f"sentiment-quick-{int(time.time()) % 10000}")
            page.fill("#train-steps", "30")
            page.click("#train-start")
            page.wait_for_function("(() => { const j = document.querySelector('#train-jobs .job'); return j && /step ([4-9]|[1-9][0-9])\\//.test(j.textContent); })()")
        page.screenshot(path=str(out / "ui-train.png"))
        browser.close()


if __name__ == "__main__":
    main()
