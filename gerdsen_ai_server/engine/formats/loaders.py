"""Find, convert and load models: a model id or path in, an MLX model + tokenizer out.

Formats: MLX / Hugging Face safetensors folders load directly (BERT-family embedding
models as encoders, see encoder.py); GGUF files are
converted once into ``models_dir/.impetus/converted``; CoreML, ONNX and PyTorch checkpoints are
refused with a how-to-convert hint. Everything that touches MLX runs on the
caller's engine thread; the only other thread is a helper that loads a tokenizer (no MLX).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.backends import llamacpp
from gerdsen_ai_server.engine.formats.encoder import is_encoder, load_encoder
from gerdsen_ai_server.engine.formats.gguf import convert_gguf_to_mlx, converted_dir, ensure_default_model
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID, default_gguf_path
from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound
from gerdsen_ai_server.store.formats import detect_format
from gerdsen_ai_server.store.paths import confine, inside_any, model_not_found

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CONTEXT_LENGTH = 2048
# Bytes of weights read or converted per load step (see LoaderFactory.load_steps): tens of ms on a CPU.
LOAD_CHUNK_BYTES = 16 << 20

@dataclass
class LoadedModel:
    model_id: str
    path: Path
    model: Any
    tokenizer: Any
    context_length: int
    nbytes: int
    kind: str = "language"  # or "embedding": a BERT-family encoder that only serves /v1/embeddings


class LoaderFactory:
    """Stateless: detect a format, resolve a spec to an MLX folder, load it."""

    @staticmethod
    def detect(path: Path) -> str:
        """'mlx' or 'gguf': see store/formats.py ``detect_format``."""
        return detect_format(path)

    def resolve(self, spec: str, models_dir: Path, *, trusted: bool = False,
                allowed: Sequence[Path] = ()) -> Path:
        """Turn a model spec into the MLX folder (or, for llama.cpp, the GGUF file) to load.

        Untrusted (the default: every spec a request sends) resolves only to an entry of
        ``models_dir`` or a path under ``allowed`` (IMPETUS_MODEL_PATHS), see ``confine``;
        ``trusted`` (the operator's --model / IMPETUS_DEFAULT_MODEL, the CLI) may name any path.
        """
        models_dir = Path(models_dir)
        if spec.strip().lower() == DEFAULT_MODEL_ID:
            if llamacpp.serves_gguf(is_default_model=True):  # IMPETUS_BACKEND=llamacpp
                return default_gguf_path()
            return ensure_default_model(models_dir)
        path = self._locate(spec, models_dir) if trusted else confine(spec, models_dir, allowed)
        if self.detect(path) == "mlx":
            return path
        gguf = path if path.is_file() else next(p for p in path.iterdir() if p.name.lower().endswith(".gguf"))
        if not trusted and not inside_any(gguf, [models_dir, *allowed]):
            log.warning("refused model %r: %s links outside the models dir and IMPETUS_MODEL_PATHS", spec, gguf)
            raise model_not_found(spec)
        if llamacpp.serves_gguf(is_default_model=False):
            return gguf  # runs as is on llama.cpp (engine/backends/llamacpp.py)
        # Converted once, into a folder of our own whose name the GGUF's name cannot steer
        # (models_dir/.impetus/converted/<stem>-<hash>); later loads find it there.
        return convert_gguf_to_mlx(gguf, converted_dir(gguf, models_dir))

    @staticmethod
    def _locate(spec: str, models_dir: Path) -> Path:
        """The operator's spec: a path anywhere (``~`` expanded), else a name in ``models_dir``."""
        # Pulled models live in ``org--name`` folders, as the Hugging Face cache names them.
        try:
            as_path = Path(spec).expanduser()
        except RuntimeError:  # ~user with no such user
            as_path = Path(spec)
        for candidate in (as_path, models_dir / spec, models_dir / spec.lower(), models_dir / spec.replace("/", "--")):
            if os.path.lexists(candidate):
                return candidate
        raise ModelNotFound(
            f"model {spec!r} not found: not the default id {DEFAULT_MODEL_ID!r}, "
            f"not an existing path, and no folder {models_dir / spec}")

    def load(self, spec: str, models_dir: Path, compute_dtype: str | None = None, *, trusted: bool = False,
             allowed: Sequence[Path] = ()) -> LoadedModel:
        """Resolve ``spec`` (see ``resolve``) and load it with mlx-lm, optionally converting its weights' dtype.

        ``compute_dtype="float32"`` dequantizes quantized layers: on CPU with a
        fast BLAS, float32 matmuls beat MLX's 4-bit kernels for small models.
        """
        steps = self.load_steps(spec, models_dir, compute_dtype, trusted=trusted, allowed=allowed)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]

    def load_steps(self, spec: str, models_dir: Path, compute_dtype: str | None = None,
                   chunk_bytes: int = LOAD_CHUNK_BYTES, *, trusted: bool = False,
                   allowed: Sequence[Path] = ()) -> Generator[None, None, LoadedModel]:
        """``load`` in steps: ``resolve`` now, then ``load_path_steps`` of what it resolved to."""
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, not {compute_dtype!r}")
        path = self.resolve(spec, models_dir, trusted=trusted, allowed=allowed)
        return self.load_path_steps(path, models_dir, compute_dtype, chunk_bytes)

    def load_path_steps(self, path: Path, models_dir: Path, compute_dtype: str | None = None,
                        chunk_bytes: int = LOAD_CHUNK_BYTES) -> Generator[None, None, LoadedModel]:
        """Load what ``resolve`` returned, in steps: a generator that does a bounded piece of the work
        (about ``chunk_bytes`` of weights read or converted) per ``next()`` and returns the ``LoadedModel``.

        Takes a resolved path, never a spec, so nothing a request sent is looked up again here.
        The engine thread interleaves these steps with decoding steps of the models already
        resident, so a load pauses them for one piece at a time, not for the whole load. The
        weights are mapped lazily (mlx-lm's ``lazy=True``) and evaluated piece by piece; the
        tokenizer loads meanwhile on a helper thread, which never touches MLX.
        """
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, not {compute_dtype!r}")
        return self._load_path_steps(Path(path), Path(models_dir), compute_dtype, chunk_bytes)

    def _load_path_steps(self, path: Path, models_dir: Path, compute_dtype: str | None,
                         chunk_bytes: int) -> Generator[None, None, LoadedModel]:
        if path.suffix.lower() == ".gguf":  # resolved to a GGUF: the llama.cpp backend
            return llamacpp.load(path, path.name, models_dir / ".impetus" / "llamacpp-tokenizers")
        if is_encoder(path):
            encoder, encoder_tokenizer, max_tokens = load_encoder(path, compute_dtype)
            return LoadedModel(model_id=path.name, path=path, model=encoder, tokenizer=encoder_tokenizer,
                               context_length=max_tokens, nbytes=parameter_nbytes(encoder), kind="embedding")
        model, tokenizer = yield from _mlx_load_steps(path, compute_dtype, chunk_bytes)
        return LoadedModel(
            model_id=path.name,
            path=path,
            model=model,
            tokenizer=tokenizer,
            context_length=context_length(path),
            nbytes=parameter_nbytes(model),
        )


