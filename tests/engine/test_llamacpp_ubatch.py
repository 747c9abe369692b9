"""A seeded request on llama.cpp samples the same tokens whatever runs beside it (engine/backends/llamacpp_ubatch.py).

llama.cpp splits each step's batch into micro-batches (consecutive slots, equal token counts), and
a one-token micro-batch takes other CPU kernels (logits ~1e-2 apart). Before the fix, the third of
three seeded choices admitted one step late, or a seeded request run alone, sampled from other
logits than the same choice beside its siblings (the test_n_choices flake on llama.cpp). In-process,
on the default model as an f32 GGUF (the same file tests/api/test_llamacpp.py serves).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gerdsen_ai_server.engine.backends.llamacpp_ubatch import lone_tokens, micro_batches, refeeds
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, TokenStream

Answer = list[tuple[int, float]]


def test_the_split_follows_llama_cpp_split_equal() -> None:
    # Consecutive ids in batch order share a micro-batch, the same count from each, while all have more.
    assert micro_batches([(0, 1), (1, 1), (2, 1)], 512) == [[(0, 1), (1, 1), (2, 1)]]
    assert micro_batches([(0, 1), (2, 1)], 512) == [[(0, 1)], [(2, 1)]]  # an idle slot between them
    assert micro_batches([(1, 1), (0, 1)], 512) == [[(1, 1)], [(0, 1)]]  # decreasing ids never join
    assert micro_batches([(0, 1), (1, 1), (2, 2)], 512) == [[(0, 1), (1, 1), (2, 1)], [(2, 1)]]
    assert micro_batches([(0, 3), (1, 3)], 4) == [[(0, 2), (1, 2)], [(0, 1), (1, 1)]]  # n_ubatch bounds it
    assert lone_tokens([(0, 1), (1, 1), (2, 2)], 512) == {2}  # a prompt tail cut into one-token pieces
    assert lone_tokens([(0, 1), (1, 1)], 512) == set()


def test_refeeds_leave_no_one_token_micro_batch() -> None:
    assert refeeds([(0, 1)], {0}, 512) == {0}  # alone
    assert refeeds([(0, 1), (2, 1), (3, 1)], {0, 2, 3}, 512) == {0}  # slot 0 alone, 2 and 3 together
    assert refeeds([(0, 1), (1, 1), (2, 2)], {0, 1, 2}, 512) == {2}
    assert refeeds([(0, 1), (2, 1)], {2}, 512) == {2}  # only those able (seeded, with a previous token)
    for rows in ([(0, 1), (2, 1), (3, 2)], [(5, 1), (0, 2), (1, 1)], [(0, 2), (1, 1)]):
        grown = [(seq, n + (seq in refeeds(rows, {s for s, _ in rows}, 512))) for seq, n in rows]
        assert lone_tokens(grown, 512) == set()


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make setup installs it)")
    from tests.support.gguf import default_f32_gguf

    gguf = default_f32_gguf()  # built once and cached, shared with tests/api/test_llamacpp.py
    options = EngineOptions(
        Path(tmp_path_factory.mktemp("ubatch")), backend="llamacpp", llamacpp_threads=1, max_batch=4, context_length=256
    )
    eng = InferenceEngine(options)
    eng.start()
    eng.load_model(str(gguf.parent), trusted=True).result(timeout=120)
    yield eng
    eng.shutdown()


@pytest.mark.slow  # ~8 s with the model's load
def test_a_seeded_choice_samples_the_same_beside_its_siblings_late_or_alone(engine: InferenceEngine) -> None:
    (model,) = engine.models()
    prompt = list(model.tokenizer.encode("The capital of France is"))

    def submit(seed: int) -> TokenStream:
        sampling = SamplingParams(temperature=1.0, seed=seed)
        return engine.submit(
            GenerationRequest(model=model.model_id, prompt_tokens=prompt, max_tokens=8, sampling=sampling, logprobs=0)
        )

    def read(stream: TokenStream) -> Answer:
        return [(lp.token_id, lp.logprob) for event in stream for lp in event.logprobs]

    def same(a: Answer, b: Answer) -> bool:  # measured: 0 late and 2e-6 alone; 9e-4 and 2e-3 before the fix
        return [t for t, _ in a] == [t for t, _ in b] and all(
            abs(x - y) < 1e-4 for (_, x), (_, y) in zip(a, b, strict=True)
        )

    together = [read(s) for s in [submit(11 + i) for i in range(3)]]  # as serving submits n=3
    assert len({tuple(t for t, _ in a) for a in together}) == 3
    for _ in range(2):  # the third choice one step late: its prompt tail beside two one-token decodes
        first, second = submit(11), submit(12)
        head = next(iter(first))  # the first two are decoding now
        third = submit(13)
        late = [[(lp.token_id, lp.logprob) for lp in head.logprobs] + read(first), read(second), read(third)]
        assert all(same(a, b) for a, b in zip(late, together, strict=True)), (late, together)
    alone = read(submit(13))  # nothing beside it: every decode step a single sequence
    assert same(alone, together[2]), (alone, together[2])
