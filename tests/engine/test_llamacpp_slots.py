"""A waiting request on llama.cpp takes a free slot beside the busy ones when that costs no prefix
(engine/backends/llamacpp_slots.py): llama.cpp decodes sequences in scattered slots in separate
micro-batches (llamacpp_ubatch.py), 1.7-4.6x the time a step. Before, a request with no cached
prefix took the lowest free slot, wherever the running sequences were."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from gerdsen_ai_server.engine.backends.llamacpp_slots import SPARE, choose_slot, common_prefix, runs
from gerdsen_ai_server.engine.backends.llamacpp_ubatch import micro_batches
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, TokenStream
from tests.support.gguf import build_tiny_gguf
from tests.support.models import default_model_folder

Answer = list[tuple[int, float]]


def test_runs_count_consecutive_ids() -> None:
    assert runs([]) == 0 and runs([3]) == 1 and runs([0, 1, 2]) == 1
    assert runs([0, 2, 4]) == 3 and runs([4, 0, 1, 5]) == 2


def test_a_tie_goes_beside_the_busy_slots() -> None:
    prompt = list(range(100, 120))
    assert choose_slot(prompt, {0: [], 1: [], 3: []}, [2]) == 1  # not 0: two runs
    assert choose_slot(prompt, {0: [], 4: []}, [2, 3]) == 4
    assert choose_slot(prompt, {0: [], 1: [], 2: []}, []) == 0  # nothing busy: the lowest, as before
    # A system prompt cached in slots 0 and 3: the one beside the busy slot.
    assert choose_slot(prompt, {0: prompt[:10], 3: prompt[:10] + [7], 5: []}, [2]) == 3
    # A cached prefix longer by more than SPARE tokens wins over adjacency (with spare=0, by one token).
    assert choose_slot(prompt, {0: prompt[: SPARE + 1], 3: [], 5: []}, [2]) == 0
    assert choose_slot(prompt, {0: prompt[:SPARE], 3: [], 5: []}, [2]) == 3
    assert choose_slot(prompt, {0: prompt[:11], 3: prompt[:10], 5: []}, [2], spare=0) == 0
    # Past the two tokens every prompt feeds again (llamacpp.py _assign), a longer match is no better.
    assert choose_slot(prompt, {0: prompt, 3: prompt[:18] + [7]}, [2]) == 3


def test_no_more_than_spare_prefix_tokens_are_given_up() -> None:
    prompt = list(range(100, 200))
    far, near = {0: prompt[:50]}, [2]  # slot 0 shares 50 tokens, two ids from the busy slot
    assert choose_slot(prompt, {**far, 3: prompt[:49]}, near, spare=0) == 0
    assert choose_slot(prompt, {**far, 3: prompt[:41]}, near, spare=8) == 0
    assert choose_slot(prompt, {**far, 3: prompt[:42]}, near, spare=8) == 3
    rng = random.Random(0)
    for _ in range(2000):  # any state: the slot taken shares at least the best usable prefix less spare
        prompt = [rng.randrange(4) for _ in range(rng.randint(0, 12))]
        slots = rng.sample(range(8), rng.randint(1, 8))
        free = {s: [rng.randrange(4) for _ in range(rng.randint(0, 12))] for s in slots}
        busy = rng.sample([s for s in range(8) if s not in free], rng.randint(0, 8 - len(free)))
        usable = max(0, len(prompt) - 2)
        best = max(min(common_prefix(t, prompt), usable) for t in free.values())
        for spare in (SPARE, 2, 8):
            chosen = choose_slot(prompt, free, busy, spare)
            assert chosen in free and min(common_prefix(free[chosen], prompt), usable) >= best - spare
            assert runs([*busy, chosen]) == min(
                runs([*busy, s]) for s in free if min(common_prefix(free[s], prompt), usable) >= best - spare
            )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    folder = tmp_path_factory.mktemp("slots")
    gguf = build_tiny_gguf(folder / "tiny" / "tiny.gguf", default_model_folder(), context_length=512)
    options = EngineOptions(folder, backend="llamacpp", llamacpp_threads=1, max_batch=4, context_length=512)
    eng = InferenceEngine(options)
    eng.start()
    eng.load_model(str(gguf), trusted=True).result(timeout=120)
    yield eng
    eng.shutdown()


def test_a_new_conversation_runs_beside_a_returning_one(engine: InferenceEngine) -> None:
    from bench.llamacpp_slots import Recorder

    (model,) = engine.models()
    backend = model.model
    greedy = SamplingParams(temperature=0.0)

    def submit(prompt: list[int], max_tokens: int) -> TokenStream:
        request = GenerationRequest(model.model_id, prompt, max_tokens, sampling=greedy, logprobs=0)
        return engine.submit(request)

    def read(stream: TokenStream) -> Answer:
        return [(lp.token_id, lp.logprob) for event in stream for lp in event.logprobs]

    first = {name: [base + i for i in range(20)] for name, base in (("a", 100), ("b", 300), ("c", 500))}
    answers = {name: read(s) for name, s in [(name, submit(p, 16)) for name, p in first.items()]}  # slots 0, 1, 2
    again = first["c"] + [t for t, _ in answers["c"]] + list(range(900, 910))  # c's next turn: back into slot 2
    new = [700 + i for i in range(20)]  # shares nothing: any free slot ties
    recorder = backend._lc = Recorder(backend._lc)
    try:
        returning = submit(again, 200)
        head = next(iter(returning))  # decoding now
        beside = read(submit(new, 16))
        late = [(lp.token_id, lp.logprob) for lp in head.logprobs] + read(returning)
    finally:
        backend._lc = recorder._lc
    both = [rows for rows, _ in recorder.steps if len(rows) == 2 and all(n == 1 for _, n in rows)]
    assert len(both) >= 8, recorder.steps  # the two decoded side by side
    assert all(len(micro_batches(rows, 512)) == 1 for rows in both), both  # before: slots 0 and 2, two passes

    def same(a: Answer, b: Answer) -> bool:  # tokens, and log-probabilities to the last bits of a batch
        return [t for t, _ in a] == [t for t, _ in b] and all(
            abs(x - y) < 1e-3 for (_, x), (_, y) in zip(a, b, strict=True)
        )

    assert same(read(submit(new, 16)), beside)  # greedy answers as each alone
    assert same(read(submit(again, 200)), late)
