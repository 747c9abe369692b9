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
ADMIN = {"Authorization": f"Bearer {KEY}"}
THINKER = "thinker"  # tests/support/thinking_model.py: a fixed script of reasoning, then an answer
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
    from tests.support.thinking_model import build_thinking_llama
    from tests.support.tiny_models import build_tiny_llama

    tmp = tmp_path_factory.mktemp("dashboard")
    models = tmp / "models"
    default = default_model_folder()
    build_tiny_llama(models / "tiny-dash", default)
    build_thinking_llama(models / THINKER, default)  # thinks, then answers: the Playground's reasoning block
    # No default model: the server starts at once and has only the tiny one to load.
    srv = start_server(
        tmp, wait_ready=False, IMPETUS_MODELS_DIR=str(models), IMPETUS_DEFAULT_MODEL="", IMPETUS_ADMIN_KEYS=KEY
    )  # an admin key: the page loads and unloads models
    yield srv
    stop_server(srv)  # waits: its models folder goes next
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


def with_key(page: Any, url: str) -> None:
    page.add_init_script(f"sessionStorage.setItem('impetus.apiKey', {KEY!r})")
    page.goto(url)


def choose(page: Any, select: str, option: str) -> None:
    """Pick `option` in a Mantine Select (a text input that opens a listbox of role=option; the other
    selects' listboxes stay in the page, hidden)."""
    page.click(f"[data-testid={select}]")
    page.locator("[role=option]:visible", has_text=option).first.click()
    page.wait_for_function(
        "([sel, value]) => document.querySelector(`[data-testid=${sel}]`).value.startsWith(value)",
        arg=[select, option],
    )


@pytest.fixture
def thinker(keyed: Server) -> Iterator[str]:
    """The thinking model, resident for the test (the Playground lists resident models)."""
    load = requests.post(keyed.url + "/api/models/load", json={"model": THINKER}, headers=ADMIN, timeout=120)
    assert load.status_code == 200, load.text
    yield THINKER
    requests.post(keyed.url + "/api/models/unload", json={"model": THINKER}, headers=ADMIN, timeout=60)


def test_playground_shows_reasoning_apart_and_collapses_it(page: Any, keyed: Server, thinker: str) -> None:
    from tests.support.thinking_model import ANSWER, REASONING

    with_key(page, keyed.url + "/playground")
    page.wait_for_selector("[data-testid=page-playground]")
    choose(page, "chat-model", thinker)
    context = requests.get(f"{keyed.url}/v1/models/{thinker}", headers=ADMIN, timeout=10).json()["context_length"]
    page.wait_for_selector(f"[data-testid=chat-context][data-context='{context}']")
    page.fill("[data-testid=max-tokens]", "40")
    page.fill("[data-testid=chat-input]", "What colour is the sky?")
    page.click("[data-testid=chat-send]")
    page.wait_for_selector("[data-testid=chat-stats]", timeout=90_000)

    reply = page.locator("[data-testid=message-assistant]").last
    assert reply.locator("[data-testid=message-content]").inner_text() == ANSWER  # the answer alone
    block = reply.locator("[data-testid=reasoning]")
    assert block.get_attribute("data-open") == "false"  # collapsed once the reply is done
    assert reply.locator("[data-testid=reasoning-text]").count() == 0
    assert f"{len(REASONING)} characters" in block.inner_text()
    block.locator("[data-testid=reasoning-toggle]").click()
    assert reply.locator("[data-testid=reasoning-text]").inner_text() == REASONING
    shot(page, "playground-reasoning")

    # Thinking off: chat_template_kwargs.enable_thinking=false reaches the template; no reasoning at all.
    page.locator("[data-testid=thinking] label", has_text="Off").click()
    page.fill("[data-testid=chat-input]", "And the grass?")
    page.click("[data-testid=chat-send]")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=message-assistant]').length === 2")
    page.wait_for_selector("[data-testid=chat-stats]", timeout=90_000)
    second = page.locator("[data-testid=message-assistant]").last
    assert second.locator("[data-testid=message-content]").inner_text() == ANSWER
    assert second.locator("[data-testid=reasoning]").count() == 0


