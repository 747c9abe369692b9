"""LoRA adapters (engine/formats/adapters.py): confined like a model, told apart from a model, and
applied with mlx-lm's own ``load_adapters`` only where every tensor fits."""

from __future__ import annotations

import os
import struct
from collections.abc import Generator
from pathlib import Path

import pytest

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.formats import adapters
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory
from gerdsen_ai_server.engine.options import LoadOptions
from gerdsen_ai_server.store.errors import ModelRefused, UnsupportedModelFormat
from tests.support.gguf import write_gguf
from tests.support.lora import build_tiny_adapter
from tests.support.models import default_model_folder
from tests.support.tiny_models import build_tiny_llama


def drain(steps: Generator[None, None, LoadedModel]) -> LoadedModel:
    """Run a load's steps to the end, as the engine thread does."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapter-models")
    tokenizer = default_model_folder()
    build_tiny_llama(root / "tiny", tokenizer)
    build_tiny_llama(root / "narrow", tokenizer, hidden=32)
    build_tiny_adapter(root / "tiny-lora", root / "tiny")
    build_tiny_adapter(root / "narrow-lora", root / "narrow")
    write_gguf(root / "lora.gguf", {"general.type": "adapter", "general.architecture": "llama"}, {})
    return root


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Path:
    return build_tiny_adapter(tmp_path_factory.mktemp("elsewhere") / "lora", models / "tiny")


def test_a_name_in_the_models_dir_is_located_and_told_apart(models: Path) -> None:
    assert adapters.locate("tiny-lora", models) == models / "tiny-lora"
    assert adapters.kind(models / "tiny-lora", "tiny-lora") == "mlx"
    assert adapters.locate("lora.gguf", models) == models / "lora.gguf"
    assert adapters.kind(models / "lora.gguf", "lora.gguf") == "gguf"
    with pytest.raises(UnsupportedModelFormat, match="is not a LoRA adapter"):
        adapters.locate("tiny", models)  # a model, not an adapter
    write_gguf(models / "model.gguf", {"general.type": "model", "general.architecture": "llama"}, {})
    with pytest.raises(UnsupportedModelFormat, match="is not a LoRA adapter"):
        adapters.locate("model.gguf", models)  # a GGUF model, not a GGUF LoRA
    listed = {p.name for p in models.iterdir() if adapters.is_adapter(p)}  # the listing's cheap look
    assert {"tiny-lora", "narrow-lora", "lora.gguf"} <= listed and not listed & {"tiny", "narrow", "model.gguf"}


def test_an_adapter_outside_the_models_dir_is_refused_like_a_model(models: Path, outside: Path) -> None:
    for spec in (str(outside), "../" + outside.parent.name + "/lora", "~/lora", ".hidden", "missing"):
        with pytest.raises(ModelRefused, match="does not exist or you do not have access") as caught:
            adapters.locate(spec, models)
        assert str(caught.value) == str(adapters.adapter_not_found(spec))  # one answer, no existence oracle
    assert adapters.locate(str(outside), models, allowed=[outside.parent]) == outside  # IMPETUS_MODEL_PATHS
    (models / "link-out").symlink_to(outside)
    try:
        with pytest.raises(ModelRefused):
            adapters.locate("link-out", models)
    finally:
        (models / "link-out").unlink()


def test_located_gives_the_engine_an_absolute_path_under_its_own_id(models: Path) -> None:
    options = adapters.located("tiny", LoadOptions(adapter="tiny-lora"), models, ())
    assert options is not None and options.alias == "tiny+tiny-lora"
    assert Path(options.adapter or "").is_absolute() and Path(options.adapter or "").name == "tiny-lora"
    preset = adapters.located("tiny", LoadOptions(adapter="tiny-lora", alias="coder"), models, ())
    assert preset is not None and preset.alias == "coder"
    assert adapters.located("tiny", LoadOptions(), models, ()) == LoadOptions()
    assert adapters.shown(options.adapter, models) == "tiny-lora"
    # The engine's own check accepts the absolute path inside the models dir, and counts its bytes.
    assert adapters.locate(options.adapter or "", models, again=True) == models / "tiny-lora"
    relative = Path(os.path.relpath(models))  # IMPETUS_MODELS_DIR=./models
    assert adapters.locate(options.adapter or "", relative, again=True).resolve() == (models / "tiny-lora").resolve()
    with pytest.raises(ModelRefused):  # a request's own absolute path, even inside the models dir, as for a model
        adapters.locate(options.adapter or "", models)
    loader = LoaderFactory()
    plain = loader.estimate_bytes(models / "tiny", None)
    weights = (models / "tiny-lora" / "adapters.safetensors").stat().st_size
    assert loader.estimate_bytes(models / "tiny", None, options) == plain + weights


def test_the_loader_applies_a_fitting_adapter_and_refuses_another_shape(models: Path) -> None:
    import mlx.core as mx

    loader = LoaderFactory()
    base = loader.load("tiny", models)
    options = adapters.located("tiny", LoadOptions(adapter="tiny-lora"), models, ())
    adapted = drain(loader.load_path_steps(models / "tiny", models, options=options))
    prompt = mx.array([[1, 2, 3, 4]])
    assert not mx.allclose(base.model(prompt), adapted.model(prompt), atol=1e-3).item()
    assert adapted.nbytes > base.nbytes
    wrong = adapters.located("tiny", LoadOptions(adapter="narrow-lora"), models, ())
    with pytest.raises(UnsupportedModelFormat, match="The adapter 'narrow-lora' does not fit this model") as caught:
        drain(loader.load_path_steps(models / "tiny", models, options=wrong))
    assert str(models) not in str(caught.value)
    gguf = adapters.located("tiny", LoadOptions(adapter="lora.gguf"), models, ())
    with pytest.raises(UnsupportedModelFormat, match="needs an mlx-lm adapter folder"):
        drain(loader.load_path_steps(models / "tiny", models, options=gguf))


def test_a_broken_adapter_config_is_a_clear_error(models: Path, tmp_path: Path) -> None:
    broken = models / "broken-lora"
    broken.mkdir(exist_ok=True)
    (broken / "adapters.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    (broken / "adapter_config.json").write_text('{"num_layers": 2, "lora_parameters": {"rank": 4}}')  # no scale
    options = adapters.located("tiny", LoadOptions(adapter="broken-lora"), models, ())
    with pytest.raises(UnsupportedModelFormat, match="does not fit this model"):
        drain(LoaderFactory().load_path_steps(models / "tiny", models, options=options))
