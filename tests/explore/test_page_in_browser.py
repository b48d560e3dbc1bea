"""The explorer page in a real headless Chromium (Debian's package, driven by Playwright), offline."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from llmkit.explore.page import payload, render
from llmkit.explore.server import make_server
from tests.explore.test_trace import TEXT, TOK, VARIANTS, model

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api", reason='needs Playwright: pip install -e ".[browser]"')
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("needs Debian's chromium (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new", "--disable-gpu"])
        yield b
        b.close()


def open_offline(browser, url: str, errors: list[str]):
    """A page whose every request but `url` itself is aborted: it must work with no network."""
    page = browser.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.route("**/*", lambda route: route.continue_() if route.request.url.rstrip("/") == url.rstrip("/") else route.abort())
    page.goto(url)
    return page


def heatmap_pixels(page) -> list[int]:
    return page.evaluate("() => Array.from(document.getElementById('heatmap').getContext('2d')"
                         ".getImageData(0, 0, 384, 384).data.filter((_, i) => i % 97 === 0))")


def test_the_page_renders_offline_and_answers_clicks_and_hovers(browser, tmp_path: Path) -> None:
    m = model(**VARIANTS["rope_mqa_moe"])
    data = payload(m, TOK, TEXT[:48], top_k=5, induction_length=8)
    html = tmp_path / "explore.html"
    started = time.perf_counter()
    html.write_text(render(data))
    errors: list[str] = []
    page = open_offline(browser, html.as_uri(), errors)
    page.wait_for_selector(".thumb")
    assert page.locator(".thumb").count() == data["layers"] * data["heads"]
    assert page.locator(".tok").count() == data["length"]
    before = heatmap_pixels(page)
    assert len(set(before)) > 3, "the T x T heatmap is drawn"
    page.locator('.thumb[data-layer="1"][data-head="2"]').click()
    assert page.locator("#heatmap-title").text_content() == "layer 1, head 2"
    assert heatmap_pixels(page) != before, "another head draws another heatmap"

    page.locator('.tok[data-i="7"]').hover()
    shown = [float(x) for x in page.locator("#predictions li").evaluate_all("items => items.map(i => i.dataset.prob)")]
    assert shown == [p for _, p in data["predictions"][7]["top"]]
    assert page.locator("#routing-section").is_visible()
    rendered = time.perf_counter() - started
    page.screenshot(path=str(tmp_path / "explore.png"), full_page=True)
    assert not errors, errors
    print(f"page written and rendered in {rendered:.2f} s")


def test_the_served_page_reruns_a_new_prompt(browser) -> None:
    server = make_server(model(), TOK, TEXT[:20], port=0, top_k=3, induction_length=8)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    errors: list[str] = []
    try:
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url)
        assert page.locator(".tok").count() == 20
        page.fill("#prompt", "lazy dog")
        page.click("#prompt-form button")
        page.wait_for_function("document.querySelectorAll('.tok').length === 8")
        assert "".join(page.locator(".tok").all_text_contents()) == "lazy\u2423dog"  # spaces show as ␣
        assert not errors, errors
    finally:
        server.shutdown()
        server.server_close()
