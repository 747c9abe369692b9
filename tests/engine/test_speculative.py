"""Speculative decoding (engine/speculative.py) in-process: the rejection rule keeps the target
distribution (statistically, on a small vocabulary), prompt lookup finds its drafts, and on the real
embedded model greedy output with speculation (prompt lookup, or a draft model) is the plain
decoding's, token for token, with max_tokens, stop strings, log-probabilities and cancellation, alone
and in a batch of eight where several sequences draft in the same verification pass (per-row
acceptance, the KV cache re-padded) beside sequences that never speculate."""

from __future__ import annotations

import threading
import time
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, SpeculativeParams
from gerdsen_ai_server.engine.sampling import build_sampler
from gerdsen_ai_server.engine.speculative_draft import NgramIndex, accept_sampled
from tests.support.models import default_model_folder
from tests.support.threads import at_once
from tests.support.tiny_models import build_tiny_llama

GREEDY = SamplingParams(temperature=0)
NGRAM = SpeculativeParams(method="ngram", num_tokens=6, lookup_max=3, lookup_min=2)
# An "edit this text" prompt: the answer copies the input, so prompt lookup drafts well.
EDIT = (
    "Repeat this text exactly, fixing the spelling mistakes:\n\nThe quick brown fox jumps over the lazzy dog. "
    "It was a sunny day in the park, and the children were playing footbal near the old oak tree while their "
    "parents watched from the benches."
)
OTHER = "Tell me about the sea."  # an answer that copies little


def lookup_draft(context: list[int], count: int, lookup_min: int, lookup_max: int) -> list[int]:
    """The reference: a scan back from the end for the longest, most recent earlier match of the tail."""
    size = len(context)
    for n in range(min(lookup_max, size - 1), lookup_min - 1, -1):
        for end in range(size - 2, n - 2, -1):
            if context[end - n + 1 : end + 1] == context[size - n :]:
                return context[end + 1 : end + 1 + count]
    return []


def test_ngram_index_drafts_the_longest_most_recent_match() -> None:
    index = NgramIndex(1, 3)
    index.extend([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert index.draft(2) == [7, 8]  # "2 3" last seen before "7 8" (no "5 2 3" earlier)
    index = NgramIndex(2, 2)
    index.extend([1, 2, 1, 2])
    assert index.draft(5) == [1, 2]  # a match may run into the tail itself
    rng = np.random.default_rng(3)  # grown a few tokens at a time, as a sequence decodes: the scan's drafts
    index, context = NgramIndex(2, 3), []
    for _ in range(300):
        new = [int(t) for t in rng.integers(0, 6, size=rng.integers(1, 4))]
        index.extend(new)
        context += new
        assert index.draft(4) == lookup_draft(context, 4, 2, 3)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was produced"
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


@pytest.mark.parametrize(
    "sampling",
    [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=4)],
    ids=["temperature-1", "temperature-0.7-top-k-4"],
)
def test_rejection_rule_keeps_the_target_distribution(sampling: SamplingParams) -> None:
    """Over many verifications of a fixed two-token draft, the first token is distributed as the
    target's first row, and the second (given the first was the draft's) as its second row: a
    chi-square test on 6 tokens (5 degrees of freedom; 30 is p < 1e-5). A rule that accepted a
    likely draft more often, or resampled without removing the draft, fails it."""
    mx.random.seed(7)
    logits = mx.array([[2.0, 1.5, 1.0, 0.3, -0.5, 0.0], [0.2, 1.0, 1.8, -1.0, 0.5, 0.9], [0.0] * 6])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    request = GenerationRequest(model="m", prompt_tokens=[0], max_tokens=8, sampling=sampling)
    sampler = build_sampler(sampling)
    scaled = np.array(logprobs) / sampling.temperature
    if sampling.top_k:
        cut = np.sort(scaled, axis=-1)[:, -sampling.top_k][:, None]
        scaled = np.where(scaled >= cut, scaled, -np.inf)
    target = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    target /= target.sum(axis=-1, keepdims=True)
    draft = [1, 2]  # neither row's most likely token
    first, second = np.zeros(6), np.zeros(6)
    for _ in range(4000):
        accepted, following = accept_sampled(request, logprobs, draft, sampler)
        tokens = [*draft[:accepted], following]
        first[tokens[0]] += 1
        if accepted:  # the first drafted token was kept
            second[tokens[1]] += 1
    assert _chi_square(first, target[0]) < 30, (first, target[0])
    assert _chi_square(second, target[1]) < 30, (second, target[1])


def prompt_of(model: LoadedModel, text: str) -> list[int]:
    return list(model.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))


