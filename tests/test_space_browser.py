"""The Spaces demo end to end in a real headless browser: the app runs as ``python examples/space/app.py`` on
localhost with a tiny adapter, Debian's Chromium (driven by Playwright) picks a class, generates and reads the
privacy panel. Skipped, with the reason, when Chromium or Playwright is missing."""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import APP_PATH

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
START_TIMEOUT_S = 90
NUM_IMAGES = 4  # the app's default


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def playwright_api():
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install -y chromium chromium-driver)")
    return pytest.importorskip("playwright.sync_api", reason="no browser driver: pip install playwright")


@pytest.fixture(scope="module")
def app_url(playwright_api, space_adapter, tmp_path_factory):
    """The app's URL; the server is stopped after the module."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}  # fmt: skip
    log_path = tmp_path_factory.mktemp("space-server") / "app.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, str(APP_PATH), "--adapter", str(space_adapter)], env=env, stdout=log, stderr=log
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with {server.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not answer on {url} in {START_TIMEOUT_S} s:\n{log_path.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_generate_in_the_browser_shows_images_and_the_reported_epsilon(
    playwright_api, app_url, space_adapter, tmp_path, capsys
):
    report = json.loads((space_adapter / "dp_report.json").read_text())
    with playwright_api.sync_playwright() as playwright:
        try:
            context = playwright.chromium.launch_persistent_context(
                str(tmp_path / "user-data"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
        except playwright_api.Error as err:
            pytest.skip(f"Chromium does not start under Playwright: {err}")
        try:
            page = context.new_page()
            page.goto(app_url, wait_until="domcontentloaded")
            epsilon_text = page.locator("#dp-epsilon").inner_text(timeout=30_000)
            shown = re.search(r"ε = (\S+)", epsilon_text)
            assert shown is not None and shown.group(1) == f"{report['epsilon']:.4g}", epsilon_text

            page.get_by_label("Class").click()
            page.get_by_role("option", name="7", exact=True).click()
            assert page.get_by_label("Class").input_value() == "7"
            page.click("#generate")
            loaded = f"imgs => imgs.length >= {NUM_IMAGES} && imgs.every(img => img.complete && img.naturalWidth > 0)"
            page.wait_for_function(f"({loaded})([...document.querySelectorAll('#gallery img')])", timeout=30_000)
            sizes = page.locator("#gallery img").evaluate_all("imgs => imgs.map(img => img.naturalWidth)")
            assert sizes == [16] * NUM_IMAGES  # as many images as asked for, decoded, at the tiny model's resolution
            assert page.locator(".toast-body").count() == 0  # no gr.Error shown

            screenshot = tmp_path / "space-demo.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            context.close()
    with capsys.disabled():
        print(f"\nSpaces demo screenshot: {screenshot}")
