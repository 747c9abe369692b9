"""Stored responses (serving/response_store.py) through the openai SDK on a real server: ``store: true``,
``previous_response_id``, retrieve and delete, per-key ownership, and eviction under a byte bound.

The server runs the default model on llama.cpp (the Responses layer is the backends' common part,
and llama.cpp decodes this model fastest on a CPU), with two inference keys and an admin key, and a
store of ``BOUND`` bytes: room for a few short responses, so eviction is seen without filling 64 MiB.
The store's own rules (LRU order, the byte count, an entry larger than the bound) are checked in-process.
"""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from gerdsen_ai_server.serving.response_store import ITEMS, Owner, ResponseStore, Stored, output_items
from tests.support import DEFAULT_MODEL
from tests.support.server import Server, start_server, stop_server

ALICE = "sk-alice-0123456789abcdef0123"
BOB = "sk-bob-0123456789abcdef012345"
ADMIN = "sk-admin-0123456789abcdef0123"
BOUND = 8000
FIRST = "My name is Ada and I live in Paris. Reply with one short sentence."


def entry(size: int, owner: str | None = None) -> Stored:
    return Stored({"id": "x"}, [], owner, size)


def test_store_drops_least_recently_used_within_its_bound() -> None:
    store = ResponseStore(100)
    anyone = Owner()
    assert store.put("a", entry(40)) and store.put("b", entry(40))
    assert store.get("a", anyone) is not None  # read: now the most recently used
    assert store.put("c", entry(40))  # 120 > 100: b goes, not a
    assert store.get("b", anyone) is None and store.get("a", anyone) is not None
    assert store.bytes == 80 and len(store) == 2
    assert not store.put("huge", entry(101))  # alone larger than the bound: kept nowhere, nothing dropped
    assert len(store) == 2 and store.bytes == 80
    assert store.put("a", entry(10)) and store.bytes == 50  # replaced, counted once
    assert store.delete("a", anyone) and not store.delete("a", anyone) and store.bytes == 40


def test_store_entries_belong_to_their_key() -> None:
    store = ResponseStore(1000)
    store.put("r", entry(10, owner="alice"))
    assert store.get("r", Owner("bob")) is None and not store.delete("r", Owner("bob"))
    assert store.get("r", Owner(None)) is None  # no key at all: not the owner either
    assert store.get("r", Owner("alice")) is not None
    assert store.get("r", Owner("bob", admin=True)) is not None
    assert store.delete("r", Owner("bob", admin=True))


def test_output_items_carry_into_the_next_input() -> None:
    """A response's message and function calls come back as input items the request schema takes;
    its reasoning does not (the prompt leaves earlier thinking out)."""
    output = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "Let me look.", "annotations": [], "logprobs": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
            "status": "completed",
        },
    ]
    items = output_items(output)
    assert items == [
        {"type": "message", "role": "assistant", "content": "Let me look."},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    ]
    assert len(ITEMS.validate_python(items)) == 2


# ---- through the SDK --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    server = start_server(
        tmp_path_factory.mktemp("response-store"),
        IMPETUS_BACKEND="llamacpp",
        IMPETUS_MODELS_DIR=str(tmp_path_factory.mktemp("response-store-models")),
        IMPETUS_LLAMACPP_THREADS="1",
        IMPETUS_API_KEYS=f"{ALICE},{BOB}",
        IMPETUS_ADMIN_KEYS=ADMIN,
        IMPETUS_RESPONSES_STORE_BYTES=str(BOUND),
    )
    yield server
    stop_server(server, wait=False)


def sdk(server: Server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)