@pytest.fixture(scope="module")
def plain(engine: InferenceEngine, model: LoadedModel) -> dict[str, tuple[list[int], str, str | None, list[float]]]:
    """Each prompt's plain greedy answer (32 tokens), computed once for the module."""
    return {text: run(engine, model, text, None) for text in (EDIT, OTHER)}


def run(
    engine: InferenceEngine,
    model: LoadedModel,
    text: str,
    speculative: SpeculativeParams | None,
    max_tokens: int = 32,
    stop: list[str] | None = None,
    logprobs: int | None = None,
    sampling: SamplingParams = GREEDY,
) -> tuple[list[int], str, str | None, list[float]]:
    """(tokens, text, finish reason, chosen tokens' logprobs) of one (greedy) request read to its end."""
    request = GenerationRequest(
        model=model.model_id,
        prompt_tokens=prompt_of(model, text),
        max_tokens=max_tokens,
        sampling=sampling,
        stop=stop or [],
        logprobs=logprobs,
        speculative=speculative,
    )
    ids: list[int] = []
    parts: list[str] = []
    chosen: list[float] = []
    finish = None
    for event in engine.submit(request):
        assert event.error is None, event.error
        ids += event.token_ids
        parts.append(event.text)
        chosen += [lp.logprob for lp in event.logprobs]
        finish = event.finish_reason or finish
    return ids, "".join(parts), finish, chosen


def test_greedy_output_is_the_plain_decodings(
    engine: InferenceEngine, model: LoadedModel, plain: dict[str, tuple[list[int], str, str | None, list[float]]]
) -> None:
    for text in (EDIT, OTHER):
        before = engine.stats()
        fast = run(engine, model, text, NGRAM)
        after = engine.stats()
        assert fast[:3] == plain[text][:3], text
        if text == EDIT:  # the edit copies its input: most drafts are accepted
            drafted = after.speculative_drafted_total - before.speculative_drafted_total
            accepted = after.speculative_accepted_total - before.speculative_accepted_total
            assert drafted > 0 and accepted / drafted > 0.5, (drafted, accepted)


def test_stops_end_a_run_exactly_where_plain_decoding_ends(
    engine: InferenceEngine, model: LoadedModel, plain: dict[str, tuple[list[int], str, str | None, list[float]]]
) -> None:
    """max_tokens and a stop string reached inside an accepted run end it at the same token and text;
    log-probabilities of the accepted tokens are the plain steps' (to float noise)."""
    fast = run(engine, model, EDIT, NGRAM, max_tokens=13, logprobs=0)
    short = run(engine, model, EDIT, None, max_tokens=13, logprobs=0)
    assert fast[:3] == short[:3] and fast[0] == plain[EDIT][0][:13] and fast[2] == "length"
    assert np.allclose(fast[3], short[3], atol=1e-3)
    reference = plain[EDIT][1]
    assert "lazy dog" in reference
    fast = run(engine, model, EDIT, NGRAM, stop=["lazy dog"])
    assert fast[2] == "stop" and fast[1] == reference[: reference.index("lazy dog")]


