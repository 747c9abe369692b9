"""The engine's errors, in one module. Model errors (finding, converting, loading) are defined
in store/errors.py, beside the model store that raises most of them, and re-exported here."""

from __future__ import annotations

from gerdsen_ai_server.store.errors import ModelLoadError, ModelNotFound, ModelRefused, UnsupportedModelFormat

__all__ = ["ModelLoadError", "ModelNotFound", "ModelRefused", "UnsupportedModelFormat"]
