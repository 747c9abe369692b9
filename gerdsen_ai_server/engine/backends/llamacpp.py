"""GGUF models through llama.cpp (``llama-cpp-python``'s low-level bindings), continuously batched.

Which backend loads a GGUF (``IMPETUS_BACKEND``): ``auto`` sends a user's ``.gguf`` file (or a
folder holding one) here when ``llama_cpp`` is installed and converts it to MLX otherwise; the
embedded default model stays on MLX in ``auto`` (it is converted once, as before). ``mlx``
converts every GGUF to MLX; ``llamacpp`` runs every GGUF here, the embedded default model's
included. MLX / safetensors folders always load on MLX.

One ``LlamaCppEngine`` per resident model: one llama.cpp context with a KV sequence per slot
(``IMPETUS_MAX_BATCH`` slots, each with the model's context), its own thread, and the MLX engine's
interface: ``submit`` hands a ``TokenStream`` back at once; the thread admits requests into free
slots, puts every running sequence's next token (and prompt chunks of new ones) into one
``llama_batch``, calls ``llama_decode`` once per step, and samples each sequence from its own
logits in numpy with its own random generator (nothing that runs beside a seeded request draws
from it). A finished sequence's KV cells stay in its slot: a later prompt that starts with the
same tokens takes that slot and decodes only the rest (prompt-prefix reuse).

Reproducibility: a repeated seeded request gives the same tokens and log-probabilities (tested).
Beside other sequences its logits can differ in the last bits (~1e-3 measured: llama.cpp's CPU
kernels are not the same for every batch shape), so a seeded answer beside others can, rarely,
take another token than alone; greedy answers were the same in our tests.

Tokens and text: the GGUF's vocabulary is rebuilt as a Hugging Face tokenizer (as the MLX
conversion does, engine/gguf.py) and loaded with mlx-lm's wrapper, so chat templates (from the
GGUF metadata), tool calls, grammars (llguidance) and logprobs work exactly as on MLX.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gerdsen_ai_server.engine.formats.gguf import _write_tokenizer, read_gguf_header
from gerdsen_ai_server.engine.protocol import GenerationRequest, SamplingParams, TokenEvent, TokenLogprob, TokenStream
from gerdsen_ai_server.store.errors import ModelLoadError, UnsupportedModelFormat

log = logging.getLogger(__name__)

BACKENDS = ("auto", "mlx", "llamacpp")
# Tokens put into one llama_decode call at most (decoding tokens first, then prompt chunks).
BATCH_TOKENS = 512
# Context per sequence when the GGUF declares none, and the cap on what one slot reserves.
DEFAULT_CONTEXT = 2048
MAX_SLOT_CONTEXT = 4096

_init_lock = threading.Lock()
_initialised = False


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def _settings() -> Any:
    from gerdsen_ai_server.config import Settings

    return Settings()


def backend_setting() -> str:
    try:
        return str(_settings().backend)
    except Exception:  # an invalid IMPETUS_* value fails the app's own Settings() with the details
        return "auto"


def n_sequences() -> int:
    """Sequences (KV slots) of a llama.cpp model: IMPETUS_MAX_BATCH, as on MLX."""
    return int(_settings().max_batch)


def serves_gguf(is_default_model: bool, setting: str | None = None) -> bool:
    """Whether a GGUF goes to llama.cpp (True) or is converted to MLX (False)."""
    setting = setting or backend_setting()
    if setting == "llamacpp":
        if not available():
            raise ModelLoadError("IMPETUS_BACKEND=llamacpp but llama-cpp-python is not installed "
                                 "(make setup installs it)")
        return True
    if setting == "mlx":
        return False
    return not is_default_model and available()


def kv_bytes(meta: dict[str, Any], n_seq: int) -> int:
    """The KV cache of ``n_seq`` sequences of ``slot_context`` tokens each (f16 K and V)."""
    arch = meta.get("general.architecture", "llama")
    layers = int(meta.get(f"{arch}.block_count", 0))
    heads = int(meta.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta.get(f"{arch}.attention.key_length", int(meta.get(f"{arch}.embedding_length", 0)) // heads))
    return 2 * 2 * layers * kv_heads * head_dim * slot_context(meta) * n_seq


def estimate_bytes(path: Path, n_seq: int) -> int:
    """What the registry reserves for a GGUF: the file (its weights) plus the KV cache."""
    return path.stat().st_size + kv_bytes(read_gguf_header(path).metadata, n_seq)


def slot_context(meta: dict[str, Any]) -> int:
    arch = meta.get("general.architecture", "llama")
    return min(int(meta.get(f"{arch}.context_length", DEFAULT_CONTEXT)), MAX_SLOT_CONTEXT)


def load_tokenizer(gguf: Path, meta: dict[str, Any], cache_dir: Path) -> Any:
    """mlx-lm's TokenizerWrapper over the GGUF's vocabulary, merges and chat template (no MLX)."""
    from mlx_lm.utils import load_tokenizer as mlx_load_tokenizer

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise UnsupportedModelFormat(f"{gguf}: tokenizer model {meta.get('tokenizer.ggml.model')!r} is not "
                                     "supported (only byte-level BPE 'gpt2')")
    stat = gguf.stat()
    folder = cache_dir / f"{gguf.stem.lower()}-{stat.st_size:x}-{int(stat.st_mtime):x}"
    if not (folder / "tokenizer.json").is_file():
        staging = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
        staging.mkdir(parents=True, exist_ok=True)
        _write_tokenizer(meta, staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process wrote it first
            for f in staging.iterdir():
                f.unlink()
            staging.rmdir()
    eos = sorted({int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta})
    return mlx_load_tokenizer(folder, eos_token_ids=eos or None)


# ---- sampling (numpy, per sequence) -----------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class Sampler:
    """OpenAI's sampling parameters over one sequence's logits, as mlx-lm applies them."""

    def __init__(self, params: SamplingParams, grammar: Any | None) -> None:
        self.p = params
        self.rng = np.random.default_rng(params.seed)
        self.counts: Counter[int] = Counter()
        self.grammar = grammar  # an llguidance LLMatcher, or None
        bias = params.logit_bias or {}
        self.bias_ids = np.array(list(bias), dtype=np.int64)
        self.bias_values = np.array(list(bias.values()), dtype=np.float32)

    def process(self, logits: np.ndarray) -> np.ndarray:
        logits = logits.astype(np.float32, copy=True)
        p = self.p
        if self.bias_ids.size:
            logits[self.bias_ids] += self.bias_values
        if self.counts:
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            if p.repetition_penalty and p.repetition_penalty != 1.0:
                sel = logits[ids]
                logits[ids] = np.where(sel < 0, sel * p.repetition_penalty, sel / p.repetition_penalty)
            if p.presence_penalty:
                logits[ids] -= p.presence_penalty
            if p.frequency_penalty:
                logits[ids] -= p.frequency_penalty * np.fromiter(self.counts.values(), dtype=np.float32)
        if self.grammar is not None:
            bits = np.unpackbits(np.frombuffer(self.grammar.compute_bitmask(), dtype=np.uint8), bitorder="little")
            allowed = np.zeros(logits.shape[0], dtype=bool)
            n = min(logits.shape[0], bits.size)
            allowed[:n] = bits[:n].astype(bool)
            logits[~allowed] = -np.inf
        return logits

    def sample(self, logprobs: np.ndarray) -> int:
        p = self.p
        if p.temperature == 0:
            return int(np.argmax(logprobs))
        x = logprobs.copy()
        if 0 < p.top_p < 1.0:  # keep the smallest set whose probability reaches top_p
            order = np.argsort(-x)
            cum = np.cumsum(np.exp(x[order]))
            cut = int(np.searchsorted(cum, p.top_p)) + 1
            x[order[cut:]] = -np.inf
        if p.min_p > 0:
            x[x < x.max() + np.log(p.min_p)] = -np.inf
        if 0 < p.top_k < x.shape[0]:
            kth = np.argpartition(-x, p.top_k - 1)[p.top_k - 1]
            x[x < x[kth]] = -np.inf
        scaled = x / p.temperature
        probs = np.exp(scaled - scaled.max())
        probs /= probs.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))

    def accept(self, token: int) -> None:
        self.counts[token] += 1
        if self.grammar is not None and not self.grammar.consume_token(token):
            raise ValueError(f"grammar rejected token {token}: {self.grammar.get_error()}")


def _grammar_of(request: GenerationRequest) -> Any | None:
    """The llguidance matcher of a request's grammar processor; any other processor is refused."""
    from gerdsen_ai_server.engine.grammar import GrammarProcessor

    matcher = None
    for processor in request.logits_processors:
        if isinstance(processor, GrammarProcessor) and matcher is None:
            matcher = processor._matcher  # noqa: SLF001 - the same matcher, driven with numpy here
        else:
            raise ValueError(f"the llama.cpp backend cannot run the logits processor {processor!r}")
    return matcher


