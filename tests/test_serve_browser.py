"""The web demo in real headless Chromium (Playwright): stream, frames drawn, prompt switch, errors, stop.

Needs the `playwright` package and Debian's Chromium at /usr/bin/chromium (`.ci/run` installs both). Without
them the test skips, except under CI (the CI variable set), where it fails.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from diagvid.serve import ServeSettings, create_app
from diagvid.stream import Pipeline, StreamConfig
from tests.serve_server import running_server

CHROMIUM = Path("/usr/bin/chromium")
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
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
OTHER = "a blue square moves up"

# a cheap fingerprint of what the canvas shows now
CANVAS_SUM = """() => {
  const c = document.getElementById("screen");
  const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let s = 0;
  for (let i = 0; i < d.length; i++) s = (s * 31 + d[i]) % 1000000007;
  return s;
}"""


def wait_until(page, predicate: str, timeout: float = 20.0) -> None:
    """Poll a JS function until it returns true. (`page.wait_for_function` evals a string, which the
    page's Content-Security-Policy rightly forbids; `page.evaluate` of a function is not affected.)"""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            state = page.evaluate(
                "() => ['status', 'error', 'log'].map((id) => document.getElementById(id).textContent).join(' | ')"
            )
            raise AssertionError(f"timed out waiting for {predicate}; page: {state}")
        page.wait_for_timeout(50)


def _playwright():
    """The Playwright entry point, or a skip (a failure under CI) that says what is missing."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not CHROMIUM.exists():
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium)")
    if missing:
        reason = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must provide them (.ci/run installs them)")
        pytest.skip(reason)
    return sync_playwright


def test_page_streams_switches_and_stops_in_chromium(_tiny_pipeline_models):
    sync_playwright = _playwright()
    m = _tiny_pipeline_models
    pipe = Pipeline(m.generator, m.vae, m.text_encoder, StreamConfig(frames_per_chunk=2, latent_hw=(4, 4)))
    app = create_app(pipe, ServeSettings(max_seconds=20, lead_seconds=0.5))
    problems: list[str] = []
    with running_server(app) as address, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
            page.goto(f"http://{address}/")
            wait_until(page, "() => document.getElementById('status').textContent.startsWith('ready')")
            assert page.locator("#schedule option").count() == 4

            # 1. start an endless stream; frames are drawn and change over time
            page.fill("#prompt", "a red circle moves left")
            page.check("#endless")
            page.click("#start")
            wait_until(page, "() => Number(document.getElementById('shown').textContent) >= 4")
            sums = set()
            for _ in range(6):
                sums.add(page.evaluate(CANVAS_SUM))
                page.wait_for_timeout(150)
            assert len(sums) >= 2, "the canvas did not change while playing"
            assert page.text_content("#nfe") in ("5", "3", "2") and page.text_content("#fps") != "–"
            assert page.text_content("#ttff").endswith(" s")

            # 2. switch the prompt with Enter while it plays; later chunks follow it
            page.fill("#prompt", OTHER)
            page.press("#prompt", "Enter")
            wait_until(page, f"() => document.getElementById('status').textContent === 'streaming: {OTHER}'")
            assert "switching to: " + OTHER in page.text_content("#log")

            # 3. a bad switch is refused on the page, and the stream goes on
            page.fill("#prompt", "a purple circle")
            page.click("#switch")
            wait_until(page, "() => document.getElementById('error').textContent.includes('purple')")
            shown = int(page.text_content("#shown"))
            wait_until(page, f"() => Number(document.getElementById('shown').textContent) > {shown}")

            # 4. stop: the download link appears and serves the mp4
            page.click("#stop")
            wait_until(
                page, "() => document.getElementById('status').textContent.startsWith('done (stopped)')"
            )
            link = page.locator("#download")
            assert link.is_visible()
            video = page.request.get(f"http://{address}{link.get_attribute('href')}")
            assert (
                video.status == 200 and video.headers["content-type"] == "video/mp4" and len(video.body()) > 0
            )

            # 5. a bad start shows the server's error and leaves the page ready
            page.uncheck("#endless")
            page.fill("#prompt", "a green square moves down")
            page.fill("#seed", "-1")
            page.click("#start")
            wait_until(page, "() => document.getElementById('error').textContent.includes('seed=-1')")
            assert page.is_enabled("#start") and not page.is_enabled("#stop")

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "serve_browser.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
