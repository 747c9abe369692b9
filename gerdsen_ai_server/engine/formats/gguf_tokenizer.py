"""A GGUF's tokenizer as a Hugging Face one: its vocabulary, merges and chat template rebuilt.

Used twice: the conversion to MLX writes ``tokenizer.json`` + ``tokenizer_config.json`` into the
converted folder (gguf.py), and the llama.cpp backend loads the same files, cached beside the
models, with mlx-lm's wrapper (``load_tokenizer``), so chat templates (from the GGUF metadata),
tool calls, grammars (llguidance) and logprobs work exactly as on MLX.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from gerdsen_ai_server.store.errors import UnsupportedModelFormat

log = logging.getLogger(__name__)

# llama.cpp pre-tokenizer names that split digits one by one before GPT-2's regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "falcon3", "smaug-bpe"}
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

# The wrappers mlx-lm built, per process, by the GGUF file's identity and the end tokens: building one
# takes ~1 s for a 49k vocabulary (parsing tokenizer.json twice, a token map of every id), about a
# third of a llama.cpp load of the 135M model, paid again by every load of the same file (under
# another id, with other load options, after an unload). A few entries: each holds ~11 MB (49k vocabulary).
_BUILT: OrderedDict[tuple[str, int, int, tuple[int, ...]], Any] = OrderedDict()
_BUILT_MAX = 4
_built_lock = threading.Lock()


def _pre_tokenizer(pre: str | None) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _LLAMA3_PRE:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in (None, "default", "gpt2"):
        log.warning("GGUF pre-tokenizer %r unknown; using GPT-2's byte-level split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def write_tokenizer(meta: dict[str, Any], out: Path) -> None:
    """Rebuild a Hugging Face byte-level BPE tokenizer.json + tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    )
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()

    def name(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None

    bos, add_bos = name("bos"), bool(meta.get("tokenizer.ggml.add_bos_token", False))
    if add_bos and bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True) if ty == _CONTROL]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types, strict=True)
            if ty == _USER_DEFINED
        ]
    )
    tok.save(str(out / "tokenizer.json"))

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": name("eos"),
        "pad_token": name("padding") or name("eos"),
        "unk_token": name("unknown"),
        "add_bos_token": add_bos,
        "add_eos_token": False,  # nosec B105  # a tokenizer flag, not a password
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get("llama.context_length", 2048)),
    }
    if "tokenizer.chat_template" in meta:
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))


def load_tokenizer(gguf: Path, meta: dict[str, Any], cache_dir: Path) -> Any:
    """mlx-lm's TokenizerWrapper over the GGUF's vocabulary, merges and chat template (no MLX)."""
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedModelFormat(
            f"{gguf}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not "
            "supported (only byte-level BPE 'gpt2')"
        )
    stat = gguf.stat()
    eos = tuple(
        sorted({int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta})
    )
    key = (str(gguf.resolve()), stat.st_size, stat.st_mtime_ns, eos)
    with _built_lock:
        built = _BUILT.get(key)
        if built is not None:
            _BUILT.move_to_end(key)
    if built is None:
        built = _build(gguf, meta, cache_dir, stat, eos)
        with _built_lock:
            _BUILT[key] = built
            while len(_BUILT) > _BUILT_MAX:
                _BUILT.popitem(last=False)
    return _own_copy(built)


def _own_copy(wrapper: Any) -> Any:
    """A wrapper of its own over the same vocabulary: a load's chat template (loaders.py
    ``set_chat_template``) is set on the wrapper and the Hugging Face tokenizer it wraps, so each
    load gets shallow copies of both; the parsed vocabulary and token map stay shared, read-only."""
    mine = copy.copy(wrapper)
    mine._tokenizer = copy.copy(wrapper._tokenizer)
    return mine


def _build(gguf: Path, meta: dict[str, Any], cache_dir: Path, stat: os.stat_result, eos: tuple[int, ...]) -> Any:
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    folder = cache_dir / f"{gguf.stem.lower()}-{stat.st_size:x}-{int(stat.st_mtime):x}"
    if not (folder / "tokenizer.json").is_file():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        write_tokenizer(meta, staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process wrote it first
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
    return mlx_load_tokenizer(folder, eos_token_ids=list(eos) or None)
