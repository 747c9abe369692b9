"""Speculation at full batch width on the 8-bit KV cache (issue 28 item 4 with issue 27 item 2), in process.

A batch on the quantized cache (engine/quantized_cache.py) used to speculate only once its sequence
was alone, as ``repad`` knew only plain keys and values. Here a random tiny llama (heads of 64, as
the quantized cache needs; untied embeddings, so its greedy answers depend on their context and fall
into loops that prompt lookup drafts only partly right) decodes six prompts together at kv_bits 8:
greedy answers with prompt lookup are the plain ones, token for token, while several rows draft in
the same verification pass and keep different numbers of tokens (so ``repad`` moves rows)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gerdsen_ai_server.engine import speculative
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.options import EngineOptions
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, SpeculativeParams
from tests.support import DEFAULT_MODEL, TEST_MODELS_DIR
from tests.support.threads import at_once
from tests.support.tiny_models import TOKENIZER_FILES

# Repetitive prompts (a phrase twice, then its start): each row accepts its own share of its drafts.
PROMPTS = [[100 + 37 * i, 2000 + i, 300 + 5 * i, 400, 500] * 2 + [100 + 37 * i] for i in range(5)] + [[7, 8, 9, 10]]
# Per row: (num_tokens drafted a pass, max_tokens); None: the row does not speculate.
PLANS: list[tuple[int, int] | None] = [(6, 40), (6, 32), (3, 40), (4, 27), (6, 40), None]


def build_untied_llama(out: Path) -> Path:
    """A 2-layer llama of random weights (hidden 128, two heads of 64) with the default model's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.llama import Model, ModelArgs

    source = TEST_MODELS_DIR / DEFAULT_MODEL
    config = {
        "model_type": "llama",
        "hidden_size": 128,
        "num_hidden_layers": 2,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rms_norm_eps": 1e-5,
        "vocab_size": json.loads((source / "config.json").read_text())["vocab_size"],
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    }
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(config))
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InferenceEngine]:
    folder = build_untied_llama(tmp_path_factory.mktemp("specq") / "tiny-specq")
    eng = InferenceEngine(EngineOptions(folder.parent, max_batch=8, max_queue=8, backend="mlx", kv_bits=8))
    eng.start()
    assert eng.load_model(str(folder), trusted=True).result(timeout=120).kv_bits == 8
    eng.prompt_cache_enabled = False  # every wave prefills its prompts: the two waves differ only in speculation
    yield eng
    eng.shutdown()


def wave(engine: InferenceEngine, speculate: bool) -> list[tuple[list[int], str | None]]:
    """PROMPTS sent at once (one batch), greedy; each row's tokens and finish reason."""

    def one(row: int) -> tuple[list[int], str | None]:
        plan = PLANS[row]
        request = GenerationRequest(
            model="tiny-specq",
            prompt_tokens=PROMPTS[row],
            max_tokens=plan[1] if plan else 24,
            sampling=SamplingParams(temperature=0),
            speculative=SpeculativeParams(num_tokens=plan[0], lookup_min=1) if plan and speculate else None,
        )
        tokens: list[int] = []
        finish = None
        for event in engine.submit(request):
            assert event.error is None, event.error
            tokens += event.token_ids
            finish = event.finish_reason or finish
        return tokens, finish

    return at_once(one, len(PROMPTS), 120)


def test_a_quantized_batch_speculates_at_full_width_with_the_plain_answers(
    engine: InferenceEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row's answer and finish reason with prompt lookup is the plain decoding's; verification
    passes drafted for several rows at once (a batch held to one speculating sequence has exactly
    1 a pass), some drafts were rejected, and in some pass the rows kept different numbers of tokens."""
    plain = wave(engine, speculate=False)
    kept_counts: list[list[int]] = []
    real = speculative.repad

    def spy(caches: list[Any], fed: int, kept: list[int]) -> None:
        kept_counts.append(list(kept))
        real(caches, fed, kept)

    monkeypatch.setattr(speculative, "repad", spy)
    before = engine.stats()
    fast = wave(engine, speculate=True)
    after = engine.stats()
    assert fast == plain
    assert [len(tokens) for tokens, _ in plain] == [plan[1] if plan else 24 for plan in PLANS]
    passes = after.speculative_passes_total - before.speculative_passes_total
    rows = after.speculative_rows_total - before.speculative_rows_total
    drafted = after.speculative_drafted_total - before.speculative_drafted_total
    accepted = after.speculative_accepted_total - before.speculative_accepted_total
    assert passes > 0 and rows / passes > 1.5, (passes, rows)
    assert 0 < accepted < drafted, (drafted, accepted)
    assert any(len(set(kept)) > 2 for kept in kept_counts if len(kept) > 3), kept_counts
