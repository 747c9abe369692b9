"""Presets (issue 26, item 4) on a real Gunicorn server with API keys: the `openai` SDK names a preset
and gets its defaults (max_tokens, stop, temperature, system) unless it sends its own; /v1/models lists
the aliases; a preset with load options is its own resident; /api/presets over HTTP with an admin key
(an inference key may read, not write); names and specs that could leave the models dir are refused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from gerdsen_ai_server.store.paths import model_not_found
from tests.support.models import default_model_folder
from tests.support.server import Server, start_server, stop_server
from tests.support.tiny_models import build_tiny_llama

pytestmark = pytest.mark.server

INFER = "sk-impetus-infer-0123456789"
ADMIN = "sk-impetus-admin-0123456789"
HI = [{"role": "user", "content": "hi"}]
SYSTEM = "You are a careful assistant who answers in one short sentence."


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("presets")
    build_tiny_llama(root / "models" / "tiny", default_model_folder(), seed=1)
    build_tiny_llama(root / "outside" / "secret", default_model_folder(), seed=2)
    return root


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, tree: Path) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("presets-server"),
        IMPETUS_MODELS_DIR=str(tree / "models"),
        IMPETUS_DEFAULT_MODEL=str(tree / "models" / "tiny"),
        IMPETUS_BACKEND="mlx",
        IMPETUS_API_KEYS=INFER,
        IMPETUS_ADMIN_KEYS=ADMIN,
    )
    yield server
    stop_server(server, wait=False)


@pytest.fixture(scope="module")
def oai(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url, api_key=INFER, max_retries=0, timeout=120)


def api(srv: Server, method: str, path: str, body: Any = None, key: str = ADMIN) -> requests.Response:
    return requests.request(
        method, f"{srv.url}/api/presets{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    )


def put(srv: Server, name: str, **fields: Any) -> dict[str, Any]:
    r = api(srv, "PUT", f"/{name}", {"name": name, "model": "tiny", **fields})
    assert r.status_code == 200, r.text
    return dict(r.json())


def greedy(oai: openai.OpenAI, model: str, **kw: Any) -> Any:
    return oai.chat.completions.create(model=model, messages=HI, **kw)  # type: ignore[arg-type]


def test_crud_with_an_admin_key_and_reads_with_an_inference_key(srv: Server) -> None:
    body: dict[str, Any] = {"name": "crud", "model": "tiny", "parameters": {"temperature": 0.3}, "system": "x"}
    made = api(srv, "POST", "", body)
    assert made.status_code == 201 and made.json()["parameters"]["temperature"] == 0.3, made.text
    assert api(srv, "POST", "", body).json()["error"]["code"] == "preset_exists"
    assert api(srv, "GET", "/crud", key=INFER).json()["system"] == "x"
    assert "crud" in [p["name"] for p in api(srv, "GET", "", key=INFER).json()["presets"]]
    replaced = api(srv, "PUT", "/crud", {**body, "system": "y"})
    assert replaced.status_code == 200 and api(srv, "GET", "/crud").json()["system"] == "y"
    for method, path, sent in (
        ("POST", "", {**body, "name": "other"}),
        ("PUT", "/crud", body),
        ("DELETE", "/crud", None),
    ):
        refused = api(srv, method, path, sent, key=INFER)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "insufficient_scope", method
    assert api(srv, "GET", "/other").status_code == 404  # the refused POST wrote nothing
    deleted = api(srv, "DELETE", "/crud")
    assert deleted.status_code == 200 and deleted.json() == {"name": "crud", "deleted": True}
    gone = api(srv, "GET", "/crud")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "preset_not_found"
    assert api(srv, "DELETE", "/crud").status_code == 404
    assert requests.post(f"{srv.url}/api/presets", json=body, timeout=30).status_code == 401


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "x" * 65, "", "a\\b"])
def test_names_that_could_make_a_path_are_400(srv: Server, tree: Path, name: str) -> None:
    r = api(srv, "POST", "", {"name": name, "model": "tiny"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "name", r.text
    folder = tree / "models" / "presets"
    assert not folder.exists() or all(not p.name.startswith(("x", ".h", "a")) for p in folder.iterdir())
    assert not (tree / "models" / "x.json").exists() and not (tree / "x.json").exists()
    if name and "." not in name and "\\" not in name:  # one the URL can carry as is
        assert api(srv, "PUT", f"/{name}", {"name": name, "model": "tiny"}).status_code == 400
        assert api(srv, "DELETE", f"/{name}").status_code == 400


def test_bad_presets_are_400_and_conflicts_409(srv: Server) -> None:
    def code(body: dict[str, Any], method: str = "POST", path: str = "") -> tuple[int, str | None]:
        r = api(srv, method, path, body)
        return r.status_code, r.json().get("error", {}).get("param")

    assert code({"name": "p", "model": "/etc/passwd"}) == (400, "model")
    assert code({"name": "p", "model": "../outside/secret"}) == (400, "model")
    assert code({"name": "p", "model": "tiny", "adapter": "~/a"}) == (400, "adapter")
    assert code({"name": "p", "model": "tiny", "temprature": 0})[0] == 400
    assert code({"name": "p", "model": "tiny", "parameters": {"temperature": 9}})[0] == 400
    assert code({"name": "p", "model": "tiny", "chat_template": "x" * (256 * 1024 + 1)})[0] == 400
    assert code({"name": "q", "model": "tiny"}, "PUT", "/p") == (400, "name")
    conflict = api(srv, "POST", "", {"name": "tiny", "model": "tiny"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "preset_conflict"
    assert api(srv, "POST", "", {"name": "smollm2-135m-instruct", "model": "tiny"}).status_code == 409


def test_the_sdk_gets_the_preset_s_defaults_unless_it_sends_its_own(srv: Server, oai: openai.OpenAI) -> None:
    put(srv, "terse", parameters={"temperature": 0, "max_tokens": 3}, system=SYSTEM)
    base = greedy(oai, "tiny", temperature=0, max_tokens=3)
    as_preset = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "system", "content": SYSTEM}, *HI],  # type: ignore[list-item]
        temperature=0,
        max_tokens=3,
    )
    got = greedy(oai, "terse")
    assert got.usage is not None and base.usage is not None and as_preset.usage is not None
    assert got.usage.completion_tokens == 3 and got.choices[0].finish_reason == "length"
    # the preset's system message, in place of the template's own default one
    assert got.usage.prompt_tokens == as_preset.usage.prompt_tokens != base.usage.prompt_tokens
    assert got.choices[0].message.content == as_preset.choices[0].message.content
    with_system = [{"role": "system", "content": "Hi."}, *HI]
    own = oai.chat.completions.create(model="terse", messages=with_system, max_tokens=5)  # type: ignore[arg-type]
    mine = oai.chat.completions.create(model="tiny", messages=with_system, max_tokens=5, temperature=0)  # type: ignore[arg-type]
    assert own.usage is not None and mine.usage is not None
    assert own.usage.completion_tokens == 5 and own.usage.prompt_tokens == mine.usage.prompt_tokens
    assert own.choices[0].message.content == mine.choices[0].message.content  # temperature 0 from the preset
    # An explicit temperature beats the preset's 0: sampled at 2.0 from a random model, not the greedy text.
    greedy_text = greedy(oai, "terse", max_tokens=8).choices[0].message.content
    sampled = {greedy(oai, "terse", max_tokens=8, temperature=2.0, seed=s).choices[0].message.content for s in (1, 2)}
    assert greedy_text not in sampled
    completion = oai.completions.create(model="terse", prompt="Once upon a time")
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_a_preset_s_stop_applies_unless_the_request_sends_its_own(srv: Server, oai: openai.OpenAI) -> None:
    text = greedy(oai, "tiny", temperature=0, max_tokens=6).choices[0].message.content or ""
    assert text.strip(), "the tiny model answered nothing to stop on"
    stop = text.strip()[0]
    put(srv, "stopper", parameters={"temperature": 0, "max_tokens": 6, "stop": [stop]})
    stopped = greedy(oai, "stopper")
    assert stopped.choices[0].finish_reason == "stop" and stop not in (stopped.choices[0].message.content or "")
    own = greedy(oai, "stopper", stop=["\x01never"])
    assert own.choices[0].message.content == text and own.choices[0].finish_reason == "length"


def test_v1_models_lists_presets_as_aliases(srv: Server, oai: openai.OpenAI) -> None:
    put(srv, "listed", description="for the listing")
    cards = {m.id: m.model_dump() for m in oai.models.list().data}
    assert cards["listed"]["preset"] is True and cards["listed"]["base_model"] == "tiny"
    assert "preset" not in cards["tiny"]
    one = oai.models.retrieve("listed").model_dump()
    assert one["id"] == "listed" and one["base_model"] == "tiny"


def test_a_preset_with_load_options_is_its_own_resident(srv: Server, oai: openai.OpenAI) -> None:
    put(srv, "short", context_length=256, parameters={"max_tokens": 2, "temperature": 0}, keep_alive=-1)
    answer = greedy(oai, "short")
    assert answer.model == "short" and answer.usage is not None and answer.usage.completion_tokens == 2
    models = requests.get(f"{srv.url}/api/models", headers={"Authorization": f"Bearer {INFER}"}, timeout=30).json()
    residents = {m["id"]: m for m in models["data"] if m["state"] == "resident"}
    assert residents["short"]["preset"] == "short" and residents["short"]["context_length"] == 256
    assert residents["tiny"]["preset"] is None and residents["tiny"]["context_length"] == 512
    assert oai.models.retrieve("short").model_dump()["context_length"] == 256
    admin = {"Authorization": f"Bearer {ADMIN}"}
    unloaded = requests.post(f"{srv.url}/api/models/unload", json={"model": "short"}, headers=admin, timeout=60)
    assert unloaded.status_code == 200, unloaded.text
    loaded = requests.post(f"{srv.url}/api/models/load", json={"model": "short"}, headers=admin, timeout=120)
    assert loaded.status_code == 200 and loaded.json()["id"] == "short", loaded.text
    assert (loaded.json()["preset"], loaded.json()["context_length"], loaded.json()["keep_alive"]) == (
        "short",
        256,
        None,
    )
    too_long = "word " * 300
    with pytest.raises(openai.BadRequestError, match="context"):
        oai.chat.completions.create(model="short", messages=[{"role": "user", "content": too_long}])


def test_a_hand_written_preset_loads_untrusted(srv: Server, tree: Path, oai: openai.OpenAI) -> None:
    """A file in presets/ naming a model outside the models dir gets the request's one 404, and nothing loads."""
    folder = tree / "models" / "presets"
    folder.mkdir(exist_ok=True)
    secret = str(tree / "outside" / "secret")
    (folder / "evil.json").write_text(json.dumps({"model": secret, "context_length": 128}))
    with pytest.raises(openai.NotFoundError) as caught:
        greedy(oai, "evil")
    assert (
        str(model_not_found("evil")) in str(caught.value)
        and secret not in str(caught.value)
        and "evil" not in {m.id for m in oai.models.list().data if not m.model_dump().get("preset")}
        and oai.models.retrieve("evil").model_dump()["base_model"] == "secret"  # listed; no host path shown
    )
    residents = requests.get(f"{srv.url}/api/models", headers={"Authorization": f"Bearer {INFER}"}, timeout=30)
    assert not [m for m in residents.json()["data"] if m["state"] == "resident" and "secret" in str(m["path"])]
    (folder / "evil.json").unlink()


