"""The monitor: one background thread that samples the engine and the machine.

Every ``IMPETUS_METRICS_INTERVAL`` seconds it publishes a ``metrics`` event on the engine's event
bus (Socket.IO forwards it to the ``metrics`` room); every ``IMPETUS_THERMAL_INTERVAL`` seconds it
reads the thermal state and, through ``ThermalGovernor``, caps the engine's batch while the machine
is serious or critical. /metrics and /api/hardware read what it last sampled.

MLX: this thread reads only MLX's memory counters and device facts (``mx.get_active_memory()`` and
friends), which create no stream and no per-thread state (measured: 300 short-lived threads calling
them left no OS thread behind, where threads that compute leak one each). It is also one
long-lived thread. Everything that computes stays on the engine thread.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import psutil

from gerdsen_ai_server.engine.engine import InferenceEngine
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.monitoring.probes.base import HardwareProbe, platform_info, read
from gerdsen_ai_server.runtime.blas import blas_in_use
from gerdsen_ai_server.runtime.memory import allocator
from gerdsen_ai_server.schemas.hardware import (
    BatchInfo,
    FrequencyInfo,
    HardwareReport,
    MlxInfo,
    ThermalInfo,
    ThermalState,
    ThrottlingInfo,
)

log = logging.getLogger(__name__)

HOT: tuple[ThermalState, ...] = ("serious", "critical")
THROTTLE_FREQUENCY_RATIO = 0.9  # below this share of its maximum clock, the CPU counts as throttled
THROTTLE_THROUGHPUT_DROP = 0.3  # recent throughput this far below the best hints at throttling
# A hardware report is reused for this long: each one runs every probe (nvidia-smi on NVIDIA hosts,
# sysctl/pmset on macOS), and /api/hardware or a Socket.IO client asking in a loop must not spawn
# a process per request.
REPORT_MAX_AGE_S = 1.0


class Throughput:
    """Engine-wide decode rate: the last interval's, the last ``window`` busy seconds', and the best
    window seen. Under steady load a lasting drop from the best hints at thermal throttling."""

    def __init__(self, window: float = 30.0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int, float]] = deque()  # (time, tokens, busy seconds)
        self.last_rate = 0.0
        self.peak: float | None = None
        self._last: tuple[float, int] | None = None
        self._lock = threading.Lock()  # the monitor adds; request threads read

    def add(self, now: float, generated_total: int, busy: bool) -> None:
        with self._lock:
            if self._last is not None:
                elapsed, tokens = now - self._last[0], generated_total - self._last[1]
                self.last_rate = tokens / elapsed if elapsed > 0 else 0.0
                if busy or tokens:
                    self.samples.append((now, tokens, elapsed))
            self._last = (now, generated_total)
            while self.samples and self.samples[0][0] < now - self.window:
                self.samples.popleft()
        recent = self.recent()
        if recent is not None and self.busy_seconds() >= self.window / 2:
            self.peak = max(self.peak or 0.0, recent)

    def _snapshot(self) -> list[tuple[float, int, float]]:
        with self._lock:
            return list(self.samples)

    def busy_seconds(self) -> float:
        return sum(s[2] for s in self._snapshot())

    def recent(self) -> float | None:
        samples = self._snapshot()
        busy = sum(s[2] for s in samples)
        return sum(s[1] for s in samples) / busy if busy > 0 else None

    def drop(self) -> float | None:
        recent = self.recent()
        if recent is None or not self.peak or self.busy_seconds() < self.window / 2:
            return None
        return max(0.0, 1.0 - recent / self.peak)


class ThermalGovernor:
    """Caps the engine's batch at ``reduced`` while the machine is serious or critical and lifts the
    cap once it is back to fair or nominal. An unknown state changes nothing; ``reduced`` 0 is off."""

    def __init__(self, set_limit: Callable[[int | None], None], reduced: int, max_batch: int) -> None:
        self.set_limit = set_limit
        self.reduced = reduced
        self.max_batch = max_batch
        self.limit: int | None = None

    def update(self, state: ThermalState | None) -> int | None:
        if state is None or not 0 < self.reduced < self.max_batch:
            return self.limit
        want = self.reduced if state in HOT else None
        if want != self.limit:
            log.warning(
                "thermal state %s: batch size %s",
                state,
                f"capped at {want}" if want is not None else f"back to {self.max_batch}",
            )
            self.limit = want
            self.set_limit(want)
        return self.limit


class Monitor:
    def __init__(
        self,
        engine: InferenceEngine,
        probe: HardwareProbe,
        events: EventBus,
        *,
        interval: float = 1.0,
        thermal_interval: float = 5.0,
        thermal_batch_size: int = 0,
    ) -> None:
        self.engine = engine
        self.probe = probe
        self.events = events
        self.interval = interval
        self.thermal_interval = thermal_interval
        self.thermal_batch_size = thermal_batch_size
        self.governor = ThermalGovernor(engine.set_batch_limit, thermal_batch_size, engine.max_batch)
        self.throughput = Throughput()
        self.thermal: ThermalInfo | None = None
        self.thermal_reason: str | None = "not read yet"
        self.mlx_memory: dict[str, int] = {}
        self.mlx_device: dict[str, str | None] = {}
        self.last_sample: dict[str, Any] = {}
        self._process = psutil.Process()
        self._report: tuple[float, HardwareReport] | None = None  # (monotonic time read, report)
        self._report_lock = threading.Lock()
        self._stopping = threading.Event()
        self._next_thermal = 0.0

    # ---- the loop (its own thread: socketio.start_background_task) ---------------------------
    def run(self, sleep: Callable[[float], None] = time.sleep) -> None:
        self._read_device()
        deadline = time.monotonic()
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception:  # a bad sample must not end the loop (and with it thermal adaptation)
                log.exception("monitor tick failed")
            deadline += self.interval
            sleep(max(0.0, deadline - time.monotonic()))
            if time.monotonic() - deadline > self.interval:
                deadline = time.monotonic()  # fell behind (a suspended machine): do not burst to catch up

    def stop(self) -> None:
        self._stopping.set()

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self._next_thermal:
            self.check_thermal()
            self._next_thermal = now + self.thermal_interval
        stats = self.engine.stats()
        self.throughput.add(now, stats.generated_tokens_total, busy=stats.active_sequences > 0)
        self._read_mlx_memory()
        self.last_sample = self.sample(dataclasses.asdict(stats))
        self.events.publish("metrics", **self.last_sample)  # publish() stamps the server time

    def check_thermal(self) -> None:
        before = self.thermal.state if self.thermal else None
        self.thermal, self.thermal_reason = read(self.probe, "thermal")
        state = self.thermal.state if self.thermal else None
        self.governor.update(state)
        if state != before and before is not None:
            self.events.publish("hardware", **self.hardware_report(max_age=0).model_dump())

    # ---- what the loop measures ---------------------------------------------------------------
    def sample(self, engine_stats: dict[str, Any]) -> dict[str, Any]:
        vm = psutil.virtual_memory()
        engine_stats.update(alive=self.engine.is_alive(), batch_limit=self.engine.batch_limit)
        return {
            "interval_s": self.interval,
            "engine": engine_stats,
            "tokens_per_second": round(self.throughput.last_rate, 3),
            "tokens_per_second_recent": self.throughput.recent(),
            "models": [{"id": m.model_id, "bytes": m.nbytes} for m in self.engine.models()],
            "process": {"rss_bytes": self._process.memory_info().rss, "cpu_percent": self._process.cpu_percent(None)},
            "system": {
                "cpu_percent": psutil.cpu_percent(None),
                "memory_used_percent": vm.percent,
                "memory_available_bytes": vm.available,
            },
            "mlx": dict(self.mlx_memory),
            "thermal_state": self.thermal.state if self.thermal else None,
        }

    def _read_device(self) -> None:
        try:
            import mlx.core as mx

            info = mx.device_info()
            version: str = getattr(mx, "__version__", "")  # mlx.core's stubs omit it; the module has it
            self.mlx_device = {
                "version": version,
                "device": mx.default_device().type.name,
                "device_name": str(info.get("device_name") or "") or None,
                "architecture": str(info.get("architecture") or "") or None,
            }
        except Exception as exc:
            log.warning("could not read MLX's device: %s", exc)

    def _read_mlx_memory(self) -> None:
        try:
            import mlx.core as mx

            self.mlx_memory = {
                "active_memory_bytes": mx.get_active_memory(),
                "peak_memory_bytes": mx.get_peak_memory(),
                "cache_memory_bytes": mx.get_cache_memory(),
            }
        except Exception as exc:
            log.debug("could not read MLX's memory counters: %s", exc)

    def mlx_info(self) -> MlxInfo | None:
        if not self.mlx_device:
            return None
        return MlxInfo(
            **self.mlx_device,
            **self.mlx_memory,
            compute_dtype=self.engine.compute_dtype or "as stored",
            blas=blas_in_use(),
            allocator=allocator(),
        )

    def throttling(self, frequency: FrequencyInfo | None, thermal: ThermalInfo | None) -> ThrottlingInfo:
        reasons = []
        ratio = None
        if frequency and frequency.current_mhz and frequency.max_mhz:
            ratio = round(frequency.current_mhz / frequency.max_mhz, 3)
            if ratio < THROTTLE_FREQUENCY_RATIO:
                reasons.append(f"the CPU runs at {ratio:.0%} of its maximum frequency")
        if thermal is not None:
            if thermal.cpu_speed_limit_percent is not None and thermal.cpu_speed_limit_percent < 100:
                reasons.append(f"macOS limits the CPU to {thermal.cpu_speed_limit_percent}% of its speed")
            if thermal.state in HOT:
                reasons.append(f"the thermal state is {thermal.state}")
        drop = self.throughput.drop()
        if drop is not None and drop >= THROTTLE_THROUGHPUT_DROP:
            reasons.append(f"throughput is {drop:.0%} below its best (a hint: load changes it too)")
        known = ratio is not None or thermal is not None
        recent = self.throughput.recent()
        return ThrottlingInfo(
            throttled=bool(reasons) if (known or reasons) else None,
            reasons=reasons,
            cpu_frequency_ratio=ratio,
            tokens_per_second_recent=round(recent, 3) if recent is not None else None,
            tokens_per_second_peak=round(self.throughput.peak, 3) if self.throughput.peak else None,
            throughput_drop=round(drop, 3) if drop is not None else None,
        )

    def hardware_report(self, max_age: float = REPORT_MAX_AGE_S) -> HardwareReport:
        """The hardware report, read at most ``max_age`` seconds ago. One reading at a time: callers
        that arrive while the probes run wait for that reading instead of starting their own."""
        with self._report_lock:
            if self._report is not None and time.monotonic() - self._report[0] < max_age:
                return self._report[1]
            report = self.read_hardware()
            self._report = (time.monotonic(), report)
            return report

    def read_hardware(self) -> HardwareReport:
        """Every probe read now (each may fail on its own), with MLX's last sampled counters."""
        values: dict[str, Any] = {}
        unavailable: dict[str, str] = {}
        for section in ("cpu", "memory", "gpus", "frequency", "thermal"):
            values[section], reason = read(self.probe, section)
            if reason is not None:
                unavailable[section] = reason
        mlx = self.mlx_info()
        if mlx is None:
            unavailable["mlx"] = "MLX's device has not been read yet"
        return HardwareReport(
            platform=platform_info(self.probe),
            mlx=mlx,
            **values,
            throttling=self.throttling(values["frequency"], values["thermal"]),
            batch=BatchInfo(
                max_batch=self.engine.max_batch,
                batch_limit=self.engine.batch_limit,
                thermal_batch_size=self.thermal_batch_size,
            ),
            unavailable=unavailable,
            sampled_at=time.time(),
        )
