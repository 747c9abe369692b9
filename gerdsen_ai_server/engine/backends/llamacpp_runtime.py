"""llama.cpp's process-wide set-up, done once before the first llama.cpp model: its backend initialised, its log through Python's logging."""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

log = logging.getLogger("gerdsen_ai_server.engine.backends.llamacpp")

_init_lock = threading.Lock()
_initialised = False


def init_once(lc: Any) -> None:
    """``llama_backend_init`` once per process (models load on the engine thread, tests beside it)."""
    global _initialised
    with _init_lock:
        if not _initialised:
            _silence_llama_log(lc)
            lc.llama_backend_init()
            _initialised = True


def _silence_llama_log(lc: Any) -> None:
    """llama.cpp logs every load to stderr; keep warnings and errors only, through Python's logging."""

    def forward(level: int, text: bytes, _user: Any) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    callback = lc.llama_log_callback(forward)  # the ctypes callback type around it

    _silence_llama_log.callback = callback  # type: ignore[attr-defined]  # keep it alive
    lc.llama_log_set(callback, ctypes.c_void_p(0))
