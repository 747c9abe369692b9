"""Impetus: an OpenAI-compatible LLM inference server over MLX."""

__version__ = "0.1.0"
