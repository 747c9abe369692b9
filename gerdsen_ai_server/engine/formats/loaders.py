"""Find, convert and load models: a model id or path in, an MLX model + tokenizer out.

Formats: MLX / Hugging Face safetensors folders load directly (safetensors.py; BERT-family
embedding models as encoders, see encoder.py); GGUF files run as they are on llama.cpp
(backends/llamacpp.py) or are converted once into ``models_dir/.impetus/converted`` (gguf.py),
as ``BackendOptions.backend`` (IMPETUS_BACKEND, handed in: never read here) says; CoreML, ONNX
and PyTorch checkpoints are refused with a how-to-convert hint. Everything that touches MLX runs
on the caller's engine thread; the only other thread is a helper that loads a tokenizer (no MLX).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine import attention, compiled, quantized_cache
from gerdsen_ai_server.engine.backends import llamacpp_lora, llamacpp_sizing, llamacpp_vision
from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.backends.llamacpp import LlamaCppBackend
from gerdsen_ai_server.engine.backends.llamacpp_sizing import kv_bytes
from gerdsen_ai_server.engine.formats import adapters, safetensors, vision
from gerdsen_ai_server.engine.formats import context as model_context
from gerdsen_ai_server.engine.formats.encoder import is_encoder, load_encoder
from gerdsen_ai_server.engine.formats.gguf import convert_gguf_to_mlx, converted_dir, ensure_default_model
from gerdsen_ai_server.engine.formats.gguf_f16 import ensure_default_f16
from gerdsen_ai_server.engine.formats.gguf_header import read_gguf_header
from gerdsen_ai_server.engine.formats.gguf_tokenizer import load_tokenizer
from gerdsen_ai_server.engine.formats.safetensors import context_length, parameter_nbytes
from gerdsen_ai_server.engine.options import BackendOptions, InvalidLoadOption, LoadOptions
from gerdsen_ai_server.store.default_model import DEFAULT_MODEL_ID, default_gguf_path
from gerdsen_ai_server.store.errors import ModelNotFound, UnsupportedModelFormat
from gerdsen_ai_server.store.formats import detect_format, is_mmproj
from gerdsen_ai_server.store.paths import confine, inside_any, model_not_found

log = logging.getLogger(__name__)

__all__ = ["COMPUTE_DTYPES", "LOAD_CHUNK_BYTES", "LoaderFactory", "context_length", "parameter_nbytes"]

COMPUTE_DTYPES = ("float32", "bfloat16", "float16", safetensors.QUANTIZED_FLOAT32)  # engine/dtype.py chooses
# Bytes of weights read or converted per load step (see LoaderFactory.load_steps): tens of ms on a CPU.
LOAD_CHUNK_BYTES = 16 << 20


class LoaderFactory:
    """Detect a format, resolve a spec to an MLX folder (or a GGUF for llama.cpp), load it.

    Holds nothing but its ``options`` (which backend runs a GGUF, how a llama.cpp model is sized),
    given by whoever read the settings (app.py through the engine's options, the CLI, a test).
    """

    def __init__(self, options: BackendOptions | None = None) -> None:
        self.options = options or BackendOptions()

    def estimate_bytes(self, path: Path, compute_dtype: str | None, options: LoadOptions | None = None) -> int:
        """Memory a resolved model will take once loaded: what the registry reserves while it loads.
        A GGUF (llama.cpp): the file plus the KV cache of its slots; a folder: its weights and tokenizer.
        Checks ``options``' context length first (``context_of``), before any room is made."""
        context = self.context_of(path, options)
        load = options or LoadOptions()
        if path.suffix.lower() == ".gguf":
            need = llamacpp_sizing.estimate_bytes(
                path, self.options.sequences, context, load.kv_bits_for(self.options.kv_bits)
            )
            mmproj = Path(load.mmproj) if load.mmproj else llamacpp_vision.find_mmproj(path)
            return need + adapters.estimate(options) + (mmproj.stat().st_size if mmproj else 0)
        weights = safetensors.estimate_bytes(path, compute_dtype)  # exactly what MLX will hold for them
        return weights + safetensors.tokenizer_bytes(path) + adapters.estimate(options)

    def context_of(self, path: Path, options: LoadOptions | None = None) -> int:
        """The context length a load of the resolved ``path`` gets: ``options.context_length``, else
        IMPETUS_CONTEXT_LENGTH, within the model's bound (formats/context.py, which says the rule);
        InvalidLoadOption (a 400 naming the option) beyond it."""
        options = options or LoadOptions()
        if path.suffix.lower() == ".gguf":
            declared = model_context.from_gguf(read_gguf_header(path).metadata)
        else:
            declared = model_context.from_folder(path)
        return declared.effective(options.context_length, self.options.context_length, options.rope_scaling)

    @staticmethod
    def detect(path: Path) -> str:
        """'mlx' or 'gguf': see store/formats.py ``detect_format``."""
        return detect_format(path)

    def resolve(
        self,
        spec: str,
        models_dir: Path,
        *,
        trusted: bool = False,
        allowed: Sequence[Path] = (),
        options: LoadOptions | None = None,
    ) -> Path:
        """Turn a model spec into the MLX folder (or, for llama.cpp, the GGUF file) to load.

        Untrusted (the default: every spec a request sends) resolves only to an entry of
        ``models_dir`` or a path under ``allowed`` (IMPETUS_MODEL_PATHS), see ``confine``;
        ``trusted`` (the operator's --model / IMPETUS_DEFAULT_MODEL, the CLI) may name any path.
        ``options.backend``, when set, decides for this load what IMPETUS_BACKEND decides otherwise.
        """
        models_dir = Path(models_dir)
        backend = (options.backend if options else None) or self.options.backend
        if options is not None and options.adapter is not None:  # confined like the model (adapters.py)
            adapters.locate(options.adapter, models_dir, trusted=trusted, allowed=allowed, again=True)
        if spec.strip().lower() == DEFAULT_MODEL_ID:
            if llamacpp_sizing.serves_gguf(True, backend):
                # IMPETUS_BACKEND=llamacpp: the shipped Q4_1 file as is; auto: f16, MLX's answers (gguf_f16.py)
                return default_gguf_path() if backend == "llamacpp" else ensure_default_f16(models_dir)
            return ensure_default_model(models_dir)
        path = self._locate(spec, models_dir) if trusted else confine(spec, models_dir, allowed)
        if self.detect(path) == "mlx":
            if options is not None and options.backend == "llamacpp":  # never silently on MLX instead
                raise InvalidLoadOption(
                    "backend is llamacpp, but this model is an MLX folder: llama.cpp runs GGUF files.", "backend"
                )
            return path
        models = (p for p in (path.iterdir() if path.is_dir() else ()) if p.suffix.lower() == ".gguf")
        gguf = path if path.is_file() else next(p for p in models if not is_mmproj(p.name))  # never the projector
        if not trusted and not inside_any(gguf, [models_dir, *allowed]):
            log.warning("refused model %r: %s links outside the models dir and IMPETUS_MODEL_PATHS", spec, gguf)
            raise model_not_found(spec)
        if llamacpp_sizing.serves_gguf(False, backend):
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
            f"not an existing path, and no folder {models_dir / spec}"
        )

    def load(
        self,
        spec: str,
        models_dir: Path,
        compute_dtype: str | None = None,
        *,
        trusted: bool = False,
        allowed: Sequence[Path] = (),
    ) -> LoadedModel:
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

    def load_steps(
        self,
        spec: str,
        models_dir: Path,
        compute_dtype: str | None = None,
        chunk_bytes: int = LOAD_CHUNK_BYTES,
        *,
        trusted: bool = False,
        allowed: Sequence[Path] = (),
    ) -> Generator[None, None, LoadedModel]:
        """``load`` in steps: ``resolve`` now, then ``load_path_steps`` of what it resolved to."""
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, not {compute_dtype!r}")
        path = self.resolve(spec, models_dir, trusted=trusted, allowed=allowed)
        return self.load_path_steps(path, models_dir, compute_dtype, chunk_bytes)

    def load_path_steps(
        self,
        path: Path,
        models_dir: Path,
        compute_dtype: str | None = None,
        chunk_bytes: int = LOAD_CHUNK_BYTES,
        *,
        options: LoadOptions | None = None,
    ) -> Generator[None, None, LoadedModel]:
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
        options = options or LoadOptions()
        steps = self._load_path_steps(Path(path), Path(models_dir), compute_dtype, chunk_bytes, options)
        return with_load_options(steps, self.context_of(Path(path), options), options)

    def _load_path_steps(
        self, path: Path, models_dir: Path, compute_dtype: str | None, chunk_bytes: int, options: LoadOptions
    ) -> Generator[None, None, LoadedModel]:
        adapter = adapters.for_load(options, models_dir, path)  # a LoRA adapter that fits the backend, or None
        if path.suffix.lower() == ".gguf":  # resolved to a GGUF: the llama.cpp backend
            loaded = load_gguf(  # with its projector, when it has one (an mmproj beside it)
                path,
                path.name,
                models_dir / ".impetus" / "llamacpp-tokenizers",
                self.options,
                self.context_of(path, options),
                options.kv_bits_for(self.options.kv_bits),
                Path(options.mmproj) if options.mmproj else llamacpp_vision.find_mmproj(path),  # located already
            )
            return llamacpp_lora.apply(loaded, adapter, models_dir) if adapter else loaded  # a GGUF LoRA
        # These two cast floating tensors only (a quantized model's packed weights stay): float32 there is
        # what quantized-float32 asks (engine/dtype.py).
        cast = "float32" if compute_dtype == safetensors.QUANTIZED_FLOAT32 else compute_dtype
        if options.mmproj:  # never silently without the projector it asked for
            raise InvalidLoadOption("mmproj: a projector goes with a GGUF model run by llama.cpp.", "mmproj")
        if vision.is_vision_folder(path):  # a vision-language model: mlx-vlm (formats/vision.py)
            vision.refuse_options(adapter is not None, options.kv_bits)
            return vision.load_vision(path, cast)
        if is_encoder(path):
            encoder, encoder_tokenizer, max_tokens = load_encoder(path, cast)
            return LoadedModel(
                model_id=path.name,
                path=path,
                model=encoder,
                tokenizer=encoder_tokenizer,
                context_length=max_tokens,
                nbytes=parameter_nbytes(encoder) + safetensors.tokenizer_bytes(path),
                kind="embedding",
            )
        model, tokenizer = yield from safetensors.load_steps(path, compute_dtype, chunk_bytes)
        model = adapters.apply_mlx(model, adapter, models_dir) if adapter else model
        attention.install(model)  # a CPU prompt chunk's attention in NumPy (engine/attention.py)
        compiled.compile_decode(model)  # a CPU float32 llama's one-token steps compiled (engine/compiled.py)
        return LoadedModel(
            model_id=path.name,
            path=path,
            model=model,
            tokenizer=tokenizer,
            context_length=context_length(path),
            nbytes=parameter_nbytes(model) + safetensors.tokenizer_bytes(path),  # what estimate_bytes charges
            kv_bits=quantized_cache.bits_for(model, options.kv_bits, self.options.kv_bits),  # a 400 if it can't
        )


