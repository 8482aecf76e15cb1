"""The web page end to end in headless Chromium (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from clipsearch.serve import ServeConfig, create_app

from .conftest import LiveServer, png_bytes
from .helpers import RGB

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DUPLICATE_ROWS = {str(i) for i in range(5)}  # conftest's index_dir: duplicates=5
SHOTS = os.environ.get("CLIPSEARCH_SCREENSHOTS")  # a folder to keep the screenshots in

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    # make system-deps installs chromium: a missing one fails here, it is never a skip
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: run make system-deps (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="clipsearch-chromium-")
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def _shot(page, name: str, tmp_path) -> None:
    folder = SHOTS or str(tmp_path)
    os.makedirs(folder, exist_ok=True)
    page.screenshot(path=os.path.join(folder, name), full_page=False)


def test_web_page_end_to_end(browser, index_dir, ivf_dir, encoder, tmp_path):
    app = create_app(ServeConfig(indices={"shapes": index_dir, "big": ivf_dir}), encoder=encoder)
    with LiveServer(app) as srv:
        page = browser.new_page()
        page.set_default_timeout(90_000)  # a busy shared machine can be slow; a broken page still fails
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelectorAll('#index option').length === 2")
        page.select_option("#index", "shapes")

        # text search
        page.fill("#q", "a red circle")
        page.press("#q", "Enter")
        page.wait_for_selector(".card")
        cards = page.locator(".card")
        assert cards.count() == 24
        assert "red" in cards.first.locator(".caption").inner_text()
        assert "q=a+red+circle" in page.url and "index=shapes" in page.url  # the search is in the address
        page.wait_for_function(
            "Array.from(document.images).filter(i => i.closest('.card')).slice(0, 8).every(i => i.complete)"
        )
        _shot(page, "desktop.png", tmp_path)

        # load more appends a page
        page.click("#more")
        page.wait_for_function("document.querySelectorAll('.card').length === 48")
        ids = page.eval_on_selector_all(".card", "els => els.map(e => e.dataset.id)")
        assert len(set(ids)) == 48

        # filter: caption contains + min width, applied inside the search
        page.click("#filter-btn")
        page.fill("#f-caption", "dog")
        page.fill("#f-width", "512")
        page.press("#f-width", "Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('match the filter')")
        caps = page.eval_on_selector_all(".card .caption", "els => els.map(e => e.textContent)")
        assert caps and all("dog" in c for c in caps)

        # more like this, clicked while another search is still in flight: the click wins (the page
        # used to drop a search started while one was loading, leaving the old results on screen)
        first_id = page.locator(".card").first.get_attribute("data-id")
        page.evaluate(
            "document.querySelector('#f-clear').click(); document.querySelector('.card .like').click()"
        )
        page.wait_for_function("document.querySelector('#query-label').textContent.startsWith('like #')")
        page.wait_for_function("!document.querySelector('#status').textContent.startsWith('Searching')")
        # rows 0-4 of the fixture are one image: with dedup on, any of them may stand for the others
        same = sorted(DUPLICATE_ROWS) if first_id in DUPLICATE_ROWS else [first_id]
        page.wait_for_function(f"{same!r}.includes(document.querySelector('.card')?.dataset.id)")
        assert "match the filter" not in page.inner_text("#status")  # the filter was cleared too
        assert page.locator(".card .sim").first.inner_text() == "1.000"

        # search by image upload: a blue picture finds blue things
        img = tmp_path / "blue.png"
        img.write_bytes(png_bytes(RGB["blue"]))
        page.set_input_files("#file", str(img))
        page.wait_for_function("document.querySelector('#query-label').textContent.startsWith('image:')")
        page.wait_for_function(
            "document.querySelector('.card .caption') && document.querySelector('.card .caption').textContent.includes('blue')"
        )

        # a bad filter shows the server's message, not a crash
        page.click("#filter-btn") if page.locator("#filter-row").is_hidden() else None
        page.fill("#f-expr", "nosuchcolumn == 3")
        page.press("#f-expr", "Enter")
        page.wait_for_function("document.querySelector('#status').classList.contains('error')")
        assert "unknown column" in page.inner_text("#status")
        page.fill("#f-expr", "")

        # phone width
        page.set_viewport_size({"width": 390, "height": 844})
        page.fill("#q", "a green tree")
        page.press("#q", "Enter")
        page.wait_for_function(
            "document.querySelector('.card .caption') && document.querySelector('.card .caption').textContent.includes('green')"
        )
        page.wait_for_function(
            "Array.from(document.images).filter(i => i.closest('.card')).slice(0, 4).every(i => i.complete)"
        )
        _shot(page, "phone.png", tmp_path)
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390, "the page scrolls sideways on a phone"
        assert not errors, errors
        page.close()

        # an address with a query runs it on load (bookmarks, shared links)
        page = browser.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/?q=a%20blue%20square&index=shapes")
        page.wait_for_selector(".card")
        assert page.input_value("#q") == "a blue square"
        assert page.input_value("#index") == "shapes"
        assert "blue" in page.locator(".card .caption").first.inner_text()
        assert not errors, errors
        page.close()
