"""The contract between the engine and a backend that generates for one resident model.

A loader hands the engine a ``LoadedModel``; the engine opens a ``Backend`` for it (mlx.py wraps
mlx-lm's BatchGenerator, llamacpp.py runs a GGUF with llama.cpp, ``NoGeneration`` stands for an
embedding-only model) and from then on asks the backend, never its type: whether it steps on a
thread of its own (``capabilities.threaded``), whether it is busy, how many sequences it runs and
queues. Each backend turns its sampled tokens into events with the shared text step (text.py) and
reports the end of every request, and its counters, to the ``Host`` the engine gives it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.engine.stats import EngineStats


@dataclass
class LoadedModel:
    model_id: str
    path: Path
    model: Any  # the MLX module; for llama.cpp the running backend itself (its loader starts it)
    tokenizer: Any
    context_length: int
    nbytes: int
    kind: str = "language"  # or "embedding": a BERT-family encoder that only serves /v1/embeddings
    backend: str = "mlx"  # or "llamacpp": a GGUF run as is by llama.cpp (engine/backends/llamacpp.py)
    kv_bits: int = 0  # KV cache quantization in force (IMPETUS_KV_BITS, a load's kv_bits); 0: unquantized


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do, for the engine (``threaded``) and for the API layers to ask."""

    generation: bool = True  # False: the model only embeds
    threaded: bool = False  # steps on a thread of its own: admit from any thread, never stepped by the engine
    logprobs: bool = True  # per-token log-probabilities and top alternatives
    grammar: bool = True  # structured output (an llguidance grammar constrains sampling)
    logits_processors: bool = True  # any (tokens, logits) -> logits function, not only a grammar
    embeddings: bool = False  # /v1/embeddings from the model's hidden states
    prompt_cache: bool = True  # a prompt that starts like an earlier one reuses its KV cache
    vision: bool = False  # takes images (GenerationRequest.images): a vision-language model


@dataclass
class Host:
    """Where a backend reports: the engine's live counters, the end of each request (the engine's
    bookkeeping: counters, the request's place in the capacity), and use of its model (keep-alive
    counts from the last admission or answer). Called from the thread that steps the backend."""

    stats: EngineStats
    finish: Callable[[TokenStream, TokenEvent | None], None]
    touch: Callable[[], None]


class Backend(Protocol):
    """One resident model's generation. Every method but ``admit``, ``counts`` and ``busy`` runs on
    the thread that steps the backend: the engine thread, or the backend's own (``threaded``)."""

    name: str  # "mlx" | "llamacpp" | "none": LoadedModel.backend of the models it runs
    capabilities: Capabilities

    def bind(self, host: Host) -> None:
        """Report to ``host`` from now on (before any ``admit``)."""

    def admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        """Take ``request`` into the running batch (or its queue, when the batch is full); its
        events go to ``stream``. A request it cannot run is finished with an error event."""

    def step(self) -> None:
        """One decode step of every active sequence (and prefill of admitted prompts): each
        sequence's token goes through the text step into its stream; finished ones end."""

    def cancel(self) -> None:
        """Drop every sequence whose stream was cancelled (its client left): ended with no event."""

    def counts(self) -> tuple[int, int]:
        """(sequences decoding, sequences admitted but waiting): plain ints, safe from any thread."""

    @property
    def busy(self) -> bool:
        """Whether it holds any request: a busy model is neither stepped past nor unloaded."""

    @property
    def decode_seconds(self) -> float:
        """How long its last decode-only step took (0.0: none yet): what the admission window waits for."""

    @property
    def nbytes(self) -> int:
        """Memory it holds for the model (weights, and the KV cache it reserves), as the budget counts it."""

    def set_batch_limit(self, size: int) -> None:
        """Decode at most ``size`` sequences together from now on (the thermal cap, or max_batch)."""

    def abort(self, message: str) -> None:
        """Fail every request it holds with ``message`` (the engine is stopping)."""

    def close(self) -> None:
        """Free the model's memory (and stop its thread); nothing is admitted after."""


class Reports:
    """What both generating backends share: the ``Host`` they report to, bound once before any ``admit``."""

    _bound: Host | None = None

    def bind(self, host: Host) -> None:
        self._bound = host

    @property
    def _host(self) -> Host:
        if self._bound is None:
            raise RuntimeError("bind() before admit()")
        return self._bound


class NoGeneration:
    """The backend of a model that only embeds (an encoder): it never has sequences."""

    name = "none"
    capabilities = Capabilities(
        generation=False, logprobs=False, grammar=False, logits_processors=False, embeddings=True, prompt_cache=False
    )
    busy = False
    decode_seconds = 0.0

    def __init__(self, nbytes: int = 0) -> None:
        self.nbytes = nbytes  # the encoder's weights
        self._host: Host | None = None

    def bind(self, host: Host) -> None:
        self._host = host

    def admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        if self._host is None:
            raise RuntimeError("bind() before admit()")
        self._host.finish(
            stream,
            TokenEvent(error=f"Could not start generation: the model '{request.model}' only computes embeddings."),
        )

    def step(self) -> None:
        pass

    def cancel(self) -> None:
        pass

    def counts(self) -> tuple[int, int]:
        return 0, 0

    def set_batch_limit(self, size: int) -> None:
        pass

    def abort(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass
