"""The HTML report in a real browser: headless Debian Chromium driven by playwright (marker ``e2e``).

Install once: ``apt-get install -y chromium`` and ``pip install playwright`` (never ``playwright install``:
the system Chromium at /usr/bin/chromium is used). Run with ``pytest -m e2e tests/test_report_e2e.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fmrirecon.report import build_report
from fmrirecon.report.fake import write_fake_report_inputs

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("FMRIRECON_CHROMIUM", "/usr/bin/chromium")
# Flags that keep a headless run hermetic: no network side channels, no sandbox (containers), fresh profile.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory):
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail(
            "e2e tests need playwright's Python package: pip install playwright (no 'playwright install')"
        )
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"e2e tests need Chromium at {CHROMIUM} (apt-get install -y chromium) or $FMRIRECON_CHROMIUM"
        )
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as playwright:
        # A persistent context is how playwright takes an explicit --user-data-dir (a fresh one per session).
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1100, "height": 900},
        )
        yield context
        context.close()


def test_report_renders_in_chromium(browser_context, tmp_path):
    fake = write_fake_report_inputs(
        tmp_path / "inputs",
        subjects={1: 7, 2: 5},
        methods=(("ridge", "default"), ("neuraldiffuser", "guided"), ("neuraldiffuser", "unguided")),
        caption='a <script>window.__pwned = 1</script> "red" square',
        image_size=64,
    )
    out = build_report([fake.metrics, fake.root / "runs"], tmp_path / "report.html", max_images=6)

    page = browser_context.new_page()
    console_errors, page_errors, requests = [], [], []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda err: page_errors.append(str(err)))
    page.on("request", lambda req: requests.append(req.url))
    page.goto(out.as_uri(), wait_until="load")

    assert console_errors == []
    assert page_errors == []
    # Self-contained: the only request is the file itself (data URIs are not fetched over the network).
    assert [u for u in requests if not u.startswith(("file://", "data:"))] == []
    # The caption's script was escaped, so it did not run.
    assert page.evaluate("() => window.__pwned === undefined")

    rows_per_subject = page.evaluate(
        """() => Array.from(document.querySelectorAll('section.subject')).map(
               s => [s.dataset.subject, s.querySelectorAll('tr.image-row').length])"""
    )
    assert rows_per_subject == [["1", 6], ["2", 5]]
    # Every embedded image decoded (naturalWidth 0 means a broken image).
    broken = page.evaluate(
        "() => Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length"
    )
    assert broken == 0
    n_images = page.evaluate("() => document.images.length")
    # (GT + 3 method columns) per row, plus one loss plot per run (2 methods x 2 subjects).
    assert n_images == (6 + 5) * 4 + 4

    screenshot = tmp_path / "report.png"
    page.screenshot(path=str(screenshot), full_page=False)
    assert screenshot.stat().st_size > 10_000
    page.close()
