"""The dashboard in real headless Chromium (Debian's, driven by Playwright) against the real server.

Skips, saying why, when Chromium, Playwright or the dashboard's build is missing (`make test`
installs and builds all three). With IMPETUS_SCREENSHOTS_DIR set (e.g. docs/img), each page's
screenshot is written there; the README shows those in docs/img.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import DEFAULT_MODEL, ROOT
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server

pytestmark = pytest.mark.server

CHROMIUM = Path(os.environ.get("IMPETUS_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
]
DIST = ROOT / "impetus-dashboard" / "dist"
KEY = "sk-dashboard-test-0123456789"
VIEWPORT = {"width": 1200, "height": 800}
TIMEOUT_MS = 30_000

if not (CHROMIUM.is_file() and os.access(CHROMIUM, os.X_OK)):
    pytest.skip(
        f"{CHROMIUM} is missing: install Debian's chromium (`make test` does, as root or with sudo)",
        allow_module_level=True,
    )
if not (DIST / "index.html").is_file():
    pytest.skip(f"{DIST / 'index.html'} is missing: build the dashboard with `make dashboard`", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing (requirements-dev.txt)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        # Not `make test`'s LD_PRELOAD (OpenBLAS, for MLX in pytest): inside Chromium it crashes the renderer.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, env=env)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=VIEWPORT, color_scheme="light")
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def shot(page: Any, name: str) -> None:
    folder = os.environ.get("IMPETUS_SCREENSHOTS_DIR")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / f"dashboard-{name}.png"))


def open_page(page: Any, server: Server, name: str) -> None:
    page.click(f"[data-testid=nav-{name}]")
    page.wait_for_selector(f"[data-testid=page-{name}]")


def wait_connected(page: Any) -> None:
    page.wait_for_selector("[data-testid=connection-state][data-state=connected]")


# ---- on the suite's shared server -------------------------------------------------------------


def test_page_loads_and_metrics_update_live(page: Any, server: Server) -> None:
    page.goto(server.url + "/")
    page.wait_for_selector("[data-testid=page-overview]")
    assert page.title() == "Impetus"
    wait_connected(page)
    try:
        page.wait_for_selector("[data-testid=feed-latency]", timeout=6000)
    except sync_api.TimeoutError:
        pytest.skip("this server sends no Socket.IO `metrics` events")
    first = page.text_content("[data-testid=feed-latency]")
    page.wait_for_function(
        "prev => document.querySelector('[data-testid=feed-latency]').textContent !== prev", arg=first, timeout=6000
    )
    assert page.text_content("[data-testid=value-tokensPerSecond]").split()[0] != "–"
    assert page.text_content("[data-testid=value-queueDepth]").split()[0] != "–"
    assert page.locator("[data-testid=gauge-memory]").inner_text().count("%") == 1


def test_playground_streams_a_chat_and_requests_lists_it(page: Any, server: Server) -> None:
    page.goto(server.url + "/playground")  # a page path: served by the single-page app's fallback
    page.wait_for_selector("[data-testid=page-playground]")
    wait_connected(page)
    page.wait_for_function("() => document.querySelector('[data-testid=chat-model]').value !== ''")
    assert page.input_value("[data-testid=chat-model]") == DEFAULT_MODEL
    page.fill("[data-testid=max-tokens]", "40")
    # Every text the streaming bubble shows, in order: a stream shows several, growing.
    page.evaluate("""() => {
        window.__seen = [];
        new MutationObserver(() => {
            const el = document.querySelector('[data-testid=message-assistant][data-streaming=true]');
            if (el && el.textContent !== window.__seen.at(-1)) window.__seen.push(el.textContent);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    page.fill("[data-testid=chat-input]", "Write a short poem about the sea.")
    page.click("[data-testid=chat-send]")
    page.wait_for_selector("[data-testid=chat-stats]", timeout=90_000)
    seen = [t for t in page.evaluate("window.__seen") if t and t != "…"]
    answer = page.locator("[data-testid=message-assistant]").last.inner_text()
    assert len(seen) >= 3, f"expected the reply to arrive in pieces, saw {seen}"
    assert all(answer.startswith(t.strip()) for t in seen), (seen, answer)
    assert "TTFT" in page.text_content("[data-testid=chat-stats]")
    shot(page, "playground")

    open_page(page, server, "requests")
    row = page.locator("[data-testid=request-row]").first
    try:
        page.wait_for_selector("[data-testid=request-row][data-status=finished]", timeout=10_000)
    except sync_api.TimeoutError:
        pytest.skip("the chat streamed; this server sends no Socket.IO `request_event` for the Requests page")
    assert DEFAULT_MODEL in row.inner_text()
    shot(page, "requests")
    open_page(page, server, "overview")
    page.wait_for_timeout(1500)  # let the charts take a sample or two after the chat
    shot(page, "overview")


def test_server_page_shows_version_config_and_docs(page: Any, server: Server) -> None:
    health = requests.get(server.url + "/health", timeout=10).json()
    page.goto(server.url + "/server")
    page.wait_for_selector("[data-testid=health-status]")
    assert page.text_content("[data-testid=fact-version]") == health["version"]
    assert page.text_content("[data-testid='fact-C allocator']") == health["allocator"]
    page.wait_for_selector("[data-testid=config-table]")
    assert "IMPETUS_MAX_BATCH" in page.inner_text("[data-testid=config-table]")
    has_docs = requests.get(server.url + "/openapi.json", timeout=10).status_code == 200
    page.wait_for_selector("[data-testid=docs-link]" if has_docs else "[data-testid=docs-unavailable]")
    shot(page, "server")


def test_models_page_lists_the_default_model(page: Any, server: Server) -> None:
    page.goto(server.url + "/models")
    row = page.locator(f"[data-testid='model-row-{DEFAULT_MODEL}']")
    row.wait_for()
    assert row.get_attribute("data-state") == "resident"
    page.wait_for_timeout(500)  # the pull and discovery panels, where this server has them
    shot(page, "models")


# ---- a server of its own: an API key, and a tiny model to load and unload ----------------------


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from tests.support.tiny_models import build_tiny_llama

    tmp = tmp_path_factory.mktemp("dashboard")
    models = tmp / "models"
    default = default_model_folder()
    build_tiny_llama(models / "tiny-dash", default)
    # No default model: the server starts at once and has only the tiny one to load.
    srv = start_server(
        tmp, wait_ready=False, IMPETUS_MODELS_DIR=str(models), IMPETUS_DEFAULT_MODEL="", IMPETUS_ADMIN_KEYS=KEY
    )  # an admin key: the page loads and unloads models
    yield srv
    stop_server(srv)
    shutil.rmtree(models, ignore_errors=True)


def test_the_key_is_asked_for_and_a_wrong_one_refused(page: Any, keyed: Server) -> None:
    if requests.get(keyed.url + "/api/models", timeout=10).status_code != 401:
        pytest.skip("this server does not enforce IMPETUS_API_KEYS")
    page.goto(keyed.url + "/models")  # the page itself is open; its API calls are not
    page.wait_for_selector("[data-testid=api-key-input]")
    assert "needs an API key" in page.text_content("[data-testid=api-key-reason]")
    page.fill("[data-testid=api-key-input]", "sk-wrong")
    page.click("[data-testid=api-key-save]")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=api-key-reason]')?.textContent.includes('refused')"
    )
    assert page.locator("[data-testid=model-row-tiny-dash]").count() == 0
    page.fill("[data-testid=api-key-input]", KEY)
    page.click("[data-testid=api-key-save]")
    page.wait_for_selector("[data-testid=model-row-tiny-dash]")
    assert page.evaluate("sessionStorage.getItem('impetus.apiKey')") == KEY
    wait_connected(page)  # the Socket.IO connection authenticates with the key too


def test_a_model_loads_and_unloads(page: Any, keyed: Server) -> None:
    page.add_init_script(f"sessionStorage.setItem('impetus.apiKey', {KEY!r})")
    page.goto(keyed.url + "/models")
    row = page.locator("[data-testid=model-row-tiny-dash]")
    row.wait_for()
    assert row.get_attribute("data-state") == "local"
    row.locator("[data-testid=load]").click()
    page.wait_for_selector("[data-testid=model-row-tiny-dash][data-state=resident]", timeout=60_000)
    headers = {"Authorization": f"Bearer {KEY}"}
    listed = requests.get(keyed.url + "/api/models", headers=headers, timeout=10).json()["data"]
    assert {m["id"]: m["state"] for m in listed}["tiny-dash"] == "resident"
    row.locator("[data-testid=unload]").click()
    page.wait_for_selector("[data-testid=model-row-tiny-dash][data-state=local]", timeout=60_000)
    listed = requests.get(keyed.url + "/api/models", headers=headers, timeout=10).json()["data"]
    assert {m["id"]: m["state"] for m in listed}["tiny-dash"] == "local"