# ---- the engine -------------------------------------------------------------------------------


@dataclass
class _Seq:
    stream: TokenStream
    request: GenerationRequest
    sampler: Sampler
    detokenizer: Any
    stop: Any
    pending: list[int]  # tokens to feed next (prompt rest, then the last sampled token)
    completion_tokens: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # what this sequence's KV cells hold
    seq: _Seq | None = None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class LlamaCppEngine:
    """A resident GGUF model; stands where the registry keeps mlx-lm's BatchGenerator."""

    # The MLX engine sets these on every resident's generator when the thermal governor caps the
    # batch (InferenceEngine.set_batch_limit); 0: no cap, all slots.
    completion_batch_size = 0
    prefill_batch_size = 0
    _generation_batch: tuple[()] = ()  # the MLX engine's own counters see no sequences here

    def __init__(self, path: Path, tokenizer: Any, n_seq: int, slot_ctx: int, n_threads: int | None = None,
                 kv_cache_bytes: int = 0) -> None:
        import llama_cpp as lc

        global _initialised
        with _init_lock:
            if not _initialised:
                _silence_llama_log(lc)
                lc.llama_backend_init()
                _initialised = True
        self._lc = lc
        self.path = path
        self.tokenizer = tokenizer
        self.n_seq = n_seq
        self.slot_ctx = slot_ctx
        threads = n_threads or os.cpu_count() or 1
        mparams = lc.llama_model_default_params()
        mparams.use_mmap = True
        self._model = lc.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelLoadError(f"llama.cpp could not load {path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = slot_ctx * n_seq
        cparams.n_batch = BATCH_TOKENS
        cparams.n_ubatch = BATCH_TOKENS
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False  # each sequence its own slot_ctx cells: one can never starve another
        cparams.no_perf = True
        self._ctx = lc.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            lc.llama_model_free(self._model)
            raise ModelLoadError(f"llama.cpp could not create a context for {path} ({n_seq} x {slot_ctx} tokens)")
        self._mem = lc.llama_get_memory(self._ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self._model))
        self.nbytes = int(lc.llama_model_size(self._model)) + kv_cache_bytes
        self._batch = lc.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._slots = [_Slot(i) for i in range(n_seq)]
        self._waiting: list[_Seq] = []
        self._inbox: queue.Queue[tuple[GenerationRequest, TokenStream, Any, Any]] = queue.Queue()
        self._wake = threading.Event()
        self._closed = False  # the thread stops (set by close(), or by the thread itself on a crash)
        self._freed = False  # context and model freed (close())
        self.prefix_tokens_reused = 0
        self._thread = threading.Thread(target=self._run, name=f"impetus-llamacpp-{path.stem}", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, request: GenerationRequest, stream: TokenStream, stats: Any, finish: Any) -> None:
        """Queue ``request``; ``finish(stream, event)`` is the MLX engine's end-of-request bookkeeping."""
        self._stats, self._finish = stats, finish
        if self._closed or not self._thread.is_alive():  # never leave a caller waiting on a dead thread
            finish(stream, TokenEvent(error="the llama.cpp engine stopped"))
            return
        self._inbox.put((request, stream, stats, finish))
        self._wake.set()

    @property
    def busy(self) -> bool:
        return not self._inbox.empty() or bool(self._waiting) or any(s.seq for s in self._slots)

    def sequence_counts(self) -> tuple[int, int]:
        """(running, waiting) for /metrics and the dashboard."""
        return sum(1 for s in self._slots if s.seq), len(self._waiting) + self._inbox.qsize()

    def close(self) -> None:
        """Stop the thread (failing what is left) and free the context and the model."""
        if self._freed:
            return
        self._closed = self._freed = True
        self._wake.set()
        self._thread.join(timeout=30)
        lc = self._lc
        lc.llama_batch_free(self._batch)
        lc.llama_free(self._ctx)
        lc.llama_model_free(self._model)

    # ---- the backend's thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._closed:
                self._take_new()
                self._drop_cancelled()
                self._admit()
                if any(s.seq for s in self._slots):
                    self._step()
                else:
                    self._wake.wait(0.5)
                    self._wake.clear()
        except BaseException:
            log.exception("llama.cpp engine thread crashed")
            self._closed = True
        finally:
            for seq in [s.seq for s in self._slots if s.seq] + self._waiting:
                self._end(seq, TokenEvent(error="the llama.cpp engine stopped"))
            while not self._inbox.empty():
                request, stream, _, finish = self._inbox.get_nowait()
                finish(stream, TokenEvent(error="the llama.cpp engine stopped"))

    def _take_new(self) -> None:
        from gerdsen_ai_server.engine.engine import make_detokenizer
        from gerdsen_ai_server.engine.sampling import StopMatcher

        while True:
            try:
                request, stream, stats, finish = self._inbox.get_nowait()
            except queue.Empty:
                return
            try:
                bad = [t for t in (request.sampling.logit_bias or {}) if not 0 <= t < self.n_vocab]
                if bad:
                    raise ValueError(f"logit_bias names tokens outside the vocabulary: {bad}")
                sampler = Sampler(request.sampling, _grammar_of(request))
            except Exception as exc:
                finish(stream, TokenEvent(error=str(exc)))
                continue
            stats.prompt_tokens_total += len(request.prompt_tokens)
            self._waiting.append(_Seq(stream, request, sampler, make_detokenizer(self.tokenizer, request.strip_leading_space),
                                      StopMatcher(request.stop), list(request.prompt_tokens)))

    def _drop_cancelled(self) -> None:
        for seq in [q for q in self._waiting if q.stream.cancelled]:
            self._waiting.remove(seq)
            self._end(seq, None)
        for slot in self._slots:
            if slot.seq is not None and slot.seq.stream.cancelled:
                seq, slot.seq = slot.seq, None
                self._end(seq, None)

    def _admit(self) -> None:
        """Waiting requests into free slots, each into the slot whose cached tokens share the longest prefix."""
        cap = min(self.n_seq, self.completion_batch_size or self.n_seq)
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free or self.n_seq - len(free) >= cap:
                return
            seq = self._waiting.pop(0)
            prompt = seq.pending
            slot = max(free, key=lambda s: _common_prefix(s.tokens, prompt))
            # Feed at least the prompt's last two tokens: llama.cpp's CPU products for a one-token
            # chunk differ from a longer chunk's in the last bits (logits ~3e-3 apart on the default
            # model), and a repeated seeded request then sampled another answer than the first.
            keep = max(0, min(_common_prefix(slot.tokens, prompt), len(prompt) - 2))
            if not self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, keep, -1):
                keep = 0
                self._lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            if keep:
                self._stats.prompt_cache_hits_total += 1
                self.prefix_tokens_reused += keep
            else:
                self._stats.prompt_cache_misses_total += 1
            slot.tokens = prompt[:keep]
            seq.pending = prompt[keep:]
            slot.seq = seq

    def _step(self) -> None:
        lc, batch = self._lc, self._batch
        n = 0
        outputs: list[tuple[_Slot, int]] = []
        fed: list[tuple[_Slot, int]] = []
        # Running sequences' next tokens first (one each), then prompt chunks in the room left.
        order = sorted((s for s in self._slots if s.seq), key=lambda s: len(s.seq.pending) > 1)  # type: ignore[union-attr]
        for slot in order:
            seq = slot.seq
            assert seq is not None
            take = min(len(seq.pending), BATCH_TOKENS - n)
            if take == len(seq.pending) - 1 > 0:  # nor does a long prompt's last token go alone (_admit)
                take -= 1
            if take <= 0:
                break
            pos = len(slot.tokens)
            for j in range(take):
                batch.token[n] = seq.pending[j]
                batch.pos[n] = pos + j
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = 0
                n += 1
            if take == len(seq.pending):
                batch.logits[n - 1] = 1
                outputs.append((slot, n - 1))
            fed.append((slot, take))
        batch.n_tokens = n
        rc = lc.llama_decode(self._ctx, batch)
        self._stats.steps_total += 1
        if rc != 0:
            log.error("llama_decode returned %d", rc)
            for slot, _ in fed:
                seq, slot.seq = slot.seq, None
                lc.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens = []
                self._end(seq, TokenEvent(error=f"Generation failed: llama_decode returned {rc}"))
            return
        for slot, take in fed:
            seq = slot.seq
            assert seq is not None
            slot.tokens.extend(seq.pending[:take])
            del seq.pending[:take]
        for slot, index in outputs:
            ptr = lc.llama_get_logits_ith(self._ctx, index)
            logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))
            self._sample(slot, logits)

    def _sample(self, slot: _Slot, raw: np.ndarray) -> None:
        seq = slot.seq
        assert seq is not None
        try:
            logits = seq.sampler.process(raw)
            logprobs = _log_softmax(logits)
            token = seq.sampler.sample(logprobs)
            seq.sampler.accept(token)
        except Exception as exc:  # one request's bad grammar never fails the others
            slot.seq = None
            self._end(seq, TokenEvent(error=f"Generation failed: {exc}"))
            return
        self._stats.generated_tokens_total += 1
        seq.completion_tokens += 1
        finish = None
        eos = token in self.tokenizer.eos_token_ids
        if eos:
            finish = "stop"
        elif seq.completion_tokens >= seq.request.max_tokens:
            finish = "length"
        lps: list[TokenLogprob] = []
        if not eos:
            seq.detokenizer.add_token(token)
            if seq.request.logprobs is not None:
                lps.append(_token_logprob(logprobs, token, seq.request.logprobs))
        if finish is not None:
            seq.detokenizer.finalize()
        text, hit_stop = seq.stop.feed(seq.detokenizer.last_segment)
        if hit_stop:
            finish = "stop"
        elif finish is not None:
            text += seq.stop.flush()
        event = TokenEvent(text=text, token_ids=[token], finish_reason=finish, stop_sequence=hit_stop,
                           prompt_tokens=len(seq.request.prompt_tokens), completion_tokens=seq.completion_tokens,
                           logprobs=lps)
        if finish is None:
            seq.pending = [token]
            seq.stream.put(event)
        else:
            slot.seq = None
            self._end(seq, event)

    def _end(self, seq: _Seq, event: TokenEvent | None) -> None:
        if event is None:
            self._stats.requests_cancelled_total += 1
        self._finish(seq.stream, event)


