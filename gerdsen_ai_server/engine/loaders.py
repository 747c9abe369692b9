"""Find, convert and load models: a model id or path in, an MLX model + tokenizer out.

Formats: MLX / Hugging Face safetensors folders load directly (BERT-family embedding
models as encoders, see encoder.py); GGUF files are
converted once into ``models_dir``; CoreML, ONNX and PyTorch checkpoints are
refused with a how-to-convert hint. Everything that touches MLX runs on the
caller's engine thread; nothing here starts a thread.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..default_model import DEFAULT_MODEL_ID, ensure_default_model
from .encoder import is_encoder, load_encoder
from .errors import ModelLoadError, ModelNotFound, UnsupportedModelFormat
from .gguf import convert_gguf_to_mlx

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CONTEXT_LENGTH = 2048

_CONVERT_HINT = (
    "convert the original Hugging Face model to MLX with "
    "`python -m mlx_lm.convert --hf-path <hf-repo-or-local-folder> --mlx-path <models_dir>/<name>` "
    "(add -q for 4-bit), then point IMPETUS_DEFAULT_MODEL at that folder"
)
# Suffix -> human name of formats we recognise but cannot run.
_FOREIGN = {
    ".mlmodel": "CoreML", ".mlpackage": "CoreML", ".onnx": "ONNX",
    ".bin": "PyTorch", ".pt": "PyTorch", ".pth": "PyTorch",
}


@dataclass
class LoadedModel:
    model_id: str
    path: Path
    model: Any
    tokenizer: Any
    context_length: int
    nbytes: int
    kind: str = "language"  # or "embedding": a BERT-family encoder that only serves /v1/embeddings


def _foreign(path: Path, kind: str) -> UnsupportedModelFormat:
    return UnsupportedModelFormat(f"{path} is a {kind} model, which Impetus cannot run; {_CONVERT_HINT}")


class LoaderFactory:
    """Stateless: detect a format, resolve a spec to an MLX folder, load it."""

    def detect(self, path: Path) -> str:
        """'mlx' for a config.json + *.safetensors folder; 'gguf' for a .gguf file or a folder holding one."""
        path = Path(path)
        if not path.exists():
            raise ModelNotFound(f"no model at {path}")
        if path.suffix.lower() in _FOREIGN:  # also .mlpackage, which is a folder
            raise _foreign(path, _FOREIGN[path.suffix.lower()])
        if path.is_file():
            return self._detect_file(path)
        return self._detect_folder(path)

    def _detect_file(self, path: Path) -> str:
        if path.suffix.lower() == ".gguf":
            return "gguf"
        if path.suffix.lower() == ".safetensors":
            raise UnsupportedModelFormat(
                f"{path} is a bare weights file; point at the folder that also holds its config.json")
        raise UnsupportedModelFormat(f"{path}: unknown model file type; expected an MLX folder or a .gguf file")

    def _detect_folder(self, path: Path) -> str:
        names = [p.name for p in path.iterdir()]
        suffixes = {Path(n).suffix.lower() for n in names}
        if ".safetensors" in suffixes:
            if "config.json" not in names:
                raise UnsupportedModelFormat(f"{path} holds .safetensors weights but no config.json")
            return "mlx"
        ggufs = [n for n in names if n.lower().endswith(".gguf")]
        if len(ggufs) == 1:
            return "gguf"
        if len(ggufs) > 1:
            raise UnsupportedModelFormat(f"{path} holds several .gguf files ({', '.join(sorted(ggufs))}); name one")
        for suffix, kind in _FOREIGN.items():
            if suffix in suffixes:
                raise _foreign(path, kind)
        raise ModelNotFound(f"{path} holds no model files (config.json + *.safetensors, or a .gguf)")

    def resolve(self, spec: str, models_dir: Path) -> Path:
        """Turn a model id, folder name under ``models_dir`` or path into an MLX folder path."""
        models_dir = Path(models_dir)
        if spec.strip().lower() == DEFAULT_MODEL_ID:
            return ensure_default_model(models_dir)
        path = self._locate(spec, models_dir)
        if self.detect(path) == "mlx":
            return path
        gguf = path if path.is_file() else next(p for p in path.iterdir() if p.name.lower().endswith(".gguf"))
        # Converted once; later starts find the cached folder.
        return convert_gguf_to_mlx(gguf, models_dir / gguf.stem.lower())

    @staticmethod
    def _locate(spec: str, models_dir: Path) -> Path:
        # Pulled models live in ``org--name`` folders, as the Hugging Face cache names them.
        candidates = [Path(spec).expanduser(), models_dir / spec, models_dir / spec.lower(),
                      models_dir / spec.replace("/", "--")]
        for candidate in candidates:
            if candidate.exists():
                return candidate
        raise ModelNotFound(
            f"model {spec!r} not found: not the default id {DEFAULT_MODEL_ID!r}, "
            f"not an existing path, and no folder {models_dir / spec}")

    def load(self, spec: str, models_dir: Path, compute_dtype: str | None = None) -> LoadedModel:
        """Resolve ``spec`` and load it with mlx-lm, optionally converting its weights' dtype.

        ``compute_dtype="float32"`` dequantizes quantized layers: on CPU with a
        fast BLAS, float32 matmuls beat MLX's 4-bit kernels for small models.
        """
        if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be None or one of {COMPUTE_DTYPES}, not {compute_dtype!r}")
        path = self.resolve(spec, models_dir)
        if is_encoder(path):
            encoder, encoder_tokenizer, max_tokens = load_encoder(path, compute_dtype)
            return LoadedModel(model_id=path.name, path=path, model=encoder, tokenizer=encoder_tokenizer,
                               context_length=max_tokens, nbytes=parameter_nbytes(encoder), kind="embedding")
        model, tokenizer = _mlx_load(path)
        if compute_dtype is not None:
            _apply_compute_dtype(model, compute_dtype)
        return LoadedModel(
            model_id=path.name,
            path=path,
            model=model,
            tokenizer=tokenizer,
            context_length=context_length(path),
            nbytes=parameter_nbytes(model),
        )


def _mlx_load(path: Path) -> tuple[Any, Any]:
    import mlx_lm

    try:
        # A local path: mlx_lm only goes to the Hugging Face hub for names that do not exist.
        return mlx_lm.load(str(path))
    except Exception as exc:  # anything (bad config, missing tensors, tokenizer) is a load error
        raise ModelLoadError(f"cannot load model from {path}: {type(exc).__name__}: {exc}") from exc


def _apply_compute_dtype(model: Any, compute_dtype: str) -> None:
    import mlx.core as mx
    from mlx_lm.utils import dequantize_model

    dtype = getattr(mx, compute_dtype)
    if compute_dtype == "float32":
        dequantize_model(model)  # replaces QuantizedLinear / QuantizedEmbedding in place
    model.set_dtype(dtype)  # floating parameters only; packed uint32 weights are left alone
    mx.eval(model.parameters())  # pay the conversion now, not on the first request


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
