"""Settings reach the engine's loaders and the llama.cpp backend as they were given to
``create_app({...})``: nothing under engine/ reads the environment (engine/options.py).

Before, the loaders and the llama.cpp backend read ``Settings()`` from the environment themselves,
so an override in ``create_app``'s mapping never reached them: here the environment says the
opposite of the mapping, and the mapping must win."""

from __future__ import annotations

from pathlib import Path

import pytest

from gerdsen_ai_server.app import create_app
from gerdsen_ai_server.engine.backends import llamacpp_sizing
from gerdsen_ai_server.engine.formats import context as model_context
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.engine.options import BackendOptions, InvalidLoadOption, LoadOptions
from gerdsen_ai_server.schemas.models import MAX_CHAT_TEMPLATE_CHARS
from gerdsen_ai_server.services import services
from gerdsen_ai_server.store.default_model import default_gguf_path


def test_create_app_overrides_reach_the_loader_not_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMPETUS_BACKEND", "llamacpp")  # what the environment says: run GGUFs on llama.cpp
    monkeypatch.setenv("IMPETUS_MAX_BATCH", "7")
    monkeypatch.setenv("IMPETUS_CONTEXT_LENGTH", "2048")
    models = tmp_path / "models"
    models.mkdir()
    gguf = tmp_path / "user-model.gguf"
    gguf.symlink_to(default_gguf_path())
    app = create_app(
        {
            "default_model": "",
            "models_dir": models,
            "backend": "mlx",
            "max_batch": 3,
            "llamacpp_threads": 1,
            "context_length": 1024,
            "log_level": "warning",
        }
    )
    engine = services(app).engine
    try:
        loader = engine.registry.loader
        assert loader.options == BackendOptions(backend="mlx", sequences=3, llamacpp_threads=1, context_length=1024)
        # IMPETUS_BACKEND=llamacpp in the environment would run the GGUF as is; the mapping's mlx converts it.
        resolved = loader.resolve(str(gguf), models, trusted=True)  # as the operator's --model names it
        assert resolved.is_dir() and loader.detect(resolved) == "mlx"
        # The llama.cpp sizing of a GGUF counts the mapping's max_batch slots of its context_length (1024)
        # of KV cache, not the environment's 7 slots of 2048.
        meta = read_gguf_header(gguf).metadata
        assert loader.context_of(gguf) == 1024
        assert loader.estimate_bytes(gguf, None) == gguf.stat().st_size + llamacpp_sizing.kv_bytes(meta, 3 * 1024)
    finally:
        engine.shutdown()


def test_the_context_length_rule() -> None:
    """A load's own length is bounded by the trained one (a 400 naming it beyond), or by the scaled
    one when the load opts into the RoPE scaling the model declares; the server default is clamped."""
    plain = model_context.from_config({"max_position_embeddings": 512})
    assert (plain.trained, plain.scaled) == (512, None)
    assert plain.effective(0, 0, False) == 512 and plain.effective(100, 4096, False) == 100
    assert plain.effective(0, 4096, False) == 512  # IMPETUS_CONTEXT_LENGTH above the model's: clamped (Ollama)
    with pytest.raises(InvalidLoadOption) as info:
        plain.effective(513, 0, False)
    assert info.value.param == "context_length" and "512" in str(info.value)
    with pytest.raises(InvalidLoadOption) as info:
        plain.effective(0, 0, True)  # nothing declared to opt into
    assert info.value.param == "rope_scaling"

    linear = model_context.from_config(
        {"max_position_embeddings": 512, "rope_scaling": {"type": "linear", "factor": 4}}
    )
    assert (linear.trained, linear.scaled, linear.scaling) == (512, 2048, "linear")
    with pytest.raises(InvalidLoadOption, match="rope_scaling: true"):
        linear.effective(1024, 0, False)  # beyond the trained length without opting in
    assert linear.effective(1024, 0, True) == 1024 and linear.effective(0, 0, True) == 2048
    with pytest.raises(InvalidLoadOption):
        linear.effective(2049, 0, True)

    # vLLM's derivation: yarn scales the original length; llama3 already counts it in max_position_embeddings.
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert model_context.from_config({"max_position_embeddings": 32768, "rope_scaling": yarn}).scaled == 131072
    llama3 = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}
    assert model_context.from_config({"max_position_embeddings": 131072, "rope_scaling": llama3}).scaled == 131072
    nested = {"text_config": {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "dynamic", "factor": 2}}}
    assert model_context.from_config(nested).scaled == 8192

    gguf = model_context.from_gguf(
        {"general.architecture": "qwen2", "qwen2.context_length": 32768, "qwen2.rope.scaling.type": "yarn",
         "qwen2.rope.scaling.factor": 4.0, "qwen2.rope.scaling.original_context_length": 32768}
    )  # fmt: skip
    assert (gguf.trained, gguf.scaled) == (32768, 131072)
    assert model_context.from_gguf(read_gguf_header(default_gguf_path()).metadata) == model_context.ModelContext(8192)


def test_load_options_refuse_what_cannot_be_a_load() -> None:
    with pytest.raises(ValueError, match="context_length"):
        LoadOptions(context_length=-1)
    with pytest.raises(ValueError, match="chat_template"):
        LoadOptions(chat_template="x" * (MAX_CHAT_TEMPLATE_CHARS + 1))
    assert LoadOptions(alias="a").is_default and not LoadOptions(context_length=1).is_default
