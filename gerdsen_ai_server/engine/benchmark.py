"""Warm-up and per-model benchmarks: timed requests through the real engine, and their history.

Both submit ordinary ``GenerationRequest``s (batched with whatever else runs, like any client's)
and read the timestamps the engine puts on the ``TokenStream``. The history is a small JSON
file under the models dir (``.impetus/benchmarks.json``), the most recent runs per model kept.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from gerdsen_ai_server.engine.backends.base import LoadedModel
from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.errors import BenchmarkFailed as BenchmarkFailed  # defined with the engine's errors
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, TokenStream
from gerdsen_ai_server.schemas.models import BenchmarkResult, WarmupResult

log = logging.getLogger(__name__)

FILLER = "The quick brown fox jumps over the lazy dog while the engine measures how fast it reads. "
WARMUP_PROMPT_TOKENS = 16
WARMUP_MAX_TOKENS = 4


def synthetic_prompt(tokenizer: Any, length: int) -> list[int]:
    """``length`` tokens of plain text that start with a fresh nonce, so no cached prefix shortens the run."""
    head = tokenizer.encode(f"{uuid.uuid4().hex[:12]}: ")
    filler = tokenizer.encode(FILLER, add_special_tokens=False) or [head[-1]]
    tokens = list(head)
    while len(tokens) < length:
        tokens.extend(filler)
    return tokens[:length]


def timed_run(engine: InferenceEngine, loaded: LoadedModel, prompt: list[int], max_tokens: int) -> TokenStream:
    """Submit one greedy request with end-of-sequence suppressed and read it to the end."""
    bias = {int(t): -1e9 for t in loaded.tokenizer.eos_token_ids}
    request = GenerationRequest(
        model=loaded.model_id,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=0.0, logit_bias=bias),
    )
    stream = engine.submit(request)
    try:
        _, last = stream.collect()
    finally:
        stream.cancel()  # no-op once finished; frees the slot if reading failed
    if last.error or stream.first_token_at is None:
        raise BenchmarkFailed(last.error or "the engine produced no token")
    return stream


def warm_up(engine: InferenceEngine, loaded: LoadedModel) -> WarmupResult:
    """Two short same-length requests: the first pays for compiling and allocating, the second shows the gain."""
    started = time.monotonic()
    ttfts = []
    for _ in range(2):
        stream = timed_run(engine, loaded, synthetic_prompt(loaded.tokenizer, WARMUP_PROMPT_TOKENS), WARMUP_MAX_TOKENS)
        ttfts.append((stream.first_token_at - stream.created) * 1000)  # type: ignore[operator]
    return WarmupResult(
        prompt_tokens=WARMUP_PROMPT_TOKENS,
        cold_ttft_ms=round(ttfts[0], 2),
        warm_ttft_ms=round(ttfts[1], 2),
        seconds=round(time.monotonic() - started, 3),
        finished_at=time.time(),
    )


def computes_in(engine: InferenceEngine, loaded: LoadedModel) -> str:
    """The dtype this resident computes in (chosen per model: engine/dtype.py), 'as stored' for its own."""
    resident = engine.registry.get(loaded.model_id)
    choice = resident.compute if resident is not None else None
    return choice.name if choice is not None else engine.compute_dtype or "as stored"


def benchmark(engine: InferenceEngine, loaded: LoadedModel, prompt_tokens: int, max_tokens: int) -> BenchmarkResult:
    import mlx.core as mx

    created = time.time()
    other = engine.inflight
    # A counter of MLX's allocator, as the monitor reads it from its own thread; no computation here.
    mx.reset_peak_memory()
    stream = timed_run(engine, loaded, synthetic_prompt(loaded.tokenizer, prompt_tokens), max_tokens)
    peak = mx.get_peak_memory()
    first, done = stream.first_token_at, stream.finished_at or time.monotonic()
    ttft = first - stream.created  # type: ignore[operator]
    generated = stream.completion_tokens
    decode = done - first  # type: ignore[operator]
    return BenchmarkResult(
        id=f"bench-{uuid.uuid4().hex[:16]}",
        model=loaded.model_id,
        created_at=created,
        prompt_tokens=prompt_tokens,
        generated_tokens=generated,
        ttft_ms=round(ttft * 1000, 2),
        prompt_tokens_per_second=round(prompt_tokens / ttft, 2),
        generation_tokens_per_second=round((generated - 1) / decode, 2) if generated > 1 and decode > 0 else 0.0,
        peak_memory_bytes=int(peak) or None,
        model_memory_bytes=loaded.nbytes,
        compute_dtype=computes_in(engine, loaded),
        device=mx.default_device().type.name,
        other_requests=other,
    )


class BenchmarkStore:
    """Benchmark history in one JSON file: ``per_model`` most recent runs per model, ``max_models`` models.

    One Gunicorn worker serves the API, so a lock in the process is enough; writes go to a
    temporary file renamed over the old one, so a crash never leaves half a file.
    """

    def __init__(self, path: Path, per_model: int = 20, max_models: int = 50) -> None:
        self.path = path
        self.per_model = per_model
        self.max_models = max_models
        self._lock = threading.Lock()
        self._running: set[str] = set()

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:  # a damaged store loses its history, never the endpoint
            log.warning("ignoring unreadable benchmark store %s: %s", self.path, exc)
            return {}
        models = data.get("models") if isinstance(data, dict) else None
        return models if isinstance(models, dict) else {}

    def history(self, model_id: str) -> list[BenchmarkResult]:
        with self._lock:
            runs = self._read().get(model_id, [])
        out = []
        for run in runs:
            try:
                out.append(BenchmarkResult.model_validate(run))
            except ValueError:
                continue
        return out

    def add(self, result: BenchmarkResult) -> None:
        with self._lock:
            models = self._read()
            runs = [*models.pop(result.model, []), result.model_dump()][-self.per_model :]
            models[result.model] = runs  # re-inserted last: the most recently benchmarked model
            while len(models) > self.max_models:
                models.pop(next(iter(models)))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"version": 1, "models": models}))
            os.replace(tmp, self.path)

    def claim(self, model_id: str) -> bool:
        """Mark a run of ``model_id`` as in progress; False if one already is."""
        with self._lock:
            if model_id in self._running:
                return False
            self._running.add(model_id)
            return True

    def release(self, model_id: str) -> None:
        with self._lock:
            self._running.discard(model_id)
