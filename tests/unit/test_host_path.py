"""Host-side costs around the engine (issue 28, item 2): a streamed answer's end goes out as one write
(its last chunks, the usage and ``[DONE]``), and the server's OpenBLAS workers stop spinning soon after
a call (``OPENBLAS_THREAD_TIMEOUT``) unless the operator set it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gerdsen_ai_server.engine.errors import EngineGone
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.runtime import blas
from gerdsen_ai_server.schemas.openai import CompletionRequest
from gerdsen_ai_server.serving.completions import CompletionStarted, completion_chunks
from gerdsen_ai_server.serving.sse import openai_events, sse

META = {"id": "cmpl-1", "created": 1, "model": "m", "system_fingerprint": "fp"}
DONE = sse("[DONE]")


def stream_of(*events: TokenEvent) -> TokenStream:
    stream = TokenStream(GenerationRequest("m", [1, 2], 8), lambda: True)
    for event in events:
        stream.put(event)
    return stream


def started(stream: TokenStream) -> CompletionStarted:
    body = CompletionRequest(model="m", prompt="p", stream=True, stream_options={"include_usage": True})
    return CompletionStarted(body, None, dict(META), 2, [stream])  # type: ignore[arg-type]  # no model is read


def test_the_end_of_an_answer_goes_out_in_one_write() -> None:
    stream = stream_of(TokenEvent(text="a", completion_tokens=1, finish_reason="length"))
    writes = list(openai_events(completion_chunks(started(stream)), [stream]))
    assert len(writes) == 1
    assert writes[0].count("data: ") == 3 and writes[0].endswith(DONE)  # the chunk, the usage, [DONE]
    assert '"finish_reason": "length"' in writes[0] and '"total_tokens": 3' in writes[0]
    assert stream.cancelled  # the streams are still let go at the end


def test_a_failed_answer_still_ends_with_its_error_then_done() -> None:
    stream = stream_of(TokenEvent(text="a", completion_tokens=1), TokenEvent(error="boom"))
    writes = list(openai_events(completion_chunks(started(stream)), [stream]))
    assert writes[-1] == DONE and '"generation_failed"' in writes[-2] and writes.count(DONE) == 1


def test_the_engine_gone_is_a_503_event_then_done() -> None:
    def chunks() -> Iterator[str]:
        yield sse({"x": 1})
        raise EngineGone("the inference engine stopped")

    writes = list(openai_events(chunks(), []))
    assert writes[0] == sse({"x": 1}) and '"engine_unavailable"' in writes[1] and writes[2:] == [DONE]


def test_openblas_workers_sleep_soon_unless_the_operator_says(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(blas, "find_openblas", lambda: lib)
    assert blas.preload_env({})["OPENBLAS_THREAD_TIMEOUT"] == blas.OPENBLAS_IDLE_SPIN
    assert blas.preload_env({"OPENBLAS_THREAD_TIMEOUT": "28"})["OPENBLAS_THREAD_TIMEOUT"] == "28"
    already = {"LD_PRELOAD": "/usr/lib/x/openblas-pthread/libopenblas.so.0"}
    assert blas.preload_env(already)["OPENBLAS_THREAD_TIMEOUT"] == blas.OPENBLAS_IDLE_SPIN
    assert "OPENBLAS_THREAD_TIMEOUT" not in blas.preload_env({"IMPETUS_NO_OPENBLAS": "1"})  # no OpenBLAS, no setting
