"""Convert a llama-architecture GGUF file into an MLX model folder mlx-lm can load.

MLX reads Q4_0/Q4_1/Q8_0 tensors straight into its own affine quantized
layout (``.weight`` packed uint32, ``.scales``, ``.biases``; group size 32), so
the conversion is a rename plus a few fixes, not a re-quantization.

The header is parsed in Python first (gguf_header.py): it gives clear errors (truncated file,
unknown architecture, unsupported tensor type) before MLX's C++ reader sees
the file, and it gives the metadata as plain Python values. The tokenizer is rebuilt from the
GGUF's vocabulary and merges (gguf_tokenizer.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

from gerdsen_ai_server.engine.formats.gguf_header import GGUFHeader, read_gguf_header
from gerdsen_ai_server.engine.formats.gguf_tokenizer import write_tokenizer
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID, default_gguf_path
from gerdsen_ai_server.store.errors import ModelLoadError, UnsupportedModelFormat

log = logging.getLogger(__name__)

# Types mx.load can read (checked with MLX 0.32): Q4_0/Q4_1/Q8_0 as MLX quantized
# arrays, F32/F16 as is; BF16 and the K-quants gguflib knows (Q2_K, Q4_K, Q6_K)
# dequantized to float16. Others (Q5_*, Q3_K, Q5_K, IQ*) make it fail.
_MLX_READABLE = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q4_K", "Q6_K"}

_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}  # nosec B105  # tensor names
# rope_freqs holds llama-3.1 rope scaling factors; mlx-lm recomputes rope itself.
_DROPPED = {"rope_freqs"}

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _check_supported(header: GGUFHeader, path: Path) -> None:
    arch = header.metadata.get("general.architecture")
    if arch != "llama":
        raise UnsupportedModelFormat(
            f"{path}: GGUF architecture {arch!r} is not supported (only 'llama'); "
            "use an MLX conversion of the model instead (python -m mlx_lm.convert --hf-path ...)"
        )
    bad = sorted({t for t in header.tensor_types.values() if t not in _MLX_READABLE})
    if bad:
        raise UnsupportedModelFormat(
            f"{path}: GGUF tensor type(s) {', '.join(bad)} cannot be read by MLX "
            f"(supported: {', '.join(sorted(_MLX_READABLE))}); pick a Q4_0, Q4_1 or Q8_0 file"
        )
    tok_model = header.metadata.get("tokenizer.ggml.model")
    if tok_model != "gpt2":
        raise UnsupportedModelFormat(
            f"{path}: tokenizer model {tok_model!r} is not supported (only byte-level BPE 'gpt2')"
        )


def _load_tensors(path: Path, scratch: Path) -> dict[str, Any]:
    import mlx.core as mx

    # MLX's gguflib opens the file read-write (mmap MAP_SHARED): a read-only file,
    # e.g. a root-installed site-package, fails with "gguf_init failed". Use a copy.
    source = path
    if not os.access(path, os.W_OK):
        source = scratch / "source.gguf"
        shutil.copyfile(path, source)
    try:
        # format="gguf" without return_metadata: the name -> array dict of mx.load's union
        return cast(dict[str, Any], mx.load(str(source), format="gguf"))
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"MLX could not read GGUF file {path}: {exc}") from exc
    finally:
        if source != path:
            source.unlink(missing_ok=True)


def _mlx_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{suffix}"
    if base in _TOP_NAMES:
        return f"{_TOP_NAMES[base]}.{suffix}"
    if base in _DROPPED:
        return None
    raise UnsupportedModelFormat(f"unexpected GGUF tensor {gguf_name!r} for a llama model")


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k row interleave (reshape(n_head, 2, d/2).swapaxes(1, 2)).

    The permutation is over output rows, so it applies unchanged to the packed
    quantized weight, the scales, the biases and a bias vector alike.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _convert_weights(tensors: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    import mlx.core as mx

    n_head = int(meta["llama.attention.head_count"])
    n_kv = int(meta.get("llama.attention.head_count_kv", n_head))
    out = {}
    for gname, w in tensors.items():
        name = _mlx_name(gname)
        if name is None:
            continue
        if ".self_attn.q_proj." in name:
            w = _unpermute(w, n_head)
        elif ".self_attn.k_proj." in name:
            w = _unpermute(w, n_kv)
        # float32 scales/biases/norms: MLX's CPU 4-bit matmul is ~30x slower with float16 scales.
        if name.endswith((".scales", ".biases")) or (w.ndim == 1 and mx.issubdtype(w.dtype, mx.floating)):
            w = w.astype(mx.float32)
        out[name] = w
    return out


def _f32(value: float) -> float:
    """GGUF stores float32; print 1e-05, not 9.999999747378752e-06."""
    return float(f"{value:.7g}")


def _build_config(meta: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    n_head = int(meta["llama.attention.head_count"])
    hidden = int(meta["llama.embedding_length"])
    eos = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": int(meta["llama.block_count"]),
        "intermediate_size": int(meta["llama.feed_forward_length"]),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", n_head)),
        "head_dim": int(meta.get("llama.attention.key_length", hidden // n_head)),
        "rms_norm_eps": _f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "vocab_size": int(meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "tie_word_embeddings": not any(k.startswith("lm_head.") for k in weights),
        "attention_bias": "model.layers.0.self_attn.q_proj.bias" in weights,
        "mlp_bias": False,
        "bos_token_id": int(meta.get("tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": sorted(set(eos)) if len(set(eos)) > 1 else (eos[0] if eos else None),
    }
    if meta.get("llama.rope.scaling.type") == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": float(meta["llama.rope.scaling.factor"])}
    # Default quantization read off a q_proj (llama.cpp often keeps the embedding at
    # 8 bits); mlx-lm infers each layer's own bits and group size from its shapes.
    for prefix in ("model.layers.0.self_attn.q_proj", "model.embed_tokens"):
        if f"{prefix}.scales" in weights:
            packed, groups = weights[f"{prefix}.weight"].shape[-1], weights[f"{prefix}.scales"].shape[-1]
            config["quantization"] = {"group_size": hidden // groups, "bits": packed * 32 // hidden}
            break
    return config


def is_converted(out_dir: Path) -> bool:
    return all((out_dir / f).is_file() for f in MODEL_FILES)


# Written into every staging folder before anything else, so a leftover of a killed conversion is
# known to be ours; it travels with the folder when it is renamed into place, marking it as ours.
STAGING_MARKER = ".impetus-conversion"
CONVERTED_DIR = Path(".impetus") / "converted"  # under the models dir: every converted user GGUF
_SAFE_STEM = re.compile(r"[^a-z0-9._-]+")


def converted_name(gguf_path: Path) -> str:
    """The folder name a GGUF converts into: its stem made safe, plus a hash of the file's identity.

    The stem is only a hint for people looking at the disk: a name like ``..gguf`` (stem ``.``)
    or one equal to an existing model folder must never address anything but a fresh folder of
    our own. The hash (resolved path, size, modification time) keeps two GGUFs with one stem
    apart and gives a changed file a new conversion rather than a stale one.
    """
    gguf_path = Path(gguf_path)
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    stem = _SAFE_STEM.sub("-", gguf_path.stem.lower()).strip(".-_")[:64] or "model"
    return f"{stem}-{digest}"


def converted_dir(gguf_path: Path, models_dir: Path) -> Path:
    """Where ``gguf_path`` converts to: ``models_dir/.impetus/converted/<stem>-<hash>``, checked to
    stay inside ``models_dir`` once symlinks are resolved (ModelLoadError otherwise)."""
    out_dir = Path(models_dir) / CONVERTED_DIR / converted_name(gguf_path)
    root = Path(models_dir).resolve()
    if not out_dir.resolve().is_relative_to(root) or out_dir.resolve() == root:
        raise ModelLoadError(
            "the converted-models folder (.impetus/converted) leaves the models dir; "
            "remove the symlink that sends it elsewhere"
        )
    return out_dir


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Inter-process lock (flock): two server processes starting together convert only once."""
    with open(lock_path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def convert_gguf_to_mlx(gguf_path: Path, out_dir: Path) -> Path:
    """Convert ``gguf_path`` into the MLX folder ``out_dir`` (once; later calls return it).

    Writes into a temporary sibling folder and renames it into place, so a crash
    never leaves a half-written model behind; a lock file next to ``out_dir``
    makes concurrent processes wait for one conversion instead of racing.
    Nothing but that staging folder (and leftovers of our own killed conversions) is ever
    removed: an ``out_dir`` that exists but is not a finished conversion is reported, not replaced.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.name in ("", ".", "..") or out_dir.resolve() == Path(out_dir.resolve().anchor):
        raise ModelLoadError(f"refusing to convert into {out_dir}: not a folder name of its own")
    if is_converted(out_dir):
        return out_dir
    _refuse_foreign(out_dir)  # before the lock file too: nothing is written beside a folder we may not touch
    if not gguf_path.is_file():
        raise ModelLoadError(f"GGUF file not found: {gguf_path}")
    header = read_gguf_header(gguf_path)
    _check_supported(header, gguf_path)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(out_dir.with_name(f".{out_dir.name}.lock")):
            if not is_converted(out_dir):  # the previous lock holder may have done it
                _convert_locked(gguf_path, header, out_dir)
    except OSError as exc:  # read-only or full models dir
        raise ModelLoadError(f"cannot write converted model to {out_dir}: {exc}") from exc
    return out_dir


def _ours(folder: Path) -> bool:
    """A real folder (not a symlink) that one of our conversions made: it holds our marker."""
    return folder.is_dir() and not folder.is_symlink() and (folder / STAGING_MARKER).is_file()


def _refuse_foreign(out_dir: Path) -> None:
    """ModelLoadError if ``out_dir`` exists (a folder, file or link) and no conversion of ours made it."""
    if os.path.lexists(out_dir) and not _ours(out_dir):
        raise ModelLoadError(
            f"{out_dir} exists but is not a complete converted model, and Impetus did not "
            "make it; move it away (or remove it) and load again"
        )


def _convert_locked(gguf_path: Path, header: GGUFHeader, out_dir: Path) -> None:
    import mlx.core as mx

    # Under the lock, staging folders of our name that carry our marker belong to killed conversions.
    for leftover in out_dir.parent.glob(f".{out_dir.name}.*.tmp"):
        if _ours(leftover):
            shutil.rmtree(leftover, ignore_errors=True)
    _refuse_foreign(out_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        (staging / STAGING_MARKER).write_text(json.dumps({"source": gguf_path.name}))
        weights = _convert_weights(_load_tensors(gguf_path, staging), header.metadata)
        config = _build_config(header.metadata, weights)
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        write_tokenizer(header.metadata, staging)
        _fsync_files(staging)  # the rename must not publish files still in the page cache only
        staging.chmod(0o755)  # mkdtemp makes it 0700; others (the server user) must read it
        _move_into_place(staging, out_dir)
    except ModelLoadError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"cannot convert {gguf_path}: {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was renamed into place


def _fsync_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _move_into_place(staging: Path, out_dir: Path) -> None:
    """Rename ``staging`` to ``out_dir``. An incomplete ``out_dir`` of our own (its files since
    deleted by hand) is renamed to a name in our staging namespace, then removed; anything else
    there was refused before the conversion started (_convert_locked)."""
    if _ours(out_dir):
        stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}.tmp")
        os.replace(out_dir, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.rename(staging, out_dir)  # never over a non-empty folder: that raises instead


def ensure_default_model(models_dir: Path) -> Path:
    """Return ``models_dir/DEFAULT_MODEL_ID`` (the embedded default model, store/default_model.py), converting the embedded GGUF the first time.

    Concurrent callers (two server processes) are serialised by the flock that
    ``convert_gguf_to_mlx`` takes on ``models_dir/.smollm2-135m-instruct.lock``;
    the loser finds the finished folder and converts nothing.
    """
    out_dir = Path(models_dir) / DEFAULT_MODEL_ID
    if is_converted(out_dir):  # fast path: no lock, no package lookup
        return out_dir
    return convert_gguf_to_mlx(default_gguf_path(), out_dir)
