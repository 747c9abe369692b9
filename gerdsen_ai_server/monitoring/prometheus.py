"""Prometheus collectors, shared by /metrics and (through the monitor) the dashboard feed.

Two kinds: counters and histograms the HTTP layer updates as requests finish (requests by route
and status, latency, time to first token, tokens in and out, per-request tok/s), and
``EngineCollector``, which reads the engine and the monitor at scrape time (queue depth, active
sequences, batch size and cap, prompt-cache hits, resident model memory, process RSS, thermal
state) so nothing has to keep gauges in step.

Each app gets its own ``CollectorRegistry`` (tests build several apps in one process). One
Gunicorn worker serves the whole replica (gunicorn_conf.py), so prometheus-client's multiprocess
mode is not needed; a deployment with several workers per replica would need it
(PROMETHEUS_MULTIPROC_DIR and ``multiprocess.MultiProcessCollector``), and the engine gauges would
then have to come from each worker.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from dataclasses import dataclass

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, StateSetMetricFamily
from prometheus_client.registry import Collector

from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.engine.protocol import TokenStream
from gerdsen_ai_server.monitoring.monitor import Monitor
from gerdsen_ai_server.runtime.memory import malloc_info
from gerdsen_ai_server.schemas.hardware import THERMAL_STATES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


@dataclass
class SequenceMeasure:
    ttft_s: float | None
    tokens_per_second: float | None
    prompt_tokens: int
    completion_tokens: int
    outcome: str  # finished, error or cancelled


class Metrics:
    def __init__(self, engine: InferenceEngine, monitor: Monitor) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            "impetus_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_latency = Histogram(
            "impetus_http_request_duration_seconds",
            "Time from request to the last byte of the response (streams included).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "impetus_time_to_first_token_seconds",
            "Time from submission to the first generated token, per sequence.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "impetus_prompt_tokens", "Prompt tokens of finished requests (tokens in).", ["model"], registry=r
        )
        self.completion_tokens = Counter(
            "impetus_completion_tokens", "Generated tokens of finished requests (tokens out).", ["model"], registry=r
        )
        self.tokens_per_second = Histogram(
            "impetus_request_tokens_per_second",
            "Decode rate of each sequence after its first token.",
            ["model"],
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.sequences = Counter(
            "impetus_sequences",
            "Generated sequences by outcome (finished, error, cancelled).",
            ["model", "outcome"],
            registry=r,
        )
        r.register(EngineCollector(engine, monitor))

    def observe_stream(self, stream: TokenStream) -> SequenceMeasure:
        """Record one finished (or abandoned) sequence; returns what was measured."""
        model = stream.request.model
        ttft = stream.first_token_at - stream.created if stream.first_token_at is not None else None
        tps = None
        if stream.first_token_at is not None and stream.finished_at is not None and stream.completion_tokens > 1:
            elapsed = stream.finished_at - stream.first_token_at
            tps = (stream.completion_tokens - 1) / elapsed if elapsed > 0 else None
        outcome = "error" if stream.error else "finished" if stream.finished_at is not None else "cancelled"
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
        if tps is not None:
            self.tokens_per_second.labels(model).observe(tps)
        self.prompt_tokens.labels(model).inc(len(stream.request.prompt_tokens))
        self.completion_tokens.labels(model).inc(stream.completion_tokens)
        self.sequences.labels(model, outcome).inc()
        return SequenceMeasure(ttft, tps, len(stream.request.prompt_tokens), stream.completion_tokens, outcome)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class EngineCollector(Collector):
    """Values read at scrape time from the engine's counters and the monitor's last sample."""

    def __init__(self, engine: InferenceEngine, monitor: Monitor) -> None:
        self.engine = engine
        self.monitor = monitor
        self.process = psutil.Process()

    def collect(self) -> Iterator[Metric]:
        engine, stats = self.engine, self.engine.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("impetus_engine_alive", "1 while the inference engine thread runs.", int(engine.is_alive()))
        yield gauge("impetus_requests_in_flight", "Sequences submitted and not finished.", stats.requests_in_flight)
        yield gauge("impetus_queue_depth", "Sequences waiting to join the running batch.", stats.queued_sequences)
        yield gauge("impetus_active_sequences", "Sequences in the running batch.", stats.active_sequences)
        yield gauge("impetus_batch_size_max", "Configured batch size (IMPETUS_MAX_BATCH).", engine.max_batch)
        yield gauge(
            "impetus_batch_size_limit",
            "Batch size in force: lower than the maximum while the machine is hot.",
            min(engine.max_batch, engine.batch_limit or engine.max_batch),
        )
        yield gauge(
            "impetus_thermal_batch_limited",
            "1 while thermal adaptation caps the batch.",
            int(engine.batch_limit is not None),
        )
        yield counter("impetus_engine_steps", "Decode steps of the engine.", stats.steps_total)
        yield counter(
            "impetus_engine_prompt_tokens", "Prompt tokens admitted by the engine.", stats.prompt_tokens_total
        )
        yield counter(
            "impetus_engine_generated_tokens", "Tokens generated by the engine.", stats.generated_tokens_total
        )
        yield counter(
            "impetus_speculative_drafted_tokens",
            "Tokens drafted by speculative decoding (prompt lookup or a draft model).",
            stats.speculative_drafted_total,
        )
        yield counter(
            "impetus_speculative_accepted_tokens",
            "Drafted tokens the model accepted.",
            stats.speculative_accepted_total,
        )
        yield counter(
            "impetus_speculative_passes",
            "Verification passes of speculative decoding (one a batch step, for every row that drafted).",
            stats.speculative_passes_total,
        )
        yield counter(
            "impetus_speculative_rows",
            "Sequences that drafted, summed over the verification passes (rows a pass: rows / passes).",
            stats.speculative_rows_total,
        )
        yield counter(
            "impetus_prompt_cache_hits", "Prompts that reused a cached KV prefix.", stats.prompt_cache_hits_total
        )
        yield counter("impetus_prompt_cache_misses", "Prompts with no cached prefix.", stats.prompt_cache_misses_total)
        yield gauge("impetus_prompt_cache_bytes", "Bytes of KV cache held for reuse.", stats.prompt_cache_bytes)
        yield from prompt_cache_tiers(self.engine)
        outcomes = CounterMetricFamily(
            "impetus_engine_requests", "Sequences the engine ended, by outcome.", labels=["outcome"]
        )
        outcomes.add_metric(["finished"], stats.requests_finished_total)
        outcomes.add_metric(["failed"], stats.requests_failed_total)
        outcomes.add_metric(["cancelled"], stats.requests_cancelled_total)
        yield outcomes
        models = GaugeMetricFamily(
            "impetus_model_resident_bytes", "Bytes of weights of each resident model.", labels=["model"]
        )
        for loaded in engine.models():
            models.add_metric([loaded.model_id], loaded.nbytes)
        yield models
        yield gauge(
            "impetus_process_resident_memory_bytes",
            "Resident set size of this server process.",
            self.process.memory_info().rss,
        )
        yield gauge(
            "impetus_tokens_per_second",
            "Engine-wide generated tokens per second over the last interval.",
            self.monitor.throughput.last_rate,
        )
        for key, value in self.monitor.mlx_memory.items():
            yield gauge(f"impetus_mlx_{key}", f"MLX {key.replace('_', ' ')[:-6]} (bytes).", value)
        heap = malloc_info()
        if heap is not None:  # glibc or jemalloc: what RSS is made of beyond MLX's own counters (memory.py)
            yield gauge(
                "impetus_malloc_in_use_bytes",
                "Bytes the C heap has handed out (MLX buffers included).",
                heap["in_use_bytes"],
            )
            yield gauge(
                "impetus_malloc_free_bytes",
                "Bytes the C heap keeps resident but not handed out (freed, not yet given back).",
                heap["free_bytes"],
            )
        yield gauge(
            "impetus_python_gc_objects", "Objects tracked by Python's garbage collector.", len(gc.get_objects())
        )
        thermal = self.monitor.thermal.state if self.monitor.thermal else None
        states = StateSetMetricFamily(
            "impetus_thermal_state",
            "Thermal state (all false when unknown).",
            value={s: s == thermal for s in THERMAL_STATES},
        )
        yield states
        yield gauge(
            "impetus_thermal_level",
            "Thermal state as a number: 0 nominal .. 3 critical, -1 unknown.",
            THERMAL_STATES.index(thermal) if thermal else -1,
        )


def prompt_cache_tiers(engine: InferenceEngine) -> Iterator[Metric]:
    """Hits, misses and bytes of each prompt-cache tier (engine/prompt_cache.py): live (L1, the
    running batches' KV: bytes only), ram (L2) and disk (L3, IMPETUS_PROMPT_CACHE_DISK_BYTES)."""
    tiers = engine.prompt_cache.tiers()
    hits = CounterMetricFamily(
        "impetus_prompt_cache_tier_hits", "Prompts whose cached prefix came from a tier.", labels=["tier"]
    )
    misses = CounterMetricFamily(
        "impetus_prompt_cache_tier_misses", "Prompts that found no cached prefix in a tier.", labels=["tier"]
    )
    held = GaugeMetricFamily("impetus_prompt_cache_tier_bytes", "Bytes of KV cache each tier holds.", labels=["tier"])
    for name, tier in tiers.items():
        held.add_metric([name], tier.bytes)
        if name != "live":
            hits.add_metric([name], tier.hits)
            misses.add_metric([name], tier.misses)
    disk = tiers["disk"]
    yield from (hits, misses, held)
    yield CounterMetricFamily("impetus_prompt_cache_disk_writes", "Prompt-cache files written.", value=disk.writes)
    yield CounterMetricFamily(
        "impetus_prompt_cache_disk_rejected",
        "Prompt-cache files refused and deleted (corrupt, stale).",
        value=disk.rejected,
    )
