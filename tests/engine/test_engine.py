"""The inference engine in-process, on the real embedded model and real MLX: batching,
batch invariance, the prompt-prefix cache, backpressure, cancellation and fault isolation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gerdsen_ai_server.engine.admission import ADMIT_QUIET_S
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.errors import ContextLengthExceeded, EngineOverloaded
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.answers import chat
from tests.support.tiny_models import build_tiny_llama

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "Tell me about the sea.",
    "What is 2 + 2?",
    "Name three colours.",
    "Write a haiku about rain.",
    "Who wrote Hamlet?",
    "Describe a cat.",
    "What is the capital of Spain?",
    "Give me a recipe for tea.",
]


def request(
    model: LoadedModel, tokens: list[int], max_tokens: int = 24, sampling: SamplingParams = GREEDY, **kw
) -> GenerationRequest:  # type: ignore[no-untyped-def]
    return GenerationRequest(model=model.model_id, prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling, **kw)


def tokens_of(stream) -> tuple[list[int], str]:  # type: ignore[no-untyped-def]
    ids: list[int] = []
    last = None
    for event in stream:
        ids += event.token_ids
        last = event
    assert last is not None and last.error is None, last
    return ids, last.finish_reason


def wait_idle(engine: InferenceEngine) -> None:
    deadline = time.monotonic() + 30
    while engine.inflight or engine.prompt_cache.pending:  # caches are stored after the answers
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling", [GREEDY, SamplingParams(temperature=0.9, top_p=0.95, seed=1234)], ids=["greedy", "seeded"]
)
def test_batch_invariance(engine: InferenceEngine, model: LoadedModel, sampling: SamplingParams) -> None:
    engine.prompt_cache_enabled = False
    try:
        alone = tokens_of(engine.submit(request(model, chat(model, PROMPTS[0]), sampling=sampling)))
        streams = [engine.submit(request(model, chat(model, p), sampling=sampling)) for p in PROMPTS]
        together = [tokens_of(s) for s in streams]
    finally:
        engine.prompt_cache_enabled = True
    assert together[0] == alone
    assert len({tuple(t[0]) for t in together}) > 1  # the others really were different sequences


@pytest.mark.slow
def test_prefix_cache_reuses_history_and_keeps_output(engine: InferenceEngine, model: LoadedModel) -> None:
    history = [{"role": "user", "content": "Tell me about Paris."}]
    first = chat(model, "Tell me about Paris.")
    answer_ids, _ = tokens_of(engine.submit(request(model, first, max_tokens=40)))
    answer = model.tokenizer.decode(answer_ids, skip_special_tokens=True)
    history += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And about Rome?"}]
    second = list(model.tokenizer.apply_chat_template(history, add_generation_prompt=True))

    hits = engine.stats().prompt_cache_hits_total
    warm = tokens_of(engine.submit(request(model, second)))
    assert engine.stats().prompt_cache_hits_total == hits + 1
    assert engine.stats().prompt_cache_bytes > 0

    engine.prompt_cache_enabled = False
    try:
        cold = tokens_of(engine.submit(request(model, second)))
    finally:
        engine.prompt_cache_enabled = True
    assert warm == cold


def test_exact_repeat_hits_the_cache(engine: InferenceEngine, model: LoadedModel) -> None:
    prompt = chat(model, "Say hello.")
    first = tokens_of(engine.submit(request(model, prompt, max_tokens=8)))
    hits = engine.stats().prompt_cache_hits_total
    again = tokens_of(engine.submit(request(model, prompt, max_tokens=8)))
    assert again == first
    assert engine.stats().prompt_cache_hits_total == hits + 1


def test_an_unloaded_model_takes_its_prompt_caches_along(
    engine: InferenceEngine, model: LoadedModel, tmp_path: Path
) -> None:
    # Two different models known by one id (two folders named "swap"), loaded one after the other.
    first = build_tiny_llama(tmp_path / "a" / "swap", TEST_MODELS_DIR / DEFAULT_MODEL, seed=1)
    second = build_tiny_llama(tmp_path / "b" / "swap", TEST_MODELS_DIR / DEFAULT_MODEL, seed=2)
    prompt = chat(model, "Tell me a story about a lighthouse keeper.")

    def answer() -> list[tuple[int, float]]:
        # Log-probabilities too: a tiny random model's greedy tokens hardly depend on the context.
        stream = engine.submit(
            GenerationRequest(model="swap", prompt_tokens=prompt, max_tokens=16, sampling=GREEDY, logprobs=0)
        )
        return [(lp.token_id, lp.logprob) for event in stream for lp in event.logprobs]

    wait_idle(engine)
    before = engine.stats().prompt_cache_bytes
    engine.load_model(str(first), trusted=True).result(timeout=60)
    try:
        answer()
        wait_idle(engine)
        assert engine.stats().prompt_cache_bytes > before
        engine.unload_model("swap").result(timeout=30)
        assert engine.stats().prompt_cache_bytes == before  # its caches' memory is freed with it

        engine.load_model(str(second), trusted=True).result(timeout=60)
        hits = engine.stats().prompt_cache_hits_total
        warm = answer()
        assert engine.stats().prompt_cache_hits_total == hits  # not the first model's KV cache
        engine.prompt_cache_enabled = False
        try:
            cold = answer()
        finally:
            engine.prompt_cache_enabled = True
        assert warm == cold
    finally:
        wait_idle(engine)
        engine.unload_model("swap").result(timeout=30)


@pytest.mark.slow
def test_a_failing_request_fails_alone(engine: InferenceEngine, model: LoadedModel) -> None:
    calls = 0

    def explode(tokens, logits):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ValueError("bad token id 10**9")
        return logits

    healthy = [engine.submit(request(model, chat(model, p), max_tokens=12)) for p in PROMPTS[:3]]
    broken = engine.submit(request(model, chat(model, PROMPTS[3]), max_tokens=12, logits_processors=[explode]))
    events = list(broken)
    assert events[-1].error and "bad token id" in events[-1].error
    for stream in healthy:
        ids, finish = tokens_of(stream)
        assert ids and finish in ("stop", "length")
    # and the engine keeps serving
    assert tokens_of(engine.submit(request(model, chat(model, PROMPTS[4]), max_tokens=4)))[0]


@pytest.mark.timing
def test_full_queue_is_refused_at_once(engine: InferenceEngine, model: LoadedModel) -> None:
    wait_idle(engine)
    capacity = engine.max_batch + engine.max_queue
    streams = [engine.submit(request(model, chat(model, PROMPTS[i % 8]), max_tokens=200)) for i in range(capacity)]
    started = time.monotonic()
    with pytest.raises(EngineOverloaded):
        engine.submit(request(model, chat(model, PROMPTS[0])))
    assert time.monotonic() - started < 0.1
    for stream in streams:
        stream.cancel()
    wait_idle(engine)
    assert engine.stats().requests_in_flight == 0


def test_cancel_frees_the_slot_within_a_step(engine: InferenceEngine, model: LoadedModel) -> None:
    wait_idle(engine)
    stream = engine.submit(request(model, chat(model, PROMPTS[0]), max_tokens=500))
    seen = 0
    for event in stream:
        seen += len(event.token_ids)
        if seen == 3:
            break
    steps = engine.stats().steps_total
    stream.cancel()
    wait_idle(engine)
    assert engine.stats().steps_total - steps <= 3


def test_context_overflow_is_refused(engine: InferenceEngine, model: LoadedModel) -> None:
    with pytest.raises(ContextLengthExceeded):
        engine.submit(request(model, [1] * model.context_length, max_tokens=1))


@pytest.mark.slow
def test_prompt_cache_holds_only_what_it_counts(engine: InferenceEngine, model: LoadedModel) -> None:
    import mlx.core as mx

    def wave(n: int) -> None:  # a batch of 8; each finished sequence's KV is cut from the batch's buffers
        streams = [engine.submit(request(model, chat(model, f"{p} ({n})"), max_tokens=16)) for p in PROMPTS]
        for stream in streams:
            tokens_of(stream)
        wait_idle(engine)

    wave(0)  # warm-up: first-use allocations
    before_active, before_cached = mx.get_active_memory(), engine.stats().prompt_cache_bytes
    for n in range(1, 4):
        wave(n)
    grown = mx.get_active_memory() - before_active
    cached = engine.stats().prompt_cache_bytes - before_cached
    assert grown < cached + (32 << 20), (grown >> 20, cached >> 20)


def test_a_failed_batch_step_does_not_poison_later_requests(engine: InferenceEngine, model: LoadedModel) -> None:
    wait_idle(engine)
    # top_k beyond the vocabulary makes mlx-lm's compiled sampler raise inside the batched step
    # (the API refuses it with a 400; the engine must survive it anyway).
    bad = engine.submit(
        request(model, chat(model, PROMPTS[0]), max_tokens=4, sampling=SamplingParams(temperature=1.0, top_k=10**7))
    )
    assert list(bad)[-1].error
    for sampling in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5), GREEDY):
        ids, finish = tokens_of(engine.submit(request(model, chat(model, PROMPTS[1]), max_tokens=4, sampling=sampling)))
        assert ids and finish in ("stop", "length")


def test_requests_arriving_within_a_decode_step_share_one_prefill_pass(
    engine: InferenceEngine, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests arriving a few ms apart (more than the 2 ms burst gap, less than one decode step:
    like closed-loop clients coming back together) wait for each other within the admission window
    (IMPETUS_ADMIT_WINDOW_MS) and share one prefill pass; without the window the first one starts
    alone. mlx-lm's prefill is only counted here, never replaced; the answers are the same."""
    import importlib

    generate = importlib.import_module("mlx_lm.generate")  # the module, not mlx_lm's generate function
    passes: list[int] = []
    prompt = generate.PromptProcessingBatch.prompt

    def counting(self, prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
        if prompts:
            passes.append(len(prompts))
        return prompt(self, prompts, *args, **kwargs)

    monkeypatch.setattr(generate.PromptProcessingBatch, "prompt", counting)

    def burst(window: float, gap: float) -> tuple[list[int], list[tuple[list[int], str]]]:
        wait_idle(engine)
        engine.admit_window = window
        passes.clear()
        streams = []
        for text in PROMPTS[:6]:
            streams.append(engine.submit(request(model, chat(model, text), max_tokens=6)))
            time.sleep(gap)
        answers = [tokens_of(s) for s in streams]
        return list(passes), answers

    tokens_of(engine.submit(request(model, chat(model, PROMPTS[0]), max_tokens=8)))  # measures a decode step
    step = engine._admission.decode_seconds  # noqa: SLF001
    gap = 2 * ADMIT_QUIET_S  # beyond the burst gap: only the decode-step rule holds these
    if step < 5 * gap:
        pytest.skip(f"a decode step takes {step * 1000:.1f} ms here: too short to tell the rules apart")
    engine.prompt_cache_enabled = False
    try:
        together, with_window = burst(0.5, gap)
        apart, without = burst(0.0, 0.03)
    finally:
        engine.admit_window = 0.0
        engine.prompt_cache_enabled = True
    assert together == [6]
    assert len(apart) >= 2 and apart[0] < 6
    assert with_window == without  # greedy: the same answers either way


def test_answers_ending_together_are_delivered_before_their_caches_are_stored(
    engine: InferenceEngine, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequences that finish in the same step all get their last event before any of their KV
    caches goes into the prompt cache (each store waits on MLX for milliseconds): stored in between,
    the last client of a wave heard of its end ~30 ms after the first. The store is only observed here."""
    cache = engine.prompt_cache.lru
    prompts = [chat(model, f"{p} (together)") for p in PROMPTS]
    streams: list = []  # type: ignore[type-arg]
    answered_at_store: list[int] = []  # how many of the 8 had their last event when each cache was stored
    insert = cache.insert_cache

    def observed(model_id, tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
        if any(list(tokens[: len(p)]) == p for p in prompts):  # not an earlier test's store
            answered_at_store.append(sum(s.finished_at is not None for s in streams))
        return insert(model_id, tokens, *args, **kwargs)

    monkeypatch.setattr(cache, "insert_cache", observed)
    wait_idle(engine)
    engine.admit_window = 0.5  # the 8 requests start together, so most of them end in the same step
    try:
        streams += [engine.submit(request(model, p, max_tokens=4)) for p in prompts]
        finishes = [tokens_of(s)[1] for s in streams]
        wait_idle(engine)
    finally:
        engine.admit_window = 0.0
    assert finishes.count("length") >= 4, finishes
    deadline = time.monotonic() + 10
    while len(answered_at_store) < len(PROMPTS) and time.monotonic() < deadline:  # stored after answering
        time.sleep(0.01)
    assert len(answered_at_store) == len(PROMPTS)
    # Stored one by one between the answers, only the last store would find all 8 answered.
    assert answered_at_store.count(len(PROMPTS)) >= finishes.count("length"), answered_at_store


def test_no_forward_pass_is_started_for_a_token_nobody_reads(
    engine: InferenceEngine, model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlx-lm starts each step's forward pass on the tokens it returns, so that the next tokens compute
    while these go out. At the step where every sequence of the batch reaches max_tokens, that pass
    only delays what comes next (the next prompts' prefill, the cache store): it is skipped. Counted
    on the real model: the last prompt token, then one pass per answer token but the last; the answer
    is the start of a longer one."""
    decode_passes: list[int] = []
    model_class = type(model.model)
    forward = model_class.__call__

    def counting(self, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
        if inputs.shape[1] == 1:
            decode_passes.append(inputs.shape[0])
        return forward(self, inputs, *args, **kwargs)

    prompt = chat(model, "Tell me about the mountains.")
    longer, _ = tokens_of(engine.submit(request(model, prompt, max_tokens=12)))
    wait_idle(engine)
    monkeypatch.setattr(model_class, "__call__", counting)
    answer, finish = tokens_of(engine.submit(request(model, prompt, max_tokens=6)))
    wait_idle(engine)
    monkeypatch.undo()
    assert finish == "length" and answer == longer[:6]
    assert decode_passes == [1] * 6, decode_passes  # 7 before: one more, for the 6th token's KV