def _token_logprob(logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
    alternatives: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-logprobs, top - 1)[:top]
        ids = ids[np.argsort(-logprobs[ids])]
        alternatives = [(int(i), float(logprobs[i])) for i in ids]
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def _silence_llama_log(lc: Any) -> None:
    """llama.cpp logs every load to stderr; keep warnings and errors only, through Python's logging."""

    @lc.llama_log_callback
    def callback(level: int, text: bytes, _user: Any) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            log.warning("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

    _silence_llama_log.callback = callback  # type: ignore[attr-defined]  # keep it alive
    lc.llama_log_set(callback, ctypes.c_void_p(0))


def load(path: Path, model_id: str, cache_dir: Path) -> Any:
    """A ``LoadedModel`` whose ``model`` is a running ``LlamaCppEngine`` (``kind`` 'llamacpp')."""
    from gerdsen_ai_server.engine.formats.loaders import LoadedModel

    settings = _settings()
    meta = read_gguf_header(path).metadata
    tokenizer = load_tokenizer(path, meta, cache_dir)
    ctx = slot_context(meta)
    engine = LlamaCppEngine(path, tokenizer, n_seq=settings.max_batch, slot_ctx=ctx,
                            n_threads=settings.llamacpp_threads or None,
                            kv_cache_bytes=kv_bytes(meta, settings.max_batch))
    loaded = LoadedModel(model_id=model_id, path=path, model=engine, tokenizer=tokenizer, context_length=ctx,
                         nbytes=engine.nbytes)
    loaded.kind = "llamacpp"  # set after: older LoadedModels have no kind field
    return loaded