@pytest.mark.server
def test_previous_response_id_continues_the_conversation(srv: Server) -> None:
    alice = sdk(srv, ALICE)
    first = alice.responses.create(model=DEFAULT_MODEL, input=FIRST, store=True, temperature=0, max_output_tokens=16)
    assert first.store is True and first.previous_response_id is None
    second = alice.responses.create(
        model=DEFAULT_MODEL,
        input="What is my name?",
        previous_response_id=first.id,
        store=True,
        temperature=0,
        max_output_tokens=16,
    )
    assert second.previous_response_id == first.id and second.store is True
    # The model saw the first turn: its prompt holds the first input and answer, exactly as if the
    # client had sent the whole conversation itself.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    whole = alice.responses.create(
        model=DEFAULT_MODEL,
        input=[
            {"role": "user", "content": FIRST},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "What is my name?"},
        ],
        temperature=0,
        max_output_tokens=16,
    )
    assert whole.store is False
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text
    # retrieve: the response as answered
    again = alice.responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text and again.store is True
    with pytest.raises(openai.NotFoundError) as info:  # not stored: nothing to retrieve or continue
        alice.responses.retrieve(whole.id)
    assert info.value.body["code"] == "response_not_found"
    # delete: OpenAI's answer, then 404 for retrieve, delete and previous_response_id
    assert alice.delete(f"/responses/{first.id}", cast_to=object) == {
        "id": first.id,
        "object": "response.deleted",
        "deleted": True,
    }
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError) as info:
        alice.responses.create(model=DEFAULT_MODEL, input="hi", previous_response_id=first.id, max_output_tokens=2)
    assert info.value.body["param"] == "previous_response_id"
    # the second turn holds the whole conversation: it continues though the first is gone
    third = alice.responses.create(
        model=DEFAULT_MODEL, input="Thanks.", previous_response_id=second.id, temperature=0, max_output_tokens=2
    )
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert third.store is False  # not asked: not stored
    alice.responses.delete(second.id)


@pytest.mark.server
def test_a_stored_response_is_its_keys(srv: Server) -> None:
    alice, bob, admin = sdk(srv, ALICE), sdk(srv, BOB), sdk(srv, ADMIN)
    mine = alice.responses.create(model=DEFAULT_MODEL, input="Hello", store=True, max_output_tokens=4)
    for attempt in (
        lambda: bob.responses.retrieve(mine.id),
        lambda: bob.responses.delete(mine.id),
        lambda: bob.responses.create(
            model=DEFAULT_MODEL, input="hi", previous_response_id=mine.id, max_output_tokens=2
        ),
    ):
        with pytest.raises(openai.NotFoundError):  # the same 404 as an unknown id: nothing leaks
            attempt()
    assert admin.responses.retrieve(mine.id).id == mine.id
    with pytest.raises(openai.AuthenticationError):
        sdk(srv, "sk-nobody-0123456789abcdef01").responses.retrieve(mine.id)
    with pytest.raises(openai.BadRequestError) as info:  # a stored response is returned whole, never streamed
        alice.get(f"/responses/{mine.id}?stream=true", cast_to=object)
    assert info.value.body["param"] == "stream"
    admin.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(mine.id)


@pytest.mark.server
def test_a_streamed_response_is_stored_too(srv: Server) -> None:
    alice = sdk(srv, ALICE)
    events = list(
        alice.responses.create(model=DEFAULT_MODEL, input="Say hi.", store=True, stream=True, max_output_tokens=6)
    )
    assert events[0].response.store is True
    final = events[-1].response
    assert final.store is True and alice.responses.retrieve(final.id).output_text == final.output_text
    alice.responses.delete(final.id)


@pytest.mark.server
def test_the_least_recently_used_go_first_within_the_bound(srv: Server) -> None:
    alice = sdk(srv, ALICE)
    pad = "-" * 1500  # 1.5 KB of the stored JSON in ~25 tokens: a few short requests fill the bound
    ids = [
        alice.responses.create(model=DEFAULT_MODEL, input=f"Count to {n}. {pad}", store=True, max_output_tokens=2).id
        for n in range(6)
    ]
    kept = []
    for rid in ids:
        try:
            alice.responses.retrieve(rid)
            kept.append(rid)
        except openai.NotFoundError:
            pass
    assert ids[0] not in kept and ids[-1] in kept and 0 < len(kept) < len(ids)
    assert kept == ids[-len(kept) :]  # the newest survive, oldest first out
    # one larger than the whole bound is answered, not stored, and says so
    big = alice.responses.create(model=DEFAULT_MODEL, input="-" * BOUND, store=True, max_output_tokens=1)
    assert big.store is False
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(big.id)
    assert alice.responses.retrieve(ids[-1]).id == ids[-1]  # and dropped nothing to make room


@pytest.mark.server
def test_on_mlx_without_keys_too(client) -> None:  # type: ignore[no-untyped-def]
    """The session server: the default model on MLX, no keys (any caller reads what was stored)."""
    first = client.responses.create(model=DEFAULT_MODEL, input=FIRST, store=True, temperature=0, max_output_tokens=8)
    second = client.responses.create(
        model=DEFAULT_MODEL, input="What is my name?", previous_response_id=first.id, temperature=0, max_output_tokens=8
    )
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
