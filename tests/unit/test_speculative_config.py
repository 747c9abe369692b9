"""Which speculative decoding a request gets (serving/generation.py ``speculative_params``): its own
``speculative_config`` (vLLM's names), else IMPETUS_SPECULATIVE; MLX models only, a 400 naming the
field when asked for on llama.cpp; and presets take it as a request default."""

from __future__ import annotations

from pathlib import Path

import pytest

from gerdsen_ai_server.config import Settings
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.protocol import SpeculativeParams
from gerdsen_ai_server.errors import APIError
from gerdsen_ai_server.schemas.openai import ChatCompletionRequest
from gerdsen_ai_server.schemas.presets import Preset
from gerdsen_ai_server.schemas.speculative import parse_setting
from gerdsen_ai_server.serving.generation import speculative_params


def body(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def loaded(backend: str) -> LoadedModel:
    return LoadedModel("m", Path("."), None, None, 2048, 0, backend=backend)


def server(speculative: str) -> Settings:
    return Settings.model_construct(speculative=speculative, draft_model="")


def test_request_then_server_default() -> None:
    mine = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 2, "prompt_lookup_min": 1}
    assert speculative_params(body(speculative_config=mine), loaded("mlx"), server("off")) == SpeculativeParams(
        "ngram", 4, 2, 1
    )
    assert speculative_params(body(), loaded("mlx"), server("ngram:7")) == SpeculativeParams("ngram", 7, 3, 2)
    assert speculative_params(body(), loaded("mlx"), server("off")) is None
    assert speculative_params(body(speculative_config={"method": "none"}), loaded("mlx"), server("ngram")) is None
    # The server default applies where it can; a request's own on llama.cpp is refused, named.
    assert speculative_params(body(), loaded("llamacpp"), server("ngram")) is None
    with pytest.raises(APIError) as info:
        speculative_params(body(speculative_config={"method": "ngram"}), loaded("llamacpp"), server("off"))
    assert info.value.status == 400 and info.value.param == "speculative_config"
    # A draft model: the config's own, else IMPETUS_DRAFT_MODEL; neither is a 400 naming the field.
    with pytest.raises(APIError) as info:
        speculative_params(body(speculative_config={"method": "draft_model"}), loaded("mlx"), server("off"))
    assert info.value.status == 400 and info.value.param == "speculative_config.model"


def test_setting_and_preset() -> None:
    assert parse_setting("off") is None and parse_setting("ngram:3").num_speculative_tokens == 3  # type: ignore[union-attr]
    assert parse_setting("draft_model:4").method == "draft_model"  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="ngram"):
        parse_setting("draft")
    preset = Preset.model_validate(
        {"name": "p", "model": "m", "parameters": {"speculative_config": {"method": "ngram"}}}
    )
    assert preset.parameters.speculative_config is not None