def test_a_preset_is_created_listed_refused_and_deleted_on_the_models_page(page: Any, keyed: Server) -> None:
    if requests.get(keyed.url + "/api/presets", headers=ADMIN, timeout=10).status_code == 404:
        pytest.skip("this server has no /api/presets")
    page.on("dialog", lambda dialog: dialog.accept())  # the delete confirmation
    with_key(page, keyed.url + "/models")
    page.wait_for_selector("[data-testid=presets-panel]")

    page.click("[data-testid=preset-new]")
    page.fill("[data-testid=preset-name]", "dash-coder")
    choose(page, "preset-model", "tiny-dash")
    page.fill("[data-testid=preset-temperature]", "0.3")
    page.fill("[data-testid=preset-chat-template-kwargs]", "{enable_thinking: false}")
    page.click("[data-testid=preset-save]")
    page.wait_for_selector("text=not valid JSON")  # checked here, before the server is asked
    page.fill("[data-testid=preset-chat-template-kwargs]", '{"enable_thinking": false}')
    page.click("[data-testid=preset-save]")
    page.wait_for_selector("[data-testid=preset-row-dash-coder]")
    stored = requests.get(keyed.url + "/api/presets/dash-coder", headers=ADMIN, timeout=10).json()
    assert (stored["model"], stored["parameters"]["temperature"]) == ("tiny-dash", 0.3)
    assert stored["chat_template_kwargs"] == {"enable_thinking": False}

    # A name that is a model's: the server refuses (409) and the form shows its message.
    page.click("[data-testid=preset-new]")
    page.fill("[data-testid=preset-name]", "tiny-dash")
    choose(page, "preset-model", "tiny-dash")
    page.click("[data-testid=preset-save]")
    refused = requests.post(
        keyed.url + "/api/presets", json={"name": "tiny-dash", "model": "tiny-dash"}, headers=ADMIN, timeout=10
    )
    assert refused.status_code == 409
    page.wait_for_selector("[data-testid=preset-error]")
    assert page.text_content("[data-testid=preset-error]") == refused.json()["error"]["message"]
    page.keyboard.press("Escape")

    page.locator("[data-testid=preset-row-dash-coder] [data-testid=preset-delete]").click()
    page.wait_for_selector("[data-testid=preset-row-dash-coder]", state="detached")
    assert requests.get(keyed.url + "/api/presets/dash-coder", headers=ADMIN, timeout=10).status_code == 404


def test_playground_chats_through_a_preset(page: Any, keyed: Server, thinker: str) -> None:
    from tests.support.thinking_model import ANSWER

    preset = {"name": "quiet", "model": thinker, "chat_template_kwargs": {"enable_thinking": False}}
    preset |= {"parameters": {"max_tokens": 40}, "system": "Answer at once."}
    created = requests.post(keyed.url + "/api/presets", json=preset, headers=ADMIN, timeout=10)
    if created.status_code == 404:
        pytest.skip("this server has no /api/presets")
    assert created.status_code == 201, created.text
    try:
        with_key(page, keyed.url + "/playground")
        choose(page, "chat-preset", "quiet")
        assert page.input_value("[data-testid=chat-model]") == "quiet"  # the preset's name is the request's model
        assert page.get_attribute("[data-testid=max-tokens]", "placeholder") == "preset: 40"
        assert page.get_attribute("[data-testid=system-prompt]", "placeholder") == "preset: Answer at once."
        assert page.input_value("[data-testid=system-prompt]") == ""  # the preset's system prompt applies
        assert "the preset's: off" in page.inner_text("[data-testid=page-playground]")
        # No context length of its own: its base model's effective one (what /v1/models says of either).
        cards = requests.get(keyed.url + "/v1/models", headers=ADMIN, timeout=10).json()["data"]
        context = {c["id"]: c["context_length"] for c in cards}
        expected = context.get("quiet") or context[thinker]
        page.wait_for_selector(f"[data-testid=chat-context][data-context='{expected}']")
        page.fill("[data-testid=chat-input]", "What colour is the sky?")
        page.click("[data-testid=chat-send]")
        page.wait_for_selector("[data-testid=chat-stats]", timeout=90_000)
        reply = page.locator("[data-testid=message-assistant]").last
        assert reply.locator("[data-testid=message-content]").inner_text() == ANSWER
        assert reply.locator("[data-testid=reasoning]").count() == 0  # the preset's enable_thinking: false
    finally:
        requests.delete(keyed.url + "/api/presets/quiet", headers=ADMIN, timeout=10)
