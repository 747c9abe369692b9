"""Exceptions raised while finding, converting or loading a model.

The server maps these to clear HTTP / start-up errors; none of them should
ever take the process down.
"""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model could not be loaded or converted (corrupt file, bad config, ...)."""


class UnsupportedModelFormat(ModelLoadError):
    """The model exists but is in a format, architecture or quantization we cannot run."""


class ModelNotFound(ModelLoadError):
    """No model exists at the given id or path."""


class ModelRefused(ModelNotFound):
    """A request's model spec that names nothing it may load (engine/loaders.py ``confine``): one
    uniform message, echoing the spec as sent and nothing of the host."""
