"""A vision-language model on mlx-vlm: its requests (with images or text only) decoded together in
one batch, continuously (vision_batch.py: each prompt prefilled alone, then its row decodes beside the
others; its sampling stays its own).

mlx_lm.server turns batching off for images, and mlx-vlm's own ``BatchGenerator`` samples its whole
batch with one sampler; here a request joins the running batch whenever it comes, image or not, and
keeps its temperature, top-p, seed, processors, log-probabilities, stops and max_tokens. Other models
are not held up: the engine steps this backend like any other, one step per loop turn, so a text
model's batch decodes between this model's steps (a prompt's prefill, vision tower included, is part
of one step).

A request's token ids and pixel inputs come from mlx-vlm's own ``prepare_inputs`` run by the
serving layer on its request thread (``prompt_ids``: each image placeholder expanded into the
image's tokens, so the prompt's length, the context check and usage count them), as mlx_vlm.server
preprocesses on the caller's thread: it only builds arrays from numpy, no MLX operation runs there.
The engine thread takes the pixel arrays kept for the request, or prepares them again from the
images (a prompt of placeholders alone) when they are gone. The prompt is prefilled by mlx-vlm's
``generate_step`` (so greedy or seeded answers are what ``mlx_vlm.generate`` gives); the tokens go
through the shared text step (text.py: stop strings, end tokens, logprobs).
No prompt cache: no KV is kept between requests, so two images can never share any.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from gerdsen_ai_server.engine.backends.base import Capabilities, Reports
from gerdsen_ai_server.engine.backends.mlx import prefill_size
from gerdsen_ai_server.engine.backends.vision_batch import Row, RowSampler, VisionBatch, prefill
from gerdsen_ai_server.engine.images import ImageInput
from gerdsen_ai_server.engine.protocol import GenerationRequest, TokenEvent, TokenLogprob, TokenStream
from gerdsen_ai_server.engine.sampling import LogitsProcessor, build_logits_processors, guarded, token_logprob
from gerdsen_ai_server.engine.text import TextStep

log = logging.getLogger(__name__)

PREPARED_KEPT = 8  # prepared image inputs waiting for the engine thread (one per image request in flight)


@dataclass(eq=False)  # identity: the queue removes a job as an object
class _Job:
    request: GenerationRequest
    stream: TokenStream
    text: TextStep
    errors: list[Exception] = field(default_factory=list)  # what its logits processors raised


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
        self._queue: deque[_Job] = deque()  # admitted, waiting for room in the batch
        self._batch = VisionBatch(model)
        self._batch_size = 8  # the engine sets it (set_batch_limit) before any admit
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
        return bool(self._batch.rows) or bool(self._queue)

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
        self._batch_size = size  # rows decoded together (max_batch, or the thermal cap): new ones wait

    def _recount(self) -> None:
        self._counts = (len(self._batch), len(self._queue))

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
        leaving = [row for row in self._batch.rows if row.owner.stream.cancelled]
        if leaving:  # out of the batch now: its KV cache row goes with it
            self._batch.keep([row for row in self._batch.rows if row not in leaving])
            gone += [row.owner for row in leaving]
        self._recount()  # before the counters say it was cancelled
        for job in gone:
            self._host.finish(job.stream, None)
        self._host.stats.requests_cancelled_total += len(gone)

    def step(self) -> None:
        """A decode step of the running rows, then the prefill of waiting requests while the batch has
        room (at most one prefill pass's worth, as the MLX text path admits): each joins the batch
        with its first token (mlx-vlm's BatchGenerator likewise decodes first, then prefills)."""
        host = self._host
        started = time.monotonic()
        emitted = 0
        if self._batch.rows:
            try:
                decoded = self._batch.decode()
            except Exception as exc:
                # The batch's state is unknown after a failed step: fail its requests, start afresh.
                log.exception("vision decode step failed")
                for row in self._batch.rows:
                    host.finish(row.owner.stream, TokenEvent(error=f"Generation failed: {exc}"))
                self._batch = VisionBatch(self.model)
                self._recount()
                return
            emitted += len(decoded)
            ended = [row for row, token in decoded if not self._emit(row.owner, token, row.logprobs)]
            if ended:
                self._batch.keep([row for row in self._batch.rows if row not in ended])
        prefilled = 0
        while self._queue and len(self._batch) < self._batch_size and prefilled < prefill_size(self._batch_size):
            job = self._queue.popleft()
            prefilled += 1
            try:
                row, cache, delta = self._prefill(job)
            except Exception as exc:
                log.exception("vision prefill failed")
                host.finish(job.stream, TokenEvent(error=f"Generation failed: {exc}"))
                continue
            emitted += 1
            if self._emit(job, row.generated[-1], row.logprobs):
                self._batch.add(row, cache, delta)
        if emitted and not prefilled:
            self.decode_seconds = time.monotonic() - started
        host.stats.steps_total += 1
        host.stats.generated_tokens_total += emitted
        self._recount()

    def _emit(self, job: _Job, token: int, logprobs: mx.array | None) -> bool:
        """The token through the job's text step into its stream; False when the job ended."""
        host = self._host
        if job.errors:
            host.finish(job.stream, TokenEvent(error=f"Generation failed: {job.errors[0]}"))
            return False
        finish = None
        if token in job.text.eos_ids:
            finish = "stop"
        elif job.text.completion_tokens + 1 >= job.request.max_tokens:
            finish = "length"

        def logprob_of(chosen: int, top: int) -> TokenLogprob:
            if logprobs is None:  # asked for only when the request wants log-probabilities
                raise RuntimeError("log-probabilities were not computed for this step")
            return token_logprob(logprobs, chosen, top)

        event = job.text.event(token, finish, logprob_of)
        if event.finish_reason is None:
            job.stream.put(event)
            return True
        host.touch()  # keep-alive counts from the last answer
        host.finish(job.stream, event)
        return False

    def _prefill(self, job: _Job) -> tuple[Row, list[Any], mx.array | None]:
        """The job's prompt prefilled alone (vision_batch.prefill), its pixel inputs made now, its
        sampling and processors as asked: the row that joins the batch, its KV cache, its rope delta."""
        request = job.request
        pixel_values, extra = self._pixels(request) if request.images else (None, {})
        processors = build_logits_processors(request.sampling, request.max_tokens) + request.logits_processors
        sampler = RowSampler(request.sampling)
        first = guarded(from_generated(processors), job.errors, 0)
        token, logprobs, cache, delta = prefill(self.model, request.prompt_tokens, pixel_values, extra, sampler, first)
        row = Row(job, sampler, guarded(processors, job.errors, 0), [token], logprobs)
        return row, cache, delta

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
        jobs = list(self._queue) + [row.owner for row in self._batch.rows]
        self._queue.clear()
        self._batch = VisionBatch(self.model)
        for job in jobs:
            self._host.finish(job.stream, TokenEvent(error=message))
        self._counts = (0, 0)

    def close(self) -> None:
        self._queue.clear()
        self._batch = VisionBatch(self.model)