def test_a_speculating_request_keeps_the_batch(
    engine: InferenceEngine, model: LoadedModel, plain: dict[str, tuple[list[int], str, str | None, list[float]]]
) -> None:
    """Two requests together, one of them speculating: both decode in one batch, each with its plain
    answer; the other's ends first (16 tokens), and the speculating one then goes on alone, drafting."""
    results: dict[str, list[int]] = {}

    def one(text: str) -> None:
        results[text] = run(
            engine, model, text, NGRAM if text == EDIT else None, max_tokens=32 if text == EDIT else 16
        )[0]

    before = engine.stats().speculative_drafted_total
    threads = [threading.Thread(target=one, args=(text,)) for text in (EDIT, OTHER)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == {EDIT: plain[EDIT][0], OTHER: plain[OTHER][0][:16]}
    assert engine.stats().speculative_drafted_total > before


EDITS = [EDIT] + [
    f"Repeat this text exactly, fixing the spelling mistakes:\n\n{paragraph}"
    for paragraph in (
        "Our team will meet on Tuesday to discus the new budget. Please bring the reports from last quarter, "
        "including the sales figures and the list of open isues.",
        "To make the bread, mix the flour, water, salt and yeast in a large bowl. Knead the dough for ten minutes "
        "until it is smoth, then leave it to rise for an hour.",
        "The library opens at nine in the morning and closes at six in the evenning. Books may be borowed for "
        "two weeks and renewed once online.",
    )
]
# One batch of eight: four edits speculating to 40 tokens, one ending by max_tokens and one by a stop
# string inside accepted runs, one with a penalty (logits processors: never speculates), a seeded
# sampled one (never speculates) and one that did not ask; each job's keyword arguments for ``run``.
WAVE: list[dict[str, Any]] = [
    *({"text": text, "max_tokens": 40} for text in EDITS),
    {"text": EDITS[1], "max_tokens": 13},
    {"text": EDIT, "max_tokens": 40, "stop": ["lazy dog"]},
    {"text": EDITS[2], "max_tokens": 24, "sampling": SamplingParams(temperature=0, frequency_penalty=0.5)},
    {"text": OTHER, "max_tokens": 24, "sampling": SamplingParams(temperature=0.8, seed=11)},
]
Result = tuple[list[int], str, str | None, list[float]]


def together(engine: InferenceEngine, model: LoadedModel, jobs: list[dict[str, Any]]) -> list[Result]:
    """The jobs sent at once (one engine batch), each read to its end on its own thread."""
    return at_once(lambda i: run(engine, model, **jobs[i]), len(jobs), 180)


@pytest.fixture(scope="module")
def plain_wave(engine: InferenceEngine, model: LoadedModel) -> list[Result]:
    """WAVE's answers without speculation, decoded together."""
    return together(engine, model, [{**job, "speculative": None} for job in WAVE])


def test_eight_streams_each_keep_their_plain_answer_while_several_draft(
    engine: InferenceEngine, model: LoadedModel, plain_wave: list[Result]
) -> None:
    """WAVE with speculation asked by every job: each answer (tokens, text, finish reason) is the plain
    one, and the verification passes drafted for several sequences at once (more than 1.5 rows a
    pass on average: a batch that speculated only while one sequence was left has exactly 1)."""
    assert [r[2] for r in plain_wave[4:6]] == ["length", "stop"]
    before = engine.stats()
    fast = together(engine, model, [{**job, "speculative": NGRAM} for job in WAVE])
    after = engine.stats()
    for job, got, want in zip(WAVE, fast, plain_wave, strict=True):
        assert got[:3] == want[:3], job
    passes = after.speculative_passes_total - before.speculative_passes_total
    rows = after.speculative_rows_total - before.speculative_rows_total
    drafted = after.speculative_drafted_total - before.speculative_drafted_total
    accepted = after.speculative_accepted_total - before.speculative_accepted_total
    assert passes > 0 and rows / passes > 1.5, (passes, rows)
    assert accepted / drafted > 0.4, (drafted, accepted)


def test_cancelling_one_of_several_speculating_requests(
    engine: InferenceEngine, model: LoadedModel, plain_wave: list[Result]
) -> None:
    """A speculating request cancelled mid-answer while three others speculate beside it, and a sampled
    one (the rejection rule's path, often with nothing drafted): it leaves, the greedy ones keep their
    plain answers, the sampled one ends normally, and nothing stays in flight."""
    request = GenerationRequest(
        model=model.model_id, prompt_tokens=prompt_of(model, EDIT), max_tokens=64, sampling=GREEDY, speculative=NGRAM
    )
    stream = engine.submit(request)
    jobs = [*WAVE[1:4], {"text": OTHER, "max_tokens": 24, "sampling": SamplingParams(temperature=0.8)}]
    results: list[Result] = []
    others = threading.Thread(
        target=lambda: results.extend(together(engine, model, [{**job, "speculative": NGRAM} for job in jobs]))
    )
    others.start()
    for count, _ in enumerate(stream):
        if count == 3:  # a few events in: the others have joined its batch by now
            break
    stream.cancel()
    others.join(180)
    assert [r[:3] for r in results[:3]] == [r[:3] for r in plain_wave[1:4]]
    assert results[3][2] in ("length", "stop") and results[3][0]
    deadline = time.monotonic() + 60
    while engine.inflight:
        assert time.monotonic() < deadline, "the cancelled request kept its place"
        time.sleep(0.05)


def test_cancelling_a_speculating_request(
    engine: InferenceEngine, model: LoadedModel, plain: dict[str, tuple[list[int], str, str | None, list[float]]]
) -> None:
    """A client leaving mid-answer frees its place; the next request decodes as before."""
    request = GenerationRequest(
        model=model.model_id, prompt_tokens=prompt_of(model, EDIT), max_tokens=64, sampling=GREEDY, speculative=NGRAM
    )
    stream = engine.submit(request)
    next(iter(stream))
    stream.cancel()
    deadline = time.monotonic() + 60
    while engine.inflight:
        assert time.monotonic() < deadline, "the cancelled request kept its place"
        time.sleep(0.05)
    assert run(engine, model, OTHER, NGRAM)[0] == plain[OTHER][0]


@pytest.mark.slow
def test_draft_model_output_is_the_plain_decodings(
    engine: InferenceEngine,
    model: LoadedModel,
    plain: dict[str, tuple[list[int], str, str | None, list[float]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The target as its own draft (every draft accepted) and a random tiny llama of the same
    vocabulary (next to none accepted): both give the plain answer, alone and then together in one
    batch, where both draft in the same verification passes (each sequence has its own draft cache)."""
    from mlx_lm import load

    tiny, _ = load(str(build_tiny_llama(tmp_path_factory.mktemp("draft") / "tiny", default_model_folder())))
    for text, draft in ((EDIT, model.model), (OTHER, tiny)):
        before = engine.stats()
        plan = SpeculativeParams(method="draft_model", num_tokens=4, draft=draft)
        assert run(engine, model, text, plan)[:3] == plain[text][:3], text
        after = engine.stats()
        drafted = after.speculative_drafted_total - before.speculative_drafted_total
        accepted = after.speculative_accepted_total - before.speculative_accepted_total
        assert drafted > 0 and (accepted == drafted if draft is model.model else accepted < drafted), (
            drafted,
            accepted,
        )
    before = engine.stats()
    jobs = [
        {
            "text": text,
            "max_tokens": 16,
            "speculative": SpeculativeParams(method="draft_model", num_tokens=4, draft=draft),
        }
        for text, draft in ((EDIT, model.model), (OTHER, tiny))
    ]
    assert [r[0] for r in together(engine, model, jobs)] == [plain[EDIT][0][:16], plain[OTHER][0][:16]]
    after = engine.stats()
    passes = after.speculative_passes_total - before.speculative_passes_total
    assert passes > 0 and after.speculative_rows_total - before.speculative_rows_total > passes  # 2 rows in some