def _load_error(path: Path, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"cannot load model from {path}: {type(exc).__name__}: {exc}")


def _mlx_load_steps(path: Path, compute_dtype: str | None, chunk_bytes: int) -> Generator[None, None, tuple[Any, Any]]:
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        # A local path: nothing here goes to the Hugging Face hub.
        model, config = load_model(path, lazy=True)
    except Exception as exc:  # anything (bad config, unreadable weights, missing tensors) is a load error
        raise _load_error(path, exc) from exc
    result: dict[str, Any] = {}

    def load_tok() -> None:  # tokenizers and transformers only: no MLX on this thread
        try:
            result["tokenizer"] = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
        except Exception as exc:
            result["error"] = exc

    helper = threading.Thread(target=load_tok, name="impetus-tokenizer-load", daemon=True)
    helper.start()
    try:
        yield from _materialize(model, compute_dtype, chunk_bytes)
    except Exception as exc:  # a truncated file fails here, when its bytes are read
        raise _load_error(path, exc) from exc
    while helper.is_alive():  # on a failure above it finishes alone: a daemon, holding nothing
        helper.join(0.005)
        yield
    if "error" in result:
        raise _load_error(path, result["error"]) from result["error"]
    return model, result["tokenizer"]


def _materialize(model: Any, compute_dtype: str | None, chunk_bytes: int) -> Generator[None, None, None]:
    """Evaluate a lazily loaded model's weights, converted to ``compute_dtype``, one bounded piece per step.

    The same result as ``dequantize_model`` (float32 only) + ``set_dtype`` + ``mx.eval``: the stored
    tensors are read a few at a time, then each converted tensor is computed in row blocks into
    its buffer (MLX updates the buffer in place, as nothing else holds it).
    """
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    from mlx_lm.utils import dequantize_model

    group: list[Any] = []
    for _, array in tree_flatten(model.parameters()):
        group.append(array)
        if sum(a.nbytes for a in group) >= chunk_bytes:
            mx.eval(group)
            group = []
            yield
    if group:
        mx.eval(group)
        yield
    if compute_dtype is None:
        return
    dtype = getattr(mx, compute_dtype)
    if compute_dtype == "float32":
        quantized = {name: (m.weight, m.scales, m.get("biases"), m.group_size, m.bits, m.mode)
                     for name, m in model.named_modules()
                     if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding, QuantizedSwitchLinear))}
        dequantize_model(model)  # new float modules, their weights still lazy (never evaluated)
        modules = dict(model.named_modules())
        for name, (w, scales, biases, group_size, bits, mode) in quantized.items():
            def dequantized(rows: slice, w: Any = w, scales: Any = scales, biases: Any = biases,
                            group_size: int = group_size, bits: int = bits, mode: str = mode) -> Any:
                return mx.dequantize(w[rows], scales[rows], None if biases is None else biases[rows],
                                     group_size, bits, mode).astype(dtype)

            modules[name].weight = yield from _in_row_blocks(dequantized, modules[name].weight.shape, dtype,
                                                             chunk_bytes)
    converted = []
    for name, array in tree_flatten(model.parameters()):
        if mx.issubdtype(array.dtype, mx.floating) and array.dtype != dtype:
            converted.append((name, (yield from _in_row_blocks(lambda rows, a=array: a[rows].astype(dtype),
                                                                array.shape, dtype, chunk_bytes))))
    if converted:
        model.update(tree_unflatten(converted))


def _in_row_blocks(compute: Any, shape: tuple[int, ...], dtype: Any, chunk_bytes: int) -> Generator[None, None, Any]:
    """``compute(slice(None))``, evaluated a block of leading-axis rows per step."""
    import math

    import mlx.core as mx

    rows = shape[0] if shape else 1
    row_bytes = max(1, math.prod(shape[1:]) * dtype.size)
    per_step = max(1, chunk_bytes // row_bytes)
    if rows <= per_step or not shape:
        out = compute(slice(None))
        mx.eval(out)
        yield
        return out
    # Allocating (and first touching) the whole buffer is itself one step.
    out = mx.zeros(shape, dtype=dtype)
    mx.eval(out)
    yield
    for start in range(0, rows, per_step):
        out[start:start + per_step] = compute(slice(start, start + per_step))
        mx.eval(out)
        yield
    return out


def parameter_nbytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def context_length(path: Path) -> int:
    """The model's trained context from config.json, or 2048 when it does not say."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return DEFAULT_CONTEXT_LENGTH
    for source in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(source.get(key), int) and source[key] > 0:
                return source[key]
    return DEFAULT_CONTEXT_LENGTH
