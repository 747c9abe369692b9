"""LoaderFactory: format detection, spec resolution and loading with real MLX."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.formats import safetensors
from gerdsen_ai_server.engine.formats.loaders import LoaderFactory, context_length
from gerdsen_ai_server.engine.options import BackendOptions
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, UnsupportedModelFormat

factory = LoaderFactory(BackendOptions(backend="mlx"))  # auto would run the default model on llama.cpp on a CPU


def answer(loaded: LoadedModel) -> str:
    import mlx_lm

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return mlx_lm.generate(loaded.model, loaded.tokenizer, prompt=prompt, max_tokens=12)


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("model.onnx", "ONNX"),
        ("pytorch_model.bin", "PyTorch"),
        ("model.pt", "PyTorch"),
        ("model.pth", "PyTorch"),
        ("Model.mlmodel", "CoreML"),
    ],
)
def test_foreign_files_are_refused_with_convert_hint(tmp_path: Path, name: str, kind: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"not a model")
    with pytest.raises(UnsupportedModelFormat, match=kind) as info:
        factory.detect(path)
    assert "python -m mlx_lm.convert --hf-path" in str(info.value)


def test_mlpackage_folder_is_coreml(tmp_path: Path) -> None:
    (tmp_path / "Model.mlpackage").mkdir()
    with pytest.raises(UnsupportedModelFormat, match="CoreML"):
        factory.detect(tmp_path / "Model.mlpackage")


def test_pytorch_folder_without_safetensors_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsupportedModelFormat, match="mlx_lm.convert"):
        factory.detect(tmp_path)


def test_missing_path_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        factory.detect(tmp_path / "nope")
    with pytest.raises(ModelNotFound, match="nope"):
        factory.resolve("nope", tmp_path)


def test_empty_folder_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound):
        factory.detect(tmp_path)


def test_detects_mlx_and_gguf(tmp_path: Path, converted_default: Path, default_gguf: Path) -> None:
    assert factory.detect(converted_default) == "mlx"
    assert factory.detect(default_gguf) == "gguf"
    (tmp_path / "one.gguf").touch()
    assert factory.detect(tmp_path) == "gguf"
    (tmp_path / "two.gguf").touch()
    with pytest.raises(UnsupportedModelFormat, match="several"):
        factory.detect(tmp_path)


def test_resolve_default_id_name_and_path(models_dir: Path, converted_default: Path) -> None:
    assert factory.resolve(DEFAULT_MODEL_ID, models_dir) == converted_default
    assert factory.resolve(DEFAULT_MODEL_ID.upper(), models_dir) == converted_default
    assert factory.resolve(str(converted_default), Path("/nonexistent"), trusted=True) == converted_default


def test_resolve_gguf_converts_once_into_models_dir(
    tmp_path: Path, default_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In auto mode a user's GGUF runs on llama.cpp as is; the options given say mlx, and the loader
    # never reads the environment (settings are handed down), so IMPETUS_BACKEND there changes nothing.
    monkeypatch.setenv("IMPETUS_BACKEND", "llamacpp")
    factory = LoaderFactory(BackendOptions(backend="mlx"))
    gguf = tmp_path / "My-Model.Q4_1.gguf"
    gguf.symlink_to(default_gguf)
    models = tmp_path / "models"
    first = factory.resolve(str(gguf), models, trusted=True)  # the operator's path (IMPETUS_DEFAULT_MODEL)
    # Into a folder of its own, named after the file and its identity (issue 23: never over a user's folder).
    assert first.parent == models / ".impetus" / "converted" and first.name.startswith("my-model.q4_1-")
    assert factory.detect(first) == "mlx"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert factory.resolve(str(gguf), models, trusted=True) == first  # cached, not converted again
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    (models / "mine.gguf").symlink_to(gguf)  # a request names entries of models_dir, but this one links out of it
    with pytest.raises(ModelNotFound):
        factory.resolve("mine.gguf", models)


def test_load_default_model(models_dir: Path, converted_default: Path) -> None:
    loaded = factory.load(DEFAULT_MODEL_ID, models_dir)
    assert loaded.model_id == DEFAULT_MODEL_ID
    assert loaded.path == converted_default
    assert loaded.context_length == 8192
    assert 100e6 < loaded.nbytes - safetensors.tokenizer_bytes(converted_default) < 130e6  # 4-bit, float32 scales
    assert "Paris" in answer(loaded)


def test_load_float32_dequantizes(models_dir: Path, converted_default: Path) -> None:
    loaded = factory.load(DEFAULT_MODEL_ID, models_dir, compute_dtype="float32")
    quantized = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    assert not [name for name, m in loaded.model.named_modules() if isinstance(m, quantized)]
    assert {v.dtype for _, v in tree_flatten(loaded.model.parameters())} == {mx.float32}
    assert loaded.nbytes > 500e6  # 135M parameters at 4 bytes
    assert "Paris" in answer(loaded)


def test_load_rejects_unknown_compute_dtype(models_dir: Path) -> None:
    with pytest.raises(ValueError, match="compute_dtype"):
        factory.load(DEFAULT_MODEL_ID, models_dir, compute_dtype="int8")


def test_broken_mlx_folder_raises_model_load_error_with_path(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match=str(folder)):
        factory.load(str(folder), tmp_path, trusted=True)


def test_context_length_falls_back_to_2048(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert context_length(tmp_path) == 2048
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 4096}}))
    assert context_length(tmp_path) == 4096


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16", None])
def test_load_in_steps_matches_a_whole_load(
    models_dir: Path, converted_default: Path, compute_dtype: str | None
) -> None:
    """What the engine interleaves with decoding: many bounded steps, the same weights as mlx-lm's
    eager load followed by the conversion (dequantize to float32, or cast)."""
    import mlx_lm
    from mlx_lm.utils import dequantize_model

    steps = factory.load_steps(DEFAULT_MODEL_ID, models_dir, compute_dtype=compute_dtype, chunk_bytes=1 << 20)
    count = 0
    while True:
        try:
            next(steps)
            count += 1
        except StopIteration as done:
            loaded: LoadedModel = done.value
            break
    # 1 MiB steps: reading the stored tensors is tens of steps, converting the embedding over a hundred.
    assert count > (100 if compute_dtype else 20), count
    model, _ = mlx_lm.load(str(converted_default))
    if compute_dtype == "float32":
        dequantize_model(model)
    if compute_dtype is not None:
        model.set_dtype(getattr(mx, compute_dtype))
    expected, got = dict(tree_flatten(model.parameters())), dict(tree_flatten(loaded.model.parameters()))
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and mx.array_equal(got[name], value).item(), name
    tokenizer = safetensors.tokenizer_bytes(converted_default)  # charged with the weights
    assert loaded.nbytes == sum(v.nbytes for v in expected.values()) + tokenizer


def test_truncated_weights_raise_model_load_error(tmp_path: Path, converted_default: Path) -> None:
    from tests.support.tiny_models import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "cut", converted_default)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header intact, data cut
    with pytest.raises(ModelLoadError, match="cut"):
        factory.load(str(folder), tmp_path, compute_dtype="float32")
