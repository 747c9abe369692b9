"""GET /api/models/discover on a CPU under IMPETUS_BACKEND=auto: each recommendation's memory in the dtype it
would compute in here, and the GGUF build beside the MLX repo, first and marked faster (serving/discover.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gerdsen_ai_server.engine.backends.choice import choose


def test_catalogue_cards_say_what_each_build_takes_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gerdsen_ai_server.app import create_app
    from gerdsen_ai_server.services import services

    here = choose("auto")
    if here.gguf != "llamacpp" or here.mlx_device != "cpu":
        pytest.skip(f"GGUF files run on llama.cpp and MLX on a CPU only where both hold ({here.reason})")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the catalogue, never the hub
    settings = {"default_model": "", "models_dir": tmp_path, "backend": "auto", "memory_budget": 6_000_000_000}
    app = create_app({**settings, "context_length": 4096, "max_batch": 2, "log_level": "warning"})
    try:
        body = app.test_client().get("/api/models/discover?q=qwen3").get_json()
        seeing = app.test_client().get("/api/models/discover?q=gemma-3-4b").get_json()
    finally:
        services(app).engine.shutdown()
    cards = {(m["id"], m["format"]): m for m in body["data"]}
    assert [m["format"] for m in body["data"]] == ["gguf", "mlx"] * 4  # each GGUF first, beside its MLX repo
    small = cards["mlx-community/Qwen3-0.6B-4bit", "mlx"]
    # float32 weights (0.6 B x 4 bytes) and a float32 KV cache of 4,096 tokens fit 6 GB: dequantized
    assert (small["compute_dtype"], small["memory_bytes"], small["fits"]) == ("float32", 596_000_000 * 4, True)
    big = cards["mlx-community/Qwen3-8B-4bit", "mlx"]
    # float32 would take 33 GB: it stays 4-bit, its scales float32 (+1/16 byte a parameter), and fits
    stays = 4_620_000_000 + 8_190_000_000 // 16
    assert (big["compute_dtype"], big["memory_bytes"], big["fits"]) == ("quantized-float32", stays, True)
    assert "over the 5.59 GiB budget left" in big["memory_note"], big["memory_note"]
    gguf = cards["bartowski/Qwen_Qwen3-8B-GGUF", "gguf"]
    kv = 2 * 36 * 8 * 128 * 2 * 4096 * 2  # K and V, 36 layers of 8 heads of 128, 2 slots of 4,096 tokens, f16
    assert gguf["memory_bytes"] == 5_030_000_000 + kv and gguf["fits"] is False
    assert (gguf["backend"], gguf["faster"], gguf["file"]) == ("llamacpp", True, "Qwen_Qwen3-8B-Q4_K_M.gguf")
    assert gguf["quantization"] == "Q4_K_M" and gguf["context_length"] == 4096
    assert not any(m["faster"] for m in body["data"] if m["format"] == "mlx")
    # A vision GGUF (issue 30): its projector is pulled beside it, so its memory counts the mmproj file too.
    gemma = {m["format"]: m for m in seeing["data"]}
    assert gemma["gguf"]["vision"] and gemma["mlx"]["vision"]
    kv = 2 * 34 * 4 * 256 * 2 * 4096 * 2  # 34 layers of 4 KV heads of 256, 2 slots of 4,096 tokens, f16
    assert gemma["gguf"]["memory_bytes"] == 2_490_000_000 + 851_000_000 + kv
    assert "projector (mmproj)" in gemma["gguf"]["memory_note"]