def test_a_preset_s_chat_template_replaces_the_model_s(srv: Server, oai: openai.OpenAI) -> None:
    bad = api(srv, "POST", "", {"name": "broken", "model": "tiny", "chat_template": "{% if %}"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template", bad.text
    put(
        srv, "bare", chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}", parameters={"max_tokens": 1}
    )
    templated = greedy(oai, "tiny", max_tokens=1)
    bare = greedy(oai, "bare")
    assert bare.model == "bare" and bare.usage is not None and templated.usage is not None
    assert bare.usage.prompt_tokens == 1 < templated.usage.prompt_tokens  # "hi", and no role markers


def test_anthropic_messages_and_count_tokens_see_the_preset_s_system(srv: Server) -> None:
    import anthropic

    claude = anthropic.Anthropic(base_url=srv.url, api_key=INFER, max_retries=0, timeout=120)
    put(srv, "claude-terse", parameters={"temperature": 0}, system=SYSTEM)
    counted = claude.messages.count_tokens(model="claude-terse", messages=HI)  # type: ignore[arg-type]
    explicit = claude.messages.count_tokens(model="tiny", system=SYSTEM, messages=HI)  # type: ignore[arg-type]
    bare = claude.messages.count_tokens(model="tiny", messages=HI)  # type: ignore[arg-type]
    assert counted.input_tokens == explicit.input_tokens != bare.input_tokens
    message = claude.messages.create(model="claude-terse", max_tokens=2, messages=HI)  # type: ignore[arg-type]
    assert message.usage.input_tokens == counted.input_tokens and message.usage.output_tokens == 2
