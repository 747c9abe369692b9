"""Slot choice on the llama.cpp backend: the shipped rule (engine/backends/llamacpp_slots.py: a cached prefix
worth its slot, else beside the running slots, empty before a history), proved on the real backend too, and
the adjacency rule bench/llamacpp_slots.py measures against it."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from bench.llamacpp_slots import SPARE, adjacent, runs
from gerdsen_ai_server.engine.backends.llamacpp_slots import choose_slot, common_prefix
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams


def test_the_shipped_rule_reuses_a_prefix_worth_it_else_packs_and_spares_histories() -> None:
    prompt = list(range(100, 120))
    assert choose_slot(prompt, {0: [], 1: [], 3: []}) == 0  # nothing cached anywhere: the lowest
    assert choose_slot(prompt, {0: prompt[:3], 3: prompt[:10], 5: []}) == 3  # the longest prefix, all of it kept
    assert choose_slot(prompt, {2: prompt, 6: prompt[:19]}) == 2  # the whole prompt cached
    assert choose_slot(prompt, {1: prompt[:10] + [7], 4: prompt[:10]}) == 1  # a tie: the lowest id ...
    assert choose_slot(prompt, {1: prompt[:10] + [7], 4: prompt[:10]}, (), {1: 5, 4: 2}) == 4  # ... or the least recent
    assert choose_slot(prompt, {0: prompt[:12] + [7] * 100, 2: []}) == 0  # keeps a tenth of what it holds: reused
    # A history sharing only a chat template's first tokens is spared while an empty slot will do (the rule
    # before took slot 0 for 3 tokens, and that conversation was prefilled again when it came back) ...
    history = prompt[:3] + list(range(500, 540))
    assert choose_slot(prompt, {0: history, 2: []}) == 2
    assert choose_slot(prompt, {0: prompt[:12] + [7] * 120, 2: []}) == 2
    # ... and beside the running slots before that: a scattered slot is a micro-batch of its own
    assert choose_slot(prompt, {0: [], 1: history, 5: []}, busy=[2, 3]) == 1
    assert choose_slot(prompt, {0: [], 1: [], 5: []}, busy=[2, 3]) == 1
    assert choose_slot(prompt, {0: [], 4: [], 5: []}, busy=[2, 3]) == 4
    # Histories only: beside the running ones, then the least recently used.
    assert choose_slot(prompt, {0: [1, 2], 1: [3, 4], 2: [5]}, (), {0: 3, 1: 1, 2: 2}) == 1
    assert choose_slot(prompt, {0: [1, 2], 1: [3, 4], 4: [5]}, [3], {0: 3, 1: 1, 4: 2}) == 4
    assert runs([]) == 0 and runs([0, 1, 2]) == 1 and runs([0, 2, 4]) == 3
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0


def start_engine(folder: Path) -> InferenceEngine:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    from tests.support.gguf import default_f32_gguf

    gguf = default_f32_gguf()  # built once and cached, shared with tests/api/test_llamacpp.py
    options = EngineOptions(folder, backend="llamacpp", llamacpp_threads=1, max_batch=4, context_length=256)
    eng = InferenceEngine(options)
    eng.start()
    eng.load_model(str(gguf.parent), trusted=True).result(timeout=120)
    return eng


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    eng = start_engine(tmp_path_factory.mktemp("slots"))
    yield eng
    eng.shutdown()


@pytest.mark.slow  # ~5 s with the model's load
def test_a_conversation_keeps_its_slot_when_an_unrelated_prompt_comes_between(engine: InferenceEngine) -> None:
    (model,) = engine.models()
    (resident,) = engine.residents()
    tokenizer = model.tokenizer

    def run(prompt: list[int]) -> list[int]:
        request = GenerationRequest(
            model=model.model_id, prompt_tokens=prompt, max_tokens=4, sampling=SamplingParams(temperature=0.0)
        )
        return [t for event in engine.submit(request) for t in event.token_ids]

    def reused() -> int:
        return int(resident.backend.prefix_tokens_reused)  # type: ignore[attr-defined]

    first = list(tokenizer.encode("A long conversation about the history of the river towns of the north, " * 3))
    answer = run(first)
    unrelated = list(tokenizer.encode("Write a haiku about bread."))
    assert common_prefix(first, unrelated) == 0
    run(unrelated)  # the rule before this put it in slot 0, over the conversation
    before = reused()
    run(first + answer + list(tokenizer.encode(" And what came after?")))  # the conversation comes back
    assert reused() - before >= len(first) - 2  # found in its slot (at most its last two tokens fed again)


def test_runs_count_consecutive_ids() -> None:
    assert runs([]) == 0 and runs([3]) == 1 and runs([0, 1, 2]) == 1
    assert runs([0, 2, 4]) == 3 and runs([4, 0, 1, 5]) == 2


def test_a_tie_goes_beside_the_busy_slots() -> None:
    prompt = list(range(100, 120))
    assert adjacent(prompt, {0: [], 1: [], 3: []}, [2]) == 1  # not 0: two runs
    assert adjacent(prompt, {0: [], 4: []}, [2, 3]) == 4
    assert adjacent(prompt, {0: [], 1: [], 2: []}, []) == 0  # nothing busy: the lowest, as before
    # A system prompt cached in slots 0 and 3: the one beside the busy slot.
    assert adjacent(prompt, {0: prompt[:10], 3: prompt[:10] + [7], 5: []}, [2]) == 3
    # A cached prefix longer by more than SPARE tokens wins over adjacency (with spare=0, by one token).
    assert adjacent(prompt, {0: prompt[: SPARE + 1], 3: [], 5: []}, [2]) == 0
    assert adjacent(prompt, {0: prompt[:SPARE], 3: [], 5: []}, [2]) == 3
    assert adjacent(prompt, {0: prompt[:11], 3: prompt[:10], 5: []}, [2], spare=0) == 0
    # Past the two tokens every prompt feeds again (llamacpp.py _assign), a longer match is no better.
    assert adjacent(prompt, {0: prompt, 3: prompt[:18] + [7]}, [2]) == 3


def test_no_more_than_spare_prefix_tokens_are_given_up() -> None:
    prompt = list(range(100, 200))
    far, near = {0: prompt[:50]}, [2]  # slot 0 shares 50 tokens, two ids from the busy slot
    assert adjacent(prompt, {**far, 3: prompt[:49]}, near, spare=0) == 0
    assert adjacent(prompt, {**far, 3: prompt[:41]}, near, spare=8) == 0
    assert adjacent(prompt, {**far, 3: prompt[:42]}, near, spare=8) == 3
    rng = random.Random(0)
    for _ in range(2000):  # any state: the slot taken shares at least the best usable prefix less spare
        prompt = [rng.randrange(4) for _ in range(rng.randint(0, 12))]
        slots = rng.sample(range(8), rng.randint(1, 8))
        free = {s: [rng.randrange(4) for _ in range(rng.randint(0, 12))] for s in slots}
        busy = rng.sample([s for s in range(8) if s not in free], rng.randint(0, 8 - len(free)))
        usable = max(0, len(prompt) - 2)
        best = max(min(common_prefix(t, prompt), usable) for t in free.values())
        for spare in (SPARE, 2, 8):
            chosen = adjacent(prompt, free, busy, spare)
            assert chosen in free and min(common_prefix(free[chosen], prompt), usable) >= best - spare
            assert runs([*busy, chosen]) == min(
                runs([*busy, s]) for s in free if min(common_prefix(free[s], prompt), usable) >= best - spare
            )


@pytest.mark.slow  # ~3 s with the model's load
def test_a_failure_choosing_its_slot_fails_the_request_instead_of_losing_it(tmp_path: Path) -> None:
    """The backend's thread ends on an unexpected error and fails what it holds: a request it had taken off
    the queue but not yet put in a slot was in neither, and its reader waited forever."""
    from gerdsen_ai_server.engine.backends import llamacpp

    eng = start_engine(tmp_path)
    try:
        (model,) = eng.models()

        def broken(*args: object) -> int:
            raise RuntimeError("slot choice failed")

        request = GenerationRequest(model=model.model_id, prompt_tokens=[1, 2, 3], max_tokens=4)
        with mock.patch.object(llamacpp, "choose_slot", broken):
            stream = eng.submit(request)
            events = []
            reader = threading.Thread(target=lambda: events.extend(stream), daemon=True)
            reader.start()
            reader.join(timeout=20)
        assert not reader.is_alive(), "the request was lost: its reader still waits"
        assert events and events[-1].error
    finally:
        eng.shutdown()