def load_gguf(
    path: Path,
    model_id: str,
    cache_dir: Path,
    options: BackendOptions,
    context: int,
    kv_bits: int = 0,
    mmproj: Path | None = None,
) -> LoadedModel:
    """A ``LoadedModel`` whose ``model`` is a running ``LlamaCppBackend`` (``backend`` 'llamacpp'),
    each slot with ``context`` cells (the effective context length, ``context_of``), its KV cache
    quantized by ``kv_bits`` (0: f16; the load's own or IMPETUS_KV_BITS), and the projector
    ``mmproj`` when it has one (llamacpp_vision.py ``find_mmproj``, or the load option): then it
    takes images."""
    meta = read_gguf_header(path).metadata
    if meta.get("general.architecture") == "clip":  # a projector named as a model: never loaded as one
        raise UnsupportedModelFormat(f"{path.name} is a multimodal projector (mmproj), not a model")
    tokenizer = load_tokenizer(path, meta, cache_dir)
    backend = LlamaCppBackend(
        path,
        tokenizer,
        n_seq=options.sequences,
        slot_ctx=context,
        n_threads=options.llamacpp_threads or None,
        kv_cache_bytes=kv_bytes(meta, context * options.sequences, kv_bits),
        kv_bits=kv_bits,
        mmproj=mmproj,
    )
    return LoadedModel(
        model_id=model_id,
        path=path,
        model=backend,
        tokenizer=tokenizer,
        context_length=context,
        nbytes=backend.nbytes,
        backend="llamacpp",
        kv_bits=kv_bits,
    )


def with_load_options(
    steps: Generator[None, None, LoadedModel], context: int, options: LoadOptions
) -> Generator[None, None, LoadedModel]:
    """``steps``, then what ``options`` change in the loaded model: its context length (a dedicated
    embedding model keeps its own input bound when smaller) and its chat template."""
    loaded = yield from steps
    loaded.context_length = min(context, loaded.context_length) if loaded.kind == "embedding" else context
    if options.chat_template is not None:
        set_chat_template(loaded.tokenizer, options.chat_template)
    return loaded


def set_chat_template(tokenizer: Any, template: str) -> None:
    """Replace a tokenizer's chat template (checked by serving/load_options.py before the load).
    mlx-lm's ``TokenizerWrapper`` (both backends' tokenizers, llama.cpp's rebuilt from the GGUF by
    gguf_tokenizer.py) renders through the Hugging Face tokenizer it wraps, unless mlx-lm gave it a
    template written in Python, which the override replaces too."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    hf.chat_template = template
    if hasattr(tokenizer, "_chat_template"):
        tokenizer._chat_template = None
    tokenizer.has_chat_template = True
