"""Every setting of the server, read from ``IMPETUS_*`` environment variables.

One pydantic-settings class; ``docs/configuration.md`` documents each field.

Profiles (``IMPETUS_PROFILE``): ``development`` (the default) keeps every default below; ``production``
changes the defaults in ``PROFILE_DEFAULTS`` and, on a bind beyond loopback, requires API keys and a
Host allow-list (``Settings.check_profile``: ``impetus serve`` and ``create_app`` refuse to start
without them). A setting given explicitly, in the environment or in ``create_app``'s mapping, always
wins over its profile's default: the profile only fills what nobody set (pydantic's
``model_fields_set``), so an operator can still turn one thing off, e.g. ``IMPETUS_RATE_LIMIT=``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gerdsen_ai_server.profiles import PROFILE_DEFAULTS as PROFILE_DEFAULTS
from gerdsen_ai_server.profiles import PROFILE_REQUIRES as PROFILE_REQUIRES
from gerdsen_ai_server.profiles import Profile as Profile
from gerdsen_ai_server.profiles import ProfileError as ProfileError
from gerdsen_ai_server.profiles import is_loopback_host as is_loopback_host
from gerdsen_ai_server.profiles import profile_problems, refusal


def _default_models_dir() -> Path:
    return Path.home() / ".cache" / "impetus" / "models"


# KV cache quantization bits (IMPETUS_KV_BITS, a load's kv_bits): 0 off (f16), 8 (q8_0), 4 (q4_0); on MLX mx.quantize.
KV_BITS = (0, 4, 8)


class Settings(BaseSettings):
    # allow_inf_nan: a NaN keep-alive never expires a model; "inf" for a timeout is spelt 0 (no limit) here.
    model_config = SettingsConfigDict(env_prefix="IMPETUS_", extra="ignore", allow_inf_nan=False)

    profile: Profile = Field(
        "development",
        description="'production' changes the defaults shown in docs/configuration.md's profiles table (JSON logs, /health "
        "and /metrics behind the key, a rate limit) and, on a bind beyond loopback, refuses to start without API "
        "keys and IMPETUS_ALLOWED_HOSTS. A setting given explicitly always wins over its profile's default.",
    )
    host: str = Field("127.0.0.1", description="Address Gunicorn binds to.")
    port: int = Field(8080, ge=0, le=65535, description="Port Gunicorn binds to.")
    threads: int = Field(64, ge=4, description="Gunicorn gthread threads: one per open stream, plus headroom.")
    models_dir: Path = Field(
        default_factory=_default_models_dir, description="Where local models and converted models live."
    )
    dashboard_dir: Path | None = Field(
        None,
        description="The dashboard's build served at / (index.html and assets/); unset: impetus-dashboard/dist of this checkout.",
    )
    default_model: str = Field(
        "smollm2-135m-instruct",
        description="Model loaded at start: the embedded default id, a local folder or a .gguf file.",
    )
    model_paths: str = Field(
        "",
        description="Comma-separated files or folders outside the models dir that a request's 'model' may name, "
        "by absolute path (a folder allows everything under it; '~' is expanded here, never in a request). "
        "Otherwise a request names only models in the models dir (as GET /api/models lists them): absolute paths, "
        "'~', '..', hidden names and symlinks leading out of the models dir get one uniform 404 model_not_found. "
        "The default model (--model, IMPETUS_DEFAULT_MODEL) and the CLI may name any path.",
    )
    compute_dtype: Literal["auto", "stored", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="float32, bfloat16, float16 or 'stored' for every model, or 'auto': per model, float32 on CPU "
        "where its float32 weights and KV cache fit the memory budget (BLAS makes it the fast path), else its "
        "quantized weights kept with float32 scales; as stored on GPU (engine/dtype.py).",
    )
    max_tokens_default: int = Field(512, ge=1, description="max_tokens used when a request gives none.")
    max_queue: int = Field(
        32, ge=0, description="Requests waiting for the engine beyond the running batch; more get 503."
    )
    max_batch: int = Field(8, ge=1, description="Sequences decoded together in one engine step.")
    context_length: int = Field(
        0,
        ge=0,
        description="Context length (tokens: prompt + completion) of every model loaded without its own "
        "(POST /api/models/load's or a preset's context_length); 0 means each model's trained length. Clamped "
        "to each model's trained length (as Ollama clamps num_ctx); a llama.cpp model's KV cache is sized by it.",
    )
    admit_window_ms: float = Field(
        50.0,
        ge=0,
        le=1000,
        description="A new request waits up to this long for the rest of its burst (while more keep arriving, at "
        "most one decode step apart), so that requests sent together, or clients coming back together, are "
        "prefilled in one pass instead of one stall of every stream each. 0: never wait.",
    )
    stream_coalesce_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="A streamed answer's writer (chat and text completions, Messages, Responses) waits this long "
        "after each write, so a fast "
        "stream's tokens leave in one write an interval (each still its own event) instead of one wake-up and one "
        "socket write a token: at 16 fast streams the request threads' CPU a token halves and the throughput rises "
        "by a quarter (docs/performance.md). The first token and the answer's end are never held, and a stream "
        "slower than one token an interval is not delayed. 0: a write as each token comes (vLLM's default).",
    )
    prefill_bucket: int = Field(
        -1,
        ge=-1,
        le=2048,
        description="MLX: prompts are prefilled padded to a multiple of this many tokens, so a GPU build reuses the "
        "kernels it compiled for that length (same output). 0: off; -1 (auto): 64 on a GPU (Metal, CUDA), 0 on a CPU.",
    )
    prompt_cache_bytes: int = Field(
        -1,
        ge=-1,
        description="Bytes of KV cache kept in RAM for reuse by later prompts sharing a prefix (0 disables). -1 "
        "(auto): an eighth of this machine's RAM, at most 8 GiB (llama-server's --cache-ram default), at least "
        "256 MiB: one ~4,000-token agent prompt of a 4B model takes ~0.6 GB.",
    )
    prompt_cache_disk_bytes: int = Field(
        0,
        ge=0,
        description="Bytes of prompt cache kept on disk, in <models dir>/.prompt-cache/: finished prefixes (MLX KV "
        "caches, llama.cpp slots) are written there too and found again after a restart. 0 (the default) is off: "
        "the files hold the prompts' tokens, so like llama-server's --slot-save-path it is opted into. Needs "
        "IMPETUS_PROMPT_CACHE_BYTES > 0.",
    )
    mlx_cache_limit: int = Field(
        512 << 20,
        ge=0,
        description="Bytes of freed buffers MLX may keep for reuse (mx.set_cache_limit); bounds RSS growth.",
    )
    malloc: Literal["auto", "jemalloc", "glibc"] = Field(
        "auto",
        description="The C allocator under MLX (Linux; `impetus serve` preloads it): 'auto' is jemalloc when installed "
        "(Debian/Ubuntu libjemalloc2; RSS levels off without page faults for fresh buffers, up to 30 % more throughput "
        "at 8 streams on a 2-core CPU), else glibc; 'glibc' keeps glibc's malloc with the two settings below.",
    )
    malloc_mmap_threshold: int = Field(
        256 << 10,
        ge=0,
        le=32 << 20,
        description="glibc: blocks of this many bytes or more get their own mapping and go back to the system when "
        "freed (mallopt M_MMAP_THRESHOLD); without it freed KV/activation buffers stay in the heap and RSS creeps up. "
        "At most 32 MiB; 0: glibc's default (no creep control, but no page faults for fresh mappings: ~12 % more "
        "throughput at 8 streams on a 2-core CPU, docs/performance.md). Not used under jemalloc.",
    )
    malloc_arena_max: int = Field(
        2,
        ge=0,
        le=64,
        description="glibc: heaps shared by all threads (mallopt M_ARENA_MAX); fewer arenas keep fewer freed scraps "
        "across Gunicorn's threads. 0: glibc's default (8 per core). Not used under jemalloc.",
    )
    memory_budget: int = Field(
        0, ge=0, description="Bytes resident models may take; 0 means 60% of this machine's RAM."
    )
    keep_alive: float = Field(
        300.0, description="Seconds an idle model stays loaded (negative: forever; the default model is always kept)."
    )
    autoload: bool = Field(True, description="Load a local model on demand when a request names one not resident.")
    max_pulls: int = Field(
        16,
        ge=1,
        le=1000,
        description="Hub pulls queued or downloading at once (two download at a time, each on one thread); "
        "POST /api/models/pull beyond it answers 429 with Retry-After.",
    )
    hub_search_timeout: float = Field(
        10.0,
        gt=0,
        le=120,
        description="Seconds a hub search of /api/models/discover may take (connect, each read and the whole "
        "answer; a hub trickling bytes at most twice this); past it the catalogue is answered with hub_error.",
    )
    backend: Literal["auto", "mlx", "llamacpp"] = Field(
        "auto",
        description="Which engine runs GGUF files: 'auto' (the faster one here: where MLX computes on the CPU, every "
        "GGUF on llama.cpp, the embedded default model included as an f16 GGUF; on Metal or MLX's CUDA build the "
        "default model on MLX; /health's backend says which and why), 'mlx' (convert every GGUF to MLX) or "
        "'llamacpp' (every GGUF on llama.cpp, the default model's shipped Q4_1 file included). MLX folders always "
        "run on MLX.",
    )
    llamacpp_threads: int = Field(0, ge=0, description="CPU threads of each llama.cpp model (0: all cores).")
    kv_bits: int = Field(
        0,
        description="KV cache quantization of every model loaded without its own kv_bits: 0 (off: f16), 8 (q8_0, "
        "~0.53x the KV memory) or 4 (q4_0, ~0.28x), as llama-server's -ctk/-ctv and Ollama's "
        "OLLAMA_KV_CACHE_TYPE; on MLX mx.quantize groups of 64 (the same ratios at f16), batching on. A model "
        "whose cache cannot be quantized keeps it unquantized with a logged warning (a load's explicit kv_bits "
        "on it is a 400). docs/llamacpp.md has the measured figures.",
    )
    speculative: str = Field(
        "off",
        pattern=r"^(off|(ngram|draft_model)(:([1-9]|1[0-6]))?)$",
        description="Speculative decoding of every MLX request without its own speculative_config: 'off', "
        "'ngram[:K]' (prompt lookup, K tokens drafted a step, 5 by default) or 'draft_model[:K]' (drafts by "
        "IMPETUS_DRAFT_MODEL); vLLM's methods. The batch keeps its width (every speculating row drafts, one "
        "pass verifies them all); it never changes the answer (docs/performance.md).",
    )
    draft_model: str = Field(
        "",
        max_length=256,
        description="The draft model of speculative_config method 'draft_model' when a request names none "
        "(an MLX model of the same vocabulary, loaded on first use like a request's model).",
    )
    # ---- monitoring (monitoring/, api/ops/metrics.py, api/realtime/)
    metrics_interval: float = Field(
        1.0,
        ge=0.05,
        le=3600,
        description="Seconds between 'metrics' pushes to Socket.IO clients (and monitor samples).",
    )
    thermal_interval: float = Field(5.0, ge=0.05, description="Seconds between readings of the thermal state.")
    thermal_batch_size: int = Field(
        2, ge=0, description="Batch size while the thermal state is serious or critical (0: no thermal adaptation)."
    )
    fault_thermal_state: str = Field(
        "",
        pattern="^(|nominal|fair|serious|critical)$",
        description="Testing only: report this thermal state (nominal, fair, serious, critical) instead of the machine's.",
    )
    fault_engine_crash_after_steps: int = Field(
        0, ge=0, description="Testing only: kill the engine thread after this many decode steps (0: never)."
    )
    log_level: str = Field("info", description="Gunicorn and application log level.")
    log_format: Literal["text", "json"] = Field(
        "text", description="'json': one JSON object per log line, with request id, route, status and duration."
    )
    # ---- production hardening (web/: security, keys, rate_limits, request_log, shutdown)
    api_keys: str = Field(
        "",
        description="Comma-separated inference API keys (at least 16 characters each; shorter ones stop the start); "
        "when any key is set, requests need 'Authorization: Bearer KEY'. Inference keys may generate, embed and "
        "read, but get 403 on management: every POST/PUT/PATCH/DELETE under /api/ (load, unload, pull, delete, "
        "benchmark), /api/config and /api/requests.",
    )
    admin_keys: str = Field(
        "",
        description="Comma-separated admin API keys (at least 16 characters): everything an inference key may do, "
        "plus management. With keys set and no admin key, management is refused to every key.",
    )
    api_key_file: Path | None = Field(
        None,
        description="File of API keys, one per line ('#' starts a comment): 'KEY' (or 'KEY inference') is an "
        "inference key, 'KEY admin' an admin key.",
    )
    auth_fail_limit: str = Field(
        "20/minute",
        description="Failed authentications (a wrong key where one is needed) allowed per client address, in a moving "
        "window, with or without IMPETUS_RATE_LIMIT; beyond it every request from that address that needs a key "
        "gets 429 until the window passes, right keys included (fail2ban-style: keys cannot be guessed). Empty: no "
        "limit.",
    )
    protect_health: bool = Field(
        False, description="Require the key for /health and /metrics too (/health/live and /health/ready stay open)."
    )
    rate_limit: str = Field(
        "",
        description="Requests per API key (or per client IP without one), e.g. '60/minute' or '10/second;500/hour'; "
        "empty: no limit.",
    )
    redis_url: str = Field(
        "",
        description="Redis shared by replicas (redis://host:6379/0): Socket.IO's message queue (events reach the "
        "clients of every replica) and the rate-limit counters; empty: both in-process. See docs/deployment.md.",
    )
    trusted_proxies: int = Field(
        0,
        ge=0,
        le=16,
        description="Proxies in front of the server (load balancer hops) that set X-Forwarded-For/-Proto/-Host: "
        "the client's address for rate limits and logs is taken that many hops back; 0: the headers are ignored.",
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins browsers may call the API from ('*' for any); empty: none."
    )
    allowed_hosts: str = Field(
        "",
        description="Comma-separated host names the server answers to, besides localhost, IP literals and "
        "IMPETUS_HOST ('.example.com' also allows its subdomains, '*' any): a request whose Host header names "
        "another gets 421 host_not_allowed, so a web page cannot reach this server through a DNS name it "
        "controls (DNS rebinding). Behind a proxy (IMPETUS_TRUSTED_PROXIES) X-Forwarded-Host is checked. "
        "The port is ignored.",
    )
    header_timeout: float = Field(
        10.0,
        gt=0,
        le=300,
        description="Seconds a client has to send a request's line and headers (from connecting, or a kept-alive "
        "connection's first byte); heads are read without holding a thread, and a late one closes the "
        "connection (nginx's client_header_timeout).",
    )
    read_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds one read of a request body or one write of a response may wait on the client; a "
        "body must also average 500 bytes/s after this many seconds (Apache mod_reqtimeout's MinRate); a body "
        "read that times out gets 408. WebSockets are exempt.",
    )
    max_socket_sessions: int = Field(
        256,
        ge=1,
        description="Socket.IO (Engine.IO) sessions open at once, each a dashboard tab or client; a handshake "
        "beyond gets 503. Whatever their transport, Socket.IO requests hold at most half the threads "
        "(IMPETUS_THREADS // 2) at once, and a session one long-poll at a time.",
    )
    socket_connect_grace: float = Field(
        10.0,
        ge=0.5,
        le=300,
        description="Seconds an Engine.IO session may stay open without connecting to Socket.IO (so without showing "
        "a key) before it is closed: it holds a WebSocket thread meanwhile. A Socket.IO client connects at once.",
    )
    max_request_bytes: int = Field(8 << 20, ge=1024, description="Largest request body accepted; larger gets 413.")
    # Images in chat requests, for a vision model (serving/images.py; docs/security.md has the attacks refused).
    allow_image_urls: bool = Field(
        False,
        description="Fetch http(s) image URLs in requests (never from loopback, private, link-local or reserved "
        "addresses); off: only data: URLs are taken.",
    )
    image_url_timeout: float = Field(10.0, gt=0, le=120, description="Seconds one image URL fetch may take in all.")
    max_image_bytes: int = Field(20 << 20, ge=1024, description="Largest image (decoded bytes); larger gets 413.")
    max_images: int = Field(8, ge=1, description="Most images in one request; more gets 400.")
    max_image_pixels: int = Field(
        1 << 25, ge=1, description="Most pixels (width x height) of one image, read from its header: more is a 400."
    )
    template_timeout: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Seconds a model's chat template may take to render one request's messages; beyond, the request "
        "ends with 500 chat_template_timeout and its thread is free again (a template is code from the model's files: "
        "nested loops once held a thread and a core for hours). Normal templates take about a millisecond.",
    )
    responses_store_bytes: int = Field(
        64 << 20,
        ge=0,
        description="Bytes (measured as JSON) of /v1/responses kept for previous_response_id and GET/DELETE "
        "/v1/responses/{id} when a request sends store: true; the least recently used go first. In memory, per "
        "process; 0 stores nothing (responses then report store: false).",
    )
    max_tokens_limit: int = Field(
        32768, ge=1, description="Largest max_tokens a request may ask for (the model's context bounds it too)."
    )
    max_request_tokens: int = Field(
        65536,
        ge=1,
        description="Most token work one request may ask for: the completion tokens of all its choices "
        "(n x max_tokens, times its prompts), as OpenAI counts max_tokens x n against a token budget up front; "
        "for /v1/embeddings, the tokens of all its inputs. More gets 400 naming the parameter.",
    )
    request_timeout: float = Field(
        600.0,
        ge=0,
        description="Seconds a generation or embedding may run, streaming or not, queue time included; then its "
        "sequences are cancelled and it ends with an error (504 request_timeout). 600 follows llama.cpp's server "
        "(--timeout) and the OpenAI SDK's default; 0: no limit.",
    )
    shutdown_grace: float = Field(
        30.0, ge=0, description="Seconds in-flight requests get to finish after SIGTERM; readiness is 503 meanwhile."
    )

    @model_validator(mode="after")
    def _apply_profile(self) -> Settings:
        """Fill the profile's defaults into the fields nobody set. ``model_fields_set`` holds exactly the
        fields given by the environment or the mapping; it is restored afterwards, so that it still says
        what was explicit (the profile's values are defaults, not choices)."""
        explicit = set(self.model_fields_set)
        for name, value in PROFILE_DEFAULTS[self.profile].items():
            if name not in explicit:
                setattr(self, name, value)
        self.__pydantic_fields_set__ = explicit
        return self

    def profile_problems(self) -> list[str]:
        """What the profile requires and this configuration lacks (empty: it may start)."""
        return profile_problems(self)

    def check_profile(self) -> None:
        """Refuse to serve a production profile openly on the network (``ProfileError``)."""
        problems = self.profile_problems()
        if problems:
            raise ProfileError(refusal(self.profile, self.host, problems))

    def memory_budget_bytes(self) -> int:
        if self.memory_budget:
            return self.memory_budget
        import psutil

        return int(psutil.virtual_memory().total * 0.6)

    def prompt_cache_bytes_value(self) -> int:
        """IMPETUS_PROMPT_CACHE_BYTES, with -1 (auto) resolved for this machine."""
        if self.prompt_cache_bytes >= 0:
            return self.prompt_cache_bytes
        import psutil

        return max(256 << 20, min(8 << 30, psutil.virtual_memory().total // 8))

    def dashboard_path(self) -> Path:
        if self.dashboard_dir is not None:
            return self.dashboard_dir
        return Path(__file__).resolve().parent.parent / "impetus-dashboard" / "dist"

    def keep_alive_seconds(self) -> float:
        return math.inf if self.keep_alive < 0 else self.keep_alive

    @field_validator("kv_bits")
    @classmethod
    def _kv_bits(cls, value: int) -> int:
        if value not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS} (0: off), not {value}")
        return value

    @field_validator("rate_limit", "auth_fail_limit")
    @classmethod
    def _rate_limit(cls, value: str) -> str:
        if value.strip():
            from limits import parse_many

            parse_many(value)  # ValueError: "couldn't parse rate limit string ..."
        return value.strip()

    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def allowed_host_list(self) -> list[str]:
        return [h.strip().lower() for h in self.allowed_hosts.split(",") if h.strip()]

    @classmethod
    def from_mapping(cls, overrides: dict[str, Any] | None = None) -> Settings:
        """Environment first, then explicit overrides (as the app factory's ``config`` argument)."""
        return cls(**(overrides or {}))
