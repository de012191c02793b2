"""The page of `digitflow api` in a real headless Chromium (Debian's), driven by Playwright.

A digit is drawn on the canvas with the mouse; the page must show the prediction, the
28x28 network input and ten probability bars, the same answer /predict gives for the
canvas image; "wrong? it is a ..." stores the image under its label. Skipped, saying
why, where Chromium or Playwright is not installed (`make browser` installs both).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.images import big_glyph, photo
from tests.test_api import make_model
from tests.test_api_http import Server, start_server

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("DIGITFLOW_CHROMIUM", "/usr/bin/chromium")
# Headless, and nothing that reaches out of the machine (no updates, sync or first-run).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync",
]  # fmt: skip
PAGE_TIMEOUT_MS = 30_000  # a busy 2-core machine


def _browser_missing() -> str | None:
    if not (Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM}: `apt-get install chromium` (make browser)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (requirements.lock has it)"
    return None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    model = make_model(tmp_path / "model.pt", 0)
    labels = tmp_path / "labeled"
    s = start_server(model, tmp_path / "server.log", "--accept-labels", "--labels-dir", str(labels))
    yield s
    s.proc.terminate()
    s.proc.wait(timeout=30)


def test_draw_a_digit_and_read_the_prediction(server: Server, tmp_path: Path) -> None:
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            outside: list[str] = []  # requests leaving the page and its server: none (no CDN)
            page.on(
                "request",
                lambda r: (
                    None
                    if r.url.startswith(("data:", "blob:", f"http://127.0.0.1:{server.port}/"))
                    else outside.append(r.url)
                ),
            )
            page.goto(f"http://127.0.0.1:{server.port}/")
            page.wait_for_selector("body[data-ready='1']")

            # a "7": the bar, then the stem, drawn with the mouse
            box = page.locator("#canvas").bounding_box()
            x0, y0 = box["x"], box["y"]
            page.mouse.move(x0 + 80, y0 + 70)
            page.mouse.down()
            for x in range(80, 201, 10):
                page.mouse.move(x0 + x, y0 + 70)
            for i in range(1, 13):
                page.mouse.move(x0 + 200 - 7 * i, y0 + 70 + 14 * i)
            page.mouse.up()
            page.wait_for_selector("body[data-state='ok']")

            shown = page.locator("#digit").inner_text()
            assert shown.isdigit()
            bars = page.locator("#bars li")
            assert bars.count() == 10
            values = [float(bars.nth(i).locator(".value").inner_text().rstrip(" %"))
                      for i in range(10)]  # fmt: skip
            assert values.index(max(values)) == int(shown)
            assert abs(sum(values) - 100) < 1.0
            assert page.locator("#bars li.top").get_attribute("data-digit") == shown
            assert page.eval_on_selector("#input-img", "img => img.naturalWidth") == 28

            # the same canvas, sent by the test: the same answer as the page shows
            row = page.evaluate(
                """async () => {
                    const blob = await new Promise(r => document.getElementById('canvas')
                        .toBlob(r, 'image/png'));
                    const form = new FormData();
                    form.append('files', blob, 'canvas.png');
                    return (await (await fetch('/predict', {method: 'POST', body: form}))
                        .json())[0];
                }"""
            )
            assert row["status"] == "ok" and str(row["label"]) == shown

            # "wrong? it is a 7": stored under data/labeled/7/
            page.locator("#label-buttons button", has_text="7").click()
            page.wait_for_function(
                "document.getElementById('label-status').textContent.startsWith('stored')"
            )
            stored = list((tmp_path / "labeled" / "7").glob("*.png"))
            assert len(stored) == 1

            page.locator("#clear").click()
            assert page.locator("#digit").inner_text() == "–"
            assert page.evaluate("document.body.dataset.state") == "idle"

            # a photo, picked with the file input (the same path as one dropped)
            photo_path = tmp_path / "four.jpg"
            cv2.imwrite(str(photo_path), photo(big_glyph(4), np.random.default_rng(3)))
            page.set_input_files("#file", str(photo_path))
            page.wait_for_selector("body[data-state='ok']")
            assert page.locator("#digit").inner_text().isdigit()
            assert page.locator("#bars li").count() == 10
            assert outside == []
        finally:
            browser.close()
