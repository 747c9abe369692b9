"""The streaming fast path (issue 28, host overhead): a text chunk rendered from its choice's template is
byte for byte the chunk the schema renders, and the events that reached a reader together go out as one
write while an event that comes alone goes out at once."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from gerdsen_ai_server.engine import protocol
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
)
from gerdsen_ai_server.serving.completions import CompletionStarted, completion_chunks
from gerdsen_ai_server.serving.envelope import chunk_payload
from gerdsen_ai_server.serving.sse import TextChunk, sse

META = {"id": "cmpl-1", "created": 1, "model": "m", "system_fingerprint": "fp"}
TEXTS = ["", " word", 'a "quoted" \\ back\\slash', "line\nbreak\ttab", "é ü 中文 🙂", "\u2028\x00\x1f", "data: [DONE]"]


def completion_chunk(index: int, text: str, finish: str | None, include_usage: bool) -> str:
    choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=None)
    return sse(chunk_payload(Completion(**META, choices=[choice]), include_usage))


def chat_chunk(index: int, text: str, include_usage: bool) -> str:
    choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text), finish_reason=None, logprobs=None)
    return sse(chunk_payload(ChatCompletionChunk(**META, choices=[choice]), include_usage))


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("index", [0, 3])
def test_text_chunk_is_the_schemas_rendering(index: int, include_usage: bool) -> None:
    completion = TextChunk(lambda text: completion_chunk(index, text, None, include_usage))
    chat = TextChunk(lambda text: chat_chunk(index, text, include_usage))
    for text in TEXTS:
        assert completion(text) == completion_chunk(index, text, None, include_usage)
        assert chat(text) == chat_chunk(index, text, include_usage)


def test_text_chunk_refuses_a_rendering_without_its_text() -> None:
    with pytest.raises(ValueError):
        TextChunk(lambda text: sse({"text": "fixed"}))


def started(stream: TokenStream, include_usage: bool = True) -> CompletionStarted:
    body = CompletionRequest(model="m", prompt="p", stream=True, stream_options={"include_usage": include_usage})
    return CompletionStarted(body, None, dict(META), 2, [stream])  # type: ignore[arg-type]  # no model is read


def events(n: int) -> list[TokenEvent]:
    return [
        TokenEvent(
            text=TEXTS[i % len(TEXTS)] or "x",
            token_ids=[i],
            prompt_tokens=2,
            completion_tokens=i + 1,
            finish_reason="length" if i == n - 1 else None,
        )
        for i in range(n)
    ]


def expected(evs: list[TokenEvent]) -> list[str]:
    out = [completion_chunk(0, e.text, e.finish_reason, True) for e in evs]
    usage: dict[str, Any] = {"prompt_tokens": 2, "completion_tokens": len(evs), "total_tokens": 2 + len(evs)}
    return [*out, sse(Completion(**META, choices=[], usage=usage).model_dump())]


def test_events_waiting_together_go_out_as_one_write() -> None:
    stream = TokenStream(GenerationRequest("m", [1, 2], 8), lambda: True)
    evs = events(6)
    for event in evs:
        stream.put(event)
    assert stream.ready
    writes = list(completion_chunks(started(stream)))
    assert writes == ["".join(expected(evs))]  # one write, the same bytes as one chunk an event
    assert not stream.ready


def test_an_event_that_comes_alone_goes_out_at_once() -> None:
    """A reader that keeps up writes each event as it comes: nothing is held back for the next."""
    stream = TokenStream(GenerationRequest("m", [1, 2], 8), lambda: True)
    evs = events(4)
    writes: list[str] = []
    seen = threading.Event()

    def read() -> None:
        for write in completion_chunks(started(stream)):
            writes.append(write)
            seen.set()

    reader = threading.Thread(target=read)
    reader.start()
    for i, event in enumerate(evs):
        seen.clear()
        stream.put(event)
        assert seen.wait(5), f"event {i} was held back"
        time.sleep(0.01)
    reader.join(5)
    chunks = expected(evs)
    assert writes == [*chunks[:-2], "".join(chunks[-2:])]  # the last event's chunk goes with the usage


def test_what_was_held_goes_out_before_the_request_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A deadline or an operator's cancel (the reader's ``watch`` raises) between two events that came
    together: the first's chunk, held for one write with the second, still goes out before the error."""
    monkeypatch.setattr(protocol, "WATCH_INTERVAL_S", 0.0)  # the watch runs before every event
    stream = TokenStream(GenerationRequest("m", [1, 2], 8), lambda: True)
    calls = []

    def watch() -> None:
        calls.append(1)
        if len(calls) == 2:
            raise APIError(504, "past the deadline", code="request_timeout")

    stream.watch = watch
    evs = events(3)
    for event in evs:
        stream.put(event)
    writes: list[str] = []
    with pytest.raises(APIError):
        for write in completion_chunks(started(stream)):
            writes.append(write)
    assert writes == [completion_chunk(0, evs[0].text, None, True)] and stream.cancelled
