"""The page's "Any language" switch and "Quality" nudge, in headless Chromium."""

from __future__ import annotations

import numpy as np
import pytest

from clipsearch.aesthetic.table import save_table
from clipsearch.serve import ServeConfig, create_app

from .conftest import LiveServer
from .test_clip_back import FakeFrench
from .test_serve_browser import _shot, browser  # noqa: F401  (the Chromium fixture)

pytestmark = pytest.mark.browser


def test_any_language_and_quality(browser, index_dir, encoder, tmp_path):  # noqa: F811
    table = np.stack([encoder.word("green") / np.linalg.norm(encoder.word("green"))] * 10)
    save_table(tmp_path / "t.npy", table)
    settings = ServeConfig(indices={"shapes": index_dir}, aesthetic_embeddings=str(tmp_path / "t.npy"))
    app = create_app(settings, encoder=encoder, multilingual={"fr": FakeFrench(encoder)})
    with LiveServer(app) as srv:
        page = browser.new_page()
        page.set_default_timeout(90_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url + "/")
        page.wait_for_selector("#ml-opt:not([hidden])")
        page.wait_for_selector("#aes-opt:not([hidden])")
        page.check("#multilingual")
        page.fill("#q", "un cercle rouge")
        page.press("#q", "Enter")
        page.wait_for_selector(".card")
        caps = page.eval_on_selector_all(".card .caption", "els => els.map(e => e.textContent)")
        assert sum("red circle" in c for c in caps[:8]) >= 6, caps[:8]
        _shot(page, "languages.png", tmp_path)
        page.uncheck("#multilingual")  # the same words through the English model mean little
        page.wait_for_function("!document.querySelector('#status').textContent.startsWith('Searching')")
        page.wait_for_timeout(300)
        plain = page.eval_on_selector_all(".card .caption", "els => els.map(e => e.textContent)")
        assert plain != caps
        page.check("#multilingual")
        page.select_option("#aesthetic", "1")  # the table leans green: nudged results turn green
        page.wait_for_function("Array.from(document.querySelectorAll('.card .caption')).slice(0, 24)"
                               ".filter(e => e.textContent.includes('green')).length >= 6")  # fmt: skip
        assert not errors, errors
    # without a multilingual model or a table, neither control shows
    app = create_app(ServeConfig(indices={"shapes": index_dir}), encoder=encoder)
    with LiveServer(app) as srv:
        page = browser.new_page()
        page.goto(srv.url + "/")
        page.wait_for_function("document.querySelector('#index').options.length === 1")
        page.wait_for_timeout(200)
        assert page.is_hidden("#ml-opt") and page.is_hidden("#aes-opt")
