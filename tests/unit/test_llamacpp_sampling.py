"""The llama.cpp backend's numpy sampling (engine/backends/llamacpp_sampling.py): what each OpenAI parameter does."""

from __future__ import annotations

import numpy as np
import pytest

from gerdsen_ai_server.engine.backends.llamacpp_sampling import Sampler
from gerdsen_ai_server.engine.backends.llamacpp_sampling import log_softmax as _log_softmax
from gerdsen_ai_server.engine.backends.llamacpp_sampling import token_logprob as _token_logprob
from gerdsen_ai_server.engine.backends.llamacpp_slots import common_prefix
from gerdsen_ai_server.engine.protocol import SamplingParams

LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], dtype=np.float32)


def draw(params: SamplingParams, n: int = 200, logits: np.ndarray = LOGITS) -> list[int]:
    sampler = Sampler(params, None)
    return [sampler.sample(_log_softmax(sampler.process(logits))) for _ in range(n)]


def test_greedy_and_top_k_1_and_min_p_1_pick_the_argmax() -> None:
    assert set(draw(SamplingParams(temperature=0))) == {0}
    assert set(draw(SamplingParams(temperature=1.5, top_k=1))) == {0}
    assert set(draw(SamplingParams(temperature=1.5, min_p=1.0))) == {0}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.exp(_log_softmax(LOGITS))
    assert probs[0] < 0.6 < probs[0] + probs[1]
    assert set(draw(SamplingParams(temperature=1.0, top_p=0.6))) == {0, 1}


def test_top_k_and_min_p_bound_the_choices() -> None:
    assert set(draw(SamplingParams(temperature=2.0, top_k=3))) <= {0, 1, 2}
    # min_p 0.3: tokens at least 0.3x the top one's probability (e^-1 = 0.37 passes, e^-1.5 = 0.22 not)
    assert set(draw(SamplingParams(temperature=2.0, min_p=0.3))) == {0, 1}


def test_a_seed_reproduces_and_no_seed_varies() -> None:
    seeded = SamplingParams(temperature=1.0, seed=7)
    assert draw(seeded, 50) == draw(seeded, 50)
    assert draw(SamplingParams(temperature=1.0), 50) != draw(SamplingParams(temperature=1.0), 50)


def test_logit_bias_and_penalties_change_the_logits() -> None:
    assert set(draw(SamplingParams(temperature=0, logit_bias={5: 100.0}), 5)) == {5}
    for params in (
        SamplingParams(temperature=0, presence_penalty=2.0),
        SamplingParams(temperature=0, frequency_penalty=2.0),
        SamplingParams(temperature=0, repetition_penalty=10.0),
    ):
        sampler = Sampler(params, None)
        first = sampler.sample(_log_softmax(sampler.process(LOGITS)))
        sampler.accept(first)
        assert first == 0
        assert sampler.sample(_log_softmax(sampler.process(LOGITS))) == 1  # token 0 is penalised now


def test_frequency_penalty_grows_with_the_count() -> None:
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.6), None)
    sampler.accept(0)
    assert sampler.process(LOGITS)[0] == pytest.approx(1.4)
    sampler.accept(0)
    assert sampler.process(LOGITS)[0] == pytest.approx(0.8)


def test_logprobs_are_normalised_and_the_top_ones_sorted() -> None:
    lp = _log_softmax(LOGITS)
    assert np.exp(lp).sum() == pytest.approx(1.0)
    entry = _token_logprob(lp, 2, 3)
    assert entry.token_id == 2 and entry.logprob == pytest.approx(float(lp[2]))
    assert [t for t, _ in entry.top] == [0, 1, 2]


def testcommon_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2]) == 2
