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
import re
import threading
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..default_model import DEFAULT_MODEL_ID, default_gguf_path, ensure_default_model
from .backends import llamacpp
from .encoder import is_encoder, load_encoder
from .errors import ModelLoadError, ModelNotFound, ModelRefused, UnsupportedModelFormat
from .gguf import convert_gguf_to_mlx, converted_dir

log = logging.getLogger(__name__)

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
DEFAULT_CONTEXT_LENGTH = 2048
# Bytes of weights read or converted per load step (see LoaderFactory.load_steps): tens of ms on a CPU.
LOAD_CHUNK_BYTES = 16 << 20

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
        if not trusted and not _inside_any(gguf, [models_dir, *allowed]):
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


# ---- untrusted specs: what a request's ``model`` may name -------------------------------------

MAX_SPEC_CHARS = 256  # longer than any file name a models dir can hold (255 bytes)
_NAME_CHARS = re.compile(r"[^\x00-\x1f\x7f\\]+")  # no control characters, no NUL, no backslash


def model_not_found(spec: str) -> ModelRefused:
    """The one refusal of a spec a request may not load: the same words whether nothing is there,
    the path is outside the models dir, or a symlink leaves it (no existence oracle), naming no
    host path (the spec is echoed as sent, never expanded)."""
    shown = spec if len(spec) <= 80 else spec[:77] + "..."
    return ModelRefused(f"The model '{shown}' does not exist or you do not have access to it: a request may "
                         "name a model in the models dir, or a path the operator listed in IMPETUS_MODEL_PATHS.")


def model_paths(setting: str) -> tuple[Path, ...]:
    """IMPETUS_MODEL_PATHS (comma-separated files or folders, ``~`` expanded) as absolute paths."""
    paths = []
    for item in setting.split(","):
        item = item.strip()
        if item:
            paths.append(Path(os.path.abspath(Path(item).expanduser())))
    return tuple(paths)


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, symlinks resolved, is ``root`` or under it (``root`` resolved too)."""
    try:
        return Path(os.path.realpath(path)).is_relative_to(os.path.realpath(root))
    except (OSError, ValueError):
        return False


def _inside_any(path: Path, roots: Sequence[Path]) -> bool:
    return any(_inside(path, root) for root in roots)


def plain_name(name: str) -> bool:
    """A model id as the models dir lists it: ``name`` or ``org/name``, no hidden or dot segment,
    no absolute path, no ``~``, no backslash, control character or NUL."""
    if not name or len(name) > MAX_SPEC_CHARS or not _NAME_CHARS.fullmatch(name) or name.startswith("~"):
        return False
    parts = name.split("/")
    return len(parts) <= 2 and all(part and not part.startswith(".") for part in parts)


MAX_FOLDER_ENTRIES = 10_000  # a model folder holds tens of files; a request may not make us walk a disk


def _links_outside(folder: Path, roots: Sequence[Path]) -> Path | None:
    """A symlink inside a model folder (symlinks resolved) whose target leaves ``roots``, else None;
    the folder itself when it holds more than MAX_FOLDER_ENTRIES entries (not a model folder)."""
    folder = Path(os.path.realpath(folder))
    if not folder.is_dir():
        return None
    for count, child in enumerate(folder.rglob("*")):  # never descends into symlinked folders: each is checked
        if count >= MAX_FOLDER_ENTRIES:
            return folder
        if child.is_symlink() and not _inside_any(child, roots):
            return child
    return None


def confine(spec: str, models_dir: Path, allowed: Sequence[Path] = ()) -> Path:
    """The entry of ``models_dir`` (or path under ``allowed``) an untrusted ``spec`` names, or
    ``model_not_found``.

    A request's ``model`` is a name, as GET /api/models lists them: ``name`` or ``org/name``
    (a pulled ``org--name`` folder) directly in the models dir; its target, symlinks resolved,
    must stay in the models dir (or an ``allowed`` path), and so must any symlink in a model
    folder. An absolute path is accepted only when it lies under an ``allowed`` entry, which
    only the operator can set (IMPETUS_MODEL_PATHS). ``~``, ``..``, hidden names, backslashes,
    control characters and NUL never resolve. The refusal is the same in every case, so it
    tells nothing about what exists on the host; the log says why, for the operator.
    """
    models_dir = Path(models_dir)
    roots = [models_dir, *allowed]
    name = spec  # as sent: "tiny\n" is not "tiny"
    found: Path | None = None
    if plain_name(name):
        for candidate in (models_dir / name.replace("/", "--"), models_dir / name.lower().replace("/", "--")):
            if os.path.lexists(candidate):
                found = candidate
                break
    elif allowed and name.startswith("/") and len(name) <= 4096 and _NAME_CHARS.fullmatch(name) \
            and ".." not in name.split("/"):
        path = Path(name)
        if os.path.lexists(path) and any(path.is_relative_to(root) for root in allowed):
            found = path
    if found is None:
        raise model_not_found(spec)
    if not _inside_any(found, roots) or os.path.realpath(found) == os.path.realpath(models_dir):
        log.warning("refused model %r: %s resolves outside the models dir and IMPETUS_MODEL_PATHS", spec, found)
        raise model_not_found(spec)
    if (link := _links_outside(found, roots)) is not None:
        log.warning("refused model %r: %s links outside the models dir and IMPETUS_MODEL_PATHS "
                    "(list its target there to allow it)", spec, link)
        raise model_not_found(spec)
    return found


def redact_paths(text: str, models_dir: Path, allowed: Sequence[Path] = ()) -> str:
    """``text`` with the host's paths replaced by names that tell a client nothing about the host:
    the models dir becomes ``<models_dir>``, each IMPETUS_MODEL_PATHS entry's folder ``<model_paths>``,
    the default model package's folder ``<default model package>``, the home folder ``~``.

    Applied to every load error that leaves the engine (HTTP answers, Socket.IO events); the log
    keeps the full text for the operator.
    """
    roots: list[tuple[str, str]] = []

    def add(path: Path | str, label: str) -> None:
        for form in {os.path.abspath(path), os.path.realpath(path)}:  # never a relative one: "models"
            if form.rstrip("/"):
                roots.append((form.rstrip("/"), label))

    add(models_dir, "<models_dir>")
    for entry in allowed:  # the entry's own name stays: it is what the request named
        add(entry.parent, "<model_paths>")
    try:
        add(default_gguf_path().parent, "<default model package>")
    except ModelLoadError:
        pass
    add(Path.home(), "~")
    for form, label in sorted(roots, key=lambda r: len(r[0]), reverse=True):
        text = re.sub(re.escape(form) + r"(?![\w.-])", label, text)  # "/m" is not the start of "/mnt"
    return text


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
