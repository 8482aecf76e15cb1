"""The page's match switch (meaning / meaning + keywords / keywords) and highlighted caption words, in
headless Chromium."""

from __future__ import annotations

import pytest

from clipsearch.serve import ServeConfig, create_app

from .conftest import LiveServer, N
from .helpers import build_index, captions
from .test_serve_browser import _shot, browser  # noqa: F401 - the Chromium fixture

pytestmark = pytest.mark.browser


def test_match_switch_and_highlights(browser, image_server, encoder, index_dir, tmp_path_factory, tmp_path):  # noqa: F811
    base = captions(N, 0)  # the image server draws row i in the colour of base[i]
    caps = list(base)
    caps[123] = f"{base[123]}, code XK-4471 by Vellmora"
    folder = str(tmp_path_factory.mktemp("kwpage") / "index")
    build_index(folder, n=N, encoder=encoder, caption_list=caps, vector_captions=base, keywords=True,
                url_base=image_server + "/img")  # fmt: skip
    app = create_app(ServeConfig(indices={"kw": folder, "plain": index_dir}), encoder=encoder)
    with LiveServer(app) as srv:
        page = browser.new_page()
        page.set_default_timeout(90_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelectorAll('#index option').length === 2")
        page.select_option("#index", "kw")
        page.select_option("#mode", "hybrid")
        page.fill("#q", "red circle XK-4471")
        page.press("#q", "Enter")
        page.wait_for_selector(".card mark")
        first = page.locator(".card").first
        assert "XK-4471" in first.locator(".caption").inner_text()
        marks = first.locator(".caption mark").all_inner_texts()
        assert "XK-4471" in marks
        assert "red" in page.locator(".card").nth(1).locator(".caption mark").all_inner_texts()
        assert "kw 1" in first.locator(".sim").inner_text()  # cosine · BM25
        assert "mode=hybrid" in page.url
        page.wait_for_function(
            "Array.from(document.images).filter(i => i.closest('.card')).slice(0, 4).every(i => i.complete)"
        )
        _shot(page, "hybrid.png", tmp_path)

        # keywords only, with a query the parser has to forgive
        page.select_option("#mode", "keyword")
        page.fill("#q", 'vellmora "unbalanced')
        page.press("#q", "Enter")
        page.wait_for_function("document.querySelector('#status').textContent.includes('unbalanced quote')")
        assert page.locator(".card").count() == 1
        assert page.locator(".card .caption mark").first.inner_text() == "Vellmora"

        # an index without a keyword index: the switch falls back to meaning only
        page.select_option("#index", "plain")
        assert page.input_value("#mode") == "semantic"
        assert page.evaluate("document.querySelector('#mode option[value=hybrid]').disabled")
        assert not errors, errors
        page.close()
