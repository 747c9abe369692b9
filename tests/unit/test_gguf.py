"""GGUF -> MLX conversion of the embedded default model, and its failure modes (real MLX)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from gerdsen_ai_server.engine.formats import gguf
from gerdsen_ai_server.engine.formats.gguf import convert_gguf_to_mlx, read_gguf_header
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, UnsupportedModelFormat

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def ask(model: Any, tokenizer: Any, messages: list[dict[str, str]], max_tokens: int = 30) -> tuple[str, Any]:
    import mlx_lm

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text, last = "", None
    for last in mlx_lm.stream_generate(model, tokenizer, prompt=prompt, max_tokens=max_tokens):
        text += last.text
    return text, last


@pytest.mark.slow
def test_default_model_answers_paris_and_stops_on_im_end(default_mlx: tuple[Any, Any]) -> None:
    model, tokenizer = default_mlx
    assert tokenizer.eos_token_ids == {tokenizer.convert_tokens_to_ids("<|im_end|>")}
    text, last = ask(model, tokenizer, QUESTION)
    assert "The capital of France is Paris." in text
    assert last.finish_reason == "stop"  # hit <|im_end|>, not max_tokens
    assert last.generation_tokens < 30


def test_converted_folder_layout(converted_default: Path) -> None:
    assert converted_default.name == DEFAULT_MODEL_ID
    config = json.loads((converted_default / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (9, 3, 30)
    assert config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True
    assert config["rms_norm_eps"] == 1e-5 and config["rope_theta"] == 100000.0
    assert config["quantization"] == {"group_size": 32, "bits": 4}
    weights = mx.load(str(converted_default / "model.safetensors"))
    # float32 scales: MLX's CPU quantized matmul is far slower with float16 ones.
    assert weights["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float32
    assert weights["model.layers.0.self_attn.q_proj.biases"].dtype == mx.float32
    assert weights["model.norm.weight"].dtype == mx.float32
    assert weights["model.layers.0.mlp.down_proj.weight"].dtype == mx.uint32
    tok_config = json.loads((converted_default / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    from mlx_lm.gguf import permute_weights  # what llama.cpp's convert does to q/k rows

    rows = mx.arange(2 * 64 * 5).reshape(2 * 64, 5)
    assert mx.array_equal(gguf._unpermute(permute_weights(rows, 2), 2), rows)


@pytest.mark.timing
def test_conversion_is_idempotent_and_leaves_no_temporaries(default_gguf: Path, converted_default: Path) -> None:
    stamp = (converted_default / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert convert_gguf_to_mlx(default_gguf, converted_default) == converted_default
    assert time.perf_counter() - start < 0.5
    assert (converted_default / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in converted_default.parent.iterdir() if p.name.endswith(".tmp")]


def test_tokenizer_round_trips(default_mlx: tuple[Any, Any]) -> None:
    _, tokenizer = default_mlx
    for text in ["Hello, world! 12345", "héllo 日本語 🙂\n\n  x", "def f(x):\n    return x"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode(" Paris") == [7042]
    assert tokenizer.encode("123") == [33, 34, 35]  # SmolLM2 splits digits one by one
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]


def test_chat_template_renders(default_mlx: tuple[Any, Any]) -> None:
    _, tokenizer = default_mlx
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("keep", [4096, 60_000_000])  # inside the header; inside the tensor data
def test_truncated_gguf_raises_model_load_error(tmp_path: Path, default_gguf: Path, keep: int) -> None:
    broken = tmp_path / "broken.gguf"
    with open(default_gguf, "rb") as src, open(broken, "wb") as dst:
        dst.write(src.read(keep))
    with pytest.raises(ModelLoadError, match="truncated"):
        convert_gguf_to_mlx(broken, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.gguf"]  # nothing half-written


@pytest.mark.parametrize("head", [b"", b"GGUF\x03\x00\x00\x00"])
def test_random_bytes_raise_model_load_error(tmp_path: Path, head: bytes) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(head + np.random.default_rng(0).bytes(8192))
    with pytest.raises(ModelLoadError):
        convert_gguf_to_mlx(junk, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_file_raises_model_load_error(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").touch()
    with pytest.raises(ModelLoadError):
        read_gguf_header(tmp_path / "empty.gguf")


def test_unsupported_architecture_is_named(make_gguf: Any) -> None:
    path = make_gguf("falcon.gguf", {"general.architecture": "falcon"}, {"x.weight": (0, 4, bytes(16))})
    with pytest.raises(UnsupportedModelFormat, match="falcon"):
        convert_gguf_to_mlx(path, path.with_suffix(""))


def test_unsupported_tensor_type_is_named(make_gguf: Any) -> None:
    path = make_gguf("q5k.gguf", {"general.architecture": "llama"}, {"x.weight": (13, 256, bytes(176))})
    with pytest.raises(UnsupportedModelFormat, match="Q5_K"):
        convert_gguf_to_mlx(path, path.with_suffix(""))


def test_read_only_gguf_is_converted_from_a_copy(
    tmp_path: Path, default_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLX's GGUF reader opens files read-write; a file we may not write (root-installed
    # package, non-root server) must still convert. As root, os.access says "writable".
    monkeypatch.setattr(gguf.os, "access", lambda path, mode: False)
    out = convert_gguf_to_mlx(default_gguf, tmp_path / "copy")
    assert gguf.is_converted(out)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["copy"]
    assert not list(out.glob("*.gguf"))


def test_missing_default_package_raises_model_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    import gerdsen_ai_server.store.default_model as default_model

    monkeypatch.setattr(default_model, "_DISTRIBUTION", "impetus-no-such-package")
    with pytest.raises(ModelNotFound, match="make run"):
        default_model.default_gguf_path()


def test_incomplete_output_folder_not_ours_is_left_alone(
    tmp_path: Path, default_gguf: Path, converted_default: Path
) -> None:
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # a crash of some older tool, not ours
    shutil.copy(converted_default / "tokenizer.json", out)
    # Issue 23: a conversion never deletes what it did not create; it says what is in the way.
    with pytest.raises(ModelLoadError, match="Impetus did not make it"):
        convert_gguf_to_mlx(default_gguf, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]
    assert (out / "config.json").read_text() == "{}"


def test_two_processes_convert_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path; from gerdsen_ai_server.engine.formats.gguf import ensure_default_model;"
        "print(ensure_default_model(Path(sys.argv[1])))"
    )
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=root, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(tmp_path / DEFAULT_MODEL_ID)] * 2
    assert gguf.is_converted(tmp_path / DEFAULT_MODEL_ID)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{DEFAULT_MODEL_ID}.lock", DEFAULT_MODEL_ID]
