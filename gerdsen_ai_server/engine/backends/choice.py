"""Which backend runs a GGUF under IMPETUS_BACKEND (auto: the faster one on this machine), and why.

Both backends can serve a GGUF (MLX after a one-time conversion, llama.cpp as the file is); only MLX
serves a safetensors folder. ``auto`` picks by where MLX computes: on a CPU (no Metal, no CUDA
build) llama.cpp decodes the embedded default model about 6x faster than MLX's fp32 + OpenBLAS path
(12.2 vs 73.6 tok/s at one stream, issue 28), so every GGUF, the default model included, goes to
llama.cpp; on Apple Silicon (Metal) and on MLX's CUDA build the default model stays on MLX, as
Ollama and LM Studio keep one engine per platform. A user's GGUF goes to llama.cpp wherever its
build can use the same processor MLX uses (a CPU, or a GPU it offloads to), else to MLX.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Literal

MlxDevice = Literal["cpu", "metal", "cuda"]
BackendName = Literal["mlx", "llamacpp"]


@dataclass(frozen=True)
class BackendChoice:
    """What IMPETUS_BACKEND means on this machine: /health's ``backend`` and the start-up line."""

    setting: str  # IMPETUS_BACKEND: auto, mlx or llamacpp
    default_model: BackendName  # where the embedded default model runs
    gguf: BackendName  # where any other GGUF file runs (an MLX folder always runs on MLX)
    mlx_device: MlxDevice  # where MLX computes here
    reason: str

    def line(self) -> str:
        """The start-up line's words: where each kind of model runs, and why."""
        return (
            f"backend (IMPETUS_BACKEND={self.setting}): the default model on {self.default_model}, "
            f"GGUF files on {self.gguf}, MLX folders on mlx; {self.reason}"
        )


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def mlx_device() -> MlxDevice:
    """Where MLX computes by default here, as bench/servers.py ``accelerator`` asks it."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    return "metal" if mx.metal.is_available() else "cuda"


def llamacpp_gpu() -> bool:
    """Whether this llama.cpp build offloads layers to a GPU (Metal on a Mac, CUDA where built so)."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def decide(setting: str, device: MlxDevice, installed: bool, gpu: bool) -> BackendChoice:
    """The choice for ``setting`` on a machine whose MLX computes on ``device``, with llama.cpp
    ``installed`` or not, offloading to a GPU (``gpu``) or not. Pure: tested for every machine."""
    if setting == "mlx":
        return BackendChoice(setting, "mlx", "mlx", device, "forced: every model on MLX, GGUF files converted")
    if setting == "llamacpp":
        return BackendChoice(setting, "llamacpp", "llamacpp", device, "forced: every GGUF file on llama.cpp")
    if not installed:
        why = "llama-cpp-python is not installed (make setup installs it), so GGUF files are converted to MLX"
        return BackendChoice(setting, "mlx", "mlx", device, why)
    if device == "cpu":
        why = (
            "MLX computes on the CPU here (no Metal, no CUDA build), and llama.cpp runs GGUF files, the default model included, "
            "about 6x faster than MLX's CPU backend"
        )
        return BackendChoice(setting, "llamacpp", "llamacpp", device, why)
    gpu_name = "Metal" if device == "metal" else "CUDA"
    if gpu:
        why = f"MLX runs the default model on the GPU ({gpu_name}); other GGUF files on llama.cpp, which offloads to it too"
        return BackendChoice(setting, "mlx", "llamacpp", device, why)
    why = (
        f"MLX runs on the GPU ({gpu_name}) and this llama.cpp build on the CPU only, so GGUF files are converted to MLX"
    )
    return BackendChoice(setting, "mlx", "mlx", device, why)


@functools.cache
def choose(setting: str) -> BackendChoice:
    """``decide`` for this machine: asked once per setting (the answer cannot change while running)."""
    if setting not in ("mlx", "llamacpp") and llamacpp_installed():
        device = mlx_device()
        return decide(setting, device, True, device != "cpu" and llamacpp_gpu())
    return decide(setting, mlx_device(), llamacpp_installed(), False)
