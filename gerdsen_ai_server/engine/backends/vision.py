"""A vision-language model on mlx-vlm: its requests (with images or text only) one at a time, one
token per engine step.

Why one at a time: mlx-vlm 0.7.10 does have a ``BatchGenerator``, but its sampler is one per batch
(its server builds it from the first request's arguments), and Qwen-VL language models keep their
mRoPE state (``_rope_deltas``) on the model object, so two prompts prefilled in turn share it.
mlx_lm.server likewise turns batching off for images. Serial is safe; it never stalls the other
models: the engine steps this backend like any other, one token per loop turn, so a text model's
batch decodes between this model's tokens (a prompt's prefill, vision tower included, is one step).

A request's token ids and pixel inputs come from mlx-vlm's own ``prepare_inputs`` run by the
serving layer on its request thread (``prompt_ids``: each image placeholder expanded into the
image's tokens, so the prompt's length, the context check and usage count them), as mlx_vlm.server
preprocesses on the caller's thread: it only builds arrays from numpy, no MLX operation runs there.
The engine thread takes the pixel arrays kept for the request, or prepares them again from the
images (a prompt of placeholders alone) when they are gone. Decoding is mlx-vlm's
``generate_step`` (sampling with its seeded sampler, so a seed gives what ``mlx_vlm.generate``
gives); the tokens go through the shared text step (text.py: stop strings, end tokens, logprobs).
No prompt cache: no KV is kept between requests, so two images can never share any.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gerdsen_ai_server.engine.backends.base import Capabilities, Reports
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenStream
from gerdsen_ai_server.engine.sampling import LogitsProcessor, build_logits_processors, guarded, token_logprob
from gerdsen_ai_server.engine.text import TextStep

log = logging.getLogger(__name__)

PREPARED_KEPT = 8  # prepared image inputs waiting for the engine thread (one per image request in flight)


@dataclass
class _Job:
    request: GenerationRequest
    stream: TokenStream
    text: TextStep
    errors: list[Exception] = field(default_factory=list)
    steps: Iterator[tuple[Any, mx.array]] | None = None  # mlx-vlm's generate_step, once started


def _pil(image: ImageInput) -> Any:
    if image.decoded is not None:  # decoded once by the serving layer's check
        return image.decoded
    from PIL import Image

    with Image.open(io.BytesIO(image.data)) as opened:
        return opened.convert("RGB")  # decoded (and bounded) by the serving layer already


def from_generated(processors: list[LogitsProcessor]) -> list[LogitsProcessor]:
    """Processors that see only the generated tokens. mlx-vlm hands them the prompt's tokens it fed in
    the last prefill pass (the whole prompt, or its last chunk) and then each new one: whatever it
    first hands over is the prompt part."""
    start: list[int] = []

    def wrap(processor: LogitsProcessor) -> LogitsProcessor:
        def run(tokens: mx.array, logits: mx.array) -> mx.array:
            if not start:
                start.append(tokens.shape[0])
            return processor(tokens[start[0] :], logits)

        return run

    return [wrap(p) for p in processors]


def _key(tokens: list[int], images: list[ImageInput]) -> tuple[Any, ...]:
    return (hash(tuple(tokens)), *(i.sha256 for i in images))


class VisionBackend(Reports):
    """A resident vision-language model: mlx-vlm's model and processor, its requests in arrival order."""

    name = "mlx-vlm"
    capabilities = Capabilities(embeddings=False, prompt_cache=False, vision=True)

    def __init__(self, model: Any, processor: Any, tokenizer: Any, model_id: str) -> None:
        from gerdsen_ai_server.engine.formats.safetensors import parameter_nbytes

        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer  # mlx-lm's wrapper: the text step's detokenizer and end tokens
        self.model_id = model_id
        self._nbytes = parameter_nbytes(model)
        self._queue: deque[_Job] = deque()
        self._active: _Job | None = None
        self._counts = (0, 0)
        self.decode_seconds = 0.0
        self._processor_lock = threading.Lock()  # the fast tokenizer is not safe across request threads
        config = model.config
        self._image_token: int | None = getattr(config, "image_token_id", None) or getattr(
            config, "image_token_index", None
        )
        self._placeholders: dict[int, str] = {}
        # What ``prompt_ids`` made of a prompt's images (pixel arrays, no MLX op run to make them), kept
        # for the engine thread to take instead of preparing them again: a few, the latest.
        self._prepared: OrderedDict[tuple[Any, ...], tuple[mx.array, dict[str, Any]]] = OrderedDict()

    # ---- any thread --------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def busy(self) -> bool:
        return self._active is not None or bool(self._queue)

    def counts(self) -> tuple[int, int]:
        return self._counts

    def prompt_ids(self, text: str, images: list[ImageInput]) -> list[int]:
        """The rendered prompt's token ids with each image placeholder expanded into the image's
        tokens, as mlx-vlm's processor expands it (called by the serving layer, on its thread: CPU
        work only, as mlx_vlm.server preprocesses on the caller's thread)."""
        from mlx_vlm.utils import prepare_inputs, should_add_special_tokens

        with self._processor_lock:
            inputs = prepare_inputs(  # type: ignore[no-untyped-call]
                self.processor,
                images=[_pil(i) for i in images],
                prompts=text,
                image_token_index=self._image_token,
                add_special_tokens=should_add_special_tokens(self.model.config.model_type, self.processor),
            )
        ids = inputs["input_ids"]
        tokens = [int(t) for t in (ids[0] if ids.ndim == 2 else ids).tolist()]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        with self._processor_lock:
            self._prepared[_key(tokens, images)] = (inputs["pixel_values"], extra)
            while len(self._prepared) > PREPARED_KEPT:
                self._prepared.popitem(last=False)
        return tokens

    # ---- engine thread -----------------------------------------------------------------
    def set_batch_limit(self, size: int) -> None:
        pass  # one sequence at a time whatever the cap

    def _recount(self) -> None:
        self._counts = (int(self._active is not None), len(self._queue))

    def admit(self, request: GenerationRequest, stream: TokenStream) -> None:
        host = self._host
        vocab = len(self.tokenizer)
        bad = [t for t in (request.sampling.logit_bias or {}) if not 0 <= t < vocab]
        if bad:
            host.finish(stream, TokenEvent(error=f"logit_bias names tokens outside the vocabulary: {bad}"))
            return
        self._queue.append(_Job(request, stream, TextStep(self.tokenizer, request)))
        host.touch()
        host.stats.prompt_tokens_total += len(request.prompt_tokens)
        self._recount()

    def cancel(self) -> None:
        gone = [job for job in self._queue if job.stream.cancelled]
        for job in gone:
            self._queue.remove(job)
        if self._active is not None and self._active.stream.cancelled:
            gone.append(self._active)
            self._drop_active()
        for job in gone:
            self._host.finish(job.stream, None)
        self._host.stats.requests_cancelled_total += len(gone)
        self._recount()

    def _drop_active(self) -> None:
        job, self._active = self._active, None
        if job is not None and job.steps is not None:
            close = getattr(job.steps, "close", None)
            if close is not None:
                close()  # the generator's KV cache and lookahead token go with it

    def step(self) -> None:
        if self._active is None:
            if not self._queue:
                return
            self._active = self._queue.popleft()
            self._recount()
        job = self._active
        started = time.monotonic()
        prefill = job.steps is None
        try:
            if job.steps is None:
                job.steps = self._start(job)
            token, logprobs = next(job.steps)
        except StopIteration:  # max_tokens reached inside mlx-vlm (the text step ends it first)
            self._end(job, TokenEvent(error="Generation ended without a final token"))
            return
        except Exception as exc:
            log.exception("vision generation step failed")
            self._end(job, TokenEvent(error=f"Generation failed: {exc}"))
            return
        if not prefill:
            self.decode_seconds = time.monotonic() - started
        host = self._host
        host.stats.steps_total += 1
        host.stats.generated_tokens_total += 1
        if job.errors:
            self._end(job, TokenEvent(error=f"Generation failed: {job.errors[0]}"))
            return
        token = int(token)
        finish = None
        if token in job.text.eos_ids:
            finish = "stop"
        elif job.text.completion_tokens + 1 >= job.request.max_tokens:
            finish = "length"
        event = job.text.event(token, finish, lambda t, top: token_logprob(logprobs, t, top))
        if event.finish_reason is None:
            job.stream.put(event)
        else:
            host.touch()  # keep-alive counts from the last answer
            self._end(job, event)

    def _end(self, job: _Job, event: TokenEvent) -> None:
        self._drop_active()
        self._host.finish(job.stream, event)
        self._recount()

    def _start(self, job: _Job) -> Iterator[tuple[Any, mx.array]]:
        """mlx-vlm's token generator for the job: its pixel inputs made now, its sampling as asked."""
        from mlx_vlm.generate import generate_step

        request = job.request
        params = request.sampling
        pixel_values, extra = self._pixels(request) if request.images else (None, {})
        processors = build_logits_processors(params, request.max_tokens) + request.logits_processors
        return generate_step(
            mx.array([request.prompt_tokens]),
            self.model,
            pixel_values,
            None,
            max_tokens=request.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            min_p=params.min_p,
            seed=params.seed,
            logits_processors=guarded(from_generated(processors), job.errors, 0),
            **extra,
        )

    def _pixels(self, request: GenerationRequest) -> tuple[mx.array, dict[str, Any]]:
        """The images' pixel inputs (and whatever else the processor gives for them: Qwen's
        ``image_grid_thw``...), from the processor run over a prompt of placeholders alone; the
        request's own ids were expanded from the same images by ``prompt_ids``."""
        from mlx_vlm.utils import prepare_inputs

        with self._processor_lock:
            prepared = self._prepared.pop(_key(request.prompt_tokens, request.images), None)
        if prepared is not None:
            return prepared
        with self._processor_lock:
            inputs = prepare_inputs(  # type: ignore[no-untyped-call]
                self.processor,
                images=[_pil(i) for i in request.images],
                prompts=self._placeholder_prompt(len(request.images)),
                image_token_index=self._image_token,
            )
        if self._image_token is not None:
            expected = int((inputs["input_ids"] == self._image_token).sum().item())
            got = request.prompt_tokens.count(self._image_token)
            if expected != got:
                raise ValueError(f"the prompt holds {got} image tokens where its images make {expected}")
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "pixel_values", "attention_mask")}
        return inputs["pixel_values"], extra

    def _placeholder_prompt(self, images: int) -> str:
        """The chat template's rendering of a user turn of ``images`` image parts and nothing else."""
        if images not in self._placeholders:
            messages = [{"role": "user", "content": [{"type": "image"} for _ in range(images)]}]
            self._placeholders[images] = self.tokenizer.apply_chat_template(messages, tokenize=False)
        return self._placeholders[images]

    def abort(self, message: str) -> None:
        jobs = list(self._queue) + ([self._active] if self._active is not None else [])
        self._queue.clear()
        self._drop_active()
        for job in jobs:
            self._host.finish(job.stream, TokenEvent(error=message))
        self._counts = (0, 0)

    def close(self) -> None:
        self._queue.clear()
        self._drop_active()
