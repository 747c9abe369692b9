"""The llama.cpp backend's tokenizer, rebuilt from a GGUF (engine/formats/gguf_tokenizer.py): built once
per file in a process, each load still its own."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.engine.formats.gguf_tokenizer import load_tokenizer
from gerdsen_ai_server.engine.formats.loaders import set_chat_template

MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_gguf_loaded_again_reuses_its_vocabulary_and_keeps_its_own_template(
    default_gguf: Path, tmp_path: Path
) -> None:
    """A second load of the same file (another id, other load options, a reload) used to build
    mlx-lm's wrapper again (~1 s of a ~3 s llama.cpp load of the 135M model): it shares the parsed
    vocabulary now, yet a chat template set on one load (a load option) stays that load's."""
    gguf = tmp_path / "model.gguf"
    shutil.copy(default_gguf, gguf)
    meta = read_gguf_header(gguf).metadata
    first = load_tokenizer(gguf, meta, tmp_path / "cache")
    second = load_tokenizer(gguf, meta, tmp_path / "cache")
    assert second is not first
    assert second._tokenizer._tokenizer is first._tokenizer._tokenizer  # the Rust tokenizer, parsed once

    set_chat_template(second, "{{ 'mine' }}")
    assert second.apply_chat_template(MESSAGES, tokenize=False) == "mine"
    assert first.apply_chat_template(MESSAGES, tokenize=False).startswith("<|im_start|>")
    assert first.encode("Hello, world") == second.encode("Hello, world")
    assert first.eos_token_ids == second.eos_token_ids and first.eos_token_ids

    stat = gguf.stat()
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file replaced: built anew
    third = load_tokenizer(gguf, meta, tmp_path / "cache")
    assert third._tokenizer._tokenizer is not first._tokenizer._tokenizer
    assert third.apply_chat_template(MESSAGES, tokenize=False).startswith("<|im_start|>")
