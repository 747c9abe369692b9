"""What kind of model a path holds, from its files alone (no MLX): 'mlx' (config.json +
*.safetensors) or 'gguf' (one .gguf file); CoreML, ONNX and PyTorch checkpoints are refused with a
how-to-convert hint. Used by the local scan (``impetus list``, /api/models) and the loaders."""

from __future__ import annotations

from pathlib import Path

from gerdsen_ai_server.store.errors import ModelNotFound, UnsupportedModelFormat

_CONVERT_HINT = (
    "convert the original Hugging Face model to MLX with "
    "`python -m mlx_lm.convert --hf-path <hf-repo-or-local-folder> --mlx-path <models_dir>/<name>` "
    "(add -q for 4-bit), then point IMPETUS_DEFAULT_MODEL at that folder"
)
# Suffix -> human name of formats we recognise but cannot run.
_FOREIGN = {
    ".mlmodel": "CoreML",
    ".mlpackage": "CoreML",
    ".onnx": "ONNX",
    ".bin": "PyTorch",
    ".pt": "PyTorch",
    ".pth": "PyTorch",
}


def _foreign(path: Path, kind: str) -> UnsupportedModelFormat:
    return UnsupportedModelFormat(f"{path} is a {kind} model, which Impetus cannot run; {_CONVERT_HINT}")


def is_mmproj(name: str) -> bool:
    """A GGUF file named as a multimodal projector (``mmproj-model-f16.gguf``, ``llava-mmproj-f16.gguf``):
    the vision half of the model beside it (engine/backends/llamacpp_vision.py), never a model of
    its own. LM Studio tells them apart by the same word in the name."""
    lower = name.lower()
    return lower.endswith(".gguf") and "mmproj" in lower


def detect_format(path: Path) -> str:
    """'mlx' for a config.json + *.safetensors folder; 'gguf' for a .gguf file or a folder holding one."""
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"no model at {path}")
    if path.suffix.lower() in _FOREIGN:  # also .mlpackage, which is a folder
        raise _foreign(path, _FOREIGN[path.suffix.lower()])
    if path.is_file():
        return _detect_file(path)
    return _detect_folder(path)


def _detect_file(path: Path) -> str:
    if is_mmproj(path.name):
        raise UnsupportedModelFormat(
            f"{path.name} is a multimodal projector (mmproj), not a model: put it in the folder of the "
            "model it belongs to, or name it in that model's load option 'mmproj'"
        )
    if path.suffix.lower() == ".gguf":
        return "gguf"
    if path.suffix.lower() == ".safetensors":
        raise UnsupportedModelFormat(
            f"{path} is a bare weights file; point at the folder that also holds its config.json"
        )
    raise UnsupportedModelFormat(f"{path}: unknown model file type; expected an MLX folder or a .gguf file")


def _detect_folder(path: Path) -> str:
    names = [p.name for p in path.iterdir()]
    suffixes = {Path(n).suffix.lower() for n in names}
    if ".safetensors" in suffixes:
        if "config.json" not in names:
            raise UnsupportedModelFormat(f"{path} holds .safetensors weights but no config.json")
        return "mlx"
    ggufs = [n for n in names if n.lower().endswith(".gguf") and not is_mmproj(n)]  # a projector goes with it
    if len(ggufs) == 1:
        return "gguf"
    if len(ggufs) > 1:
        raise UnsupportedModelFormat(f"{path} holds several .gguf files ({', '.join(sorted(ggufs))}); name one")
    for suffix, kind in _FOREIGN.items():
        if suffix in suffixes:
            raise _foreign(path, kind)
    raise ModelNotFound(f"{path} holds no model files (config.json + *.safetensors, or a .gguf)")


# Bytes per element of each safetensors dtype (the header names them), for memory estimates.
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
