"""Wire format of GET /api/hardware (and the Socket.IO ``hardware`` event).

Every section a probe may fail to read is nullable; ``unavailable`` says why each null one is null.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

# Apple's ProcessInfo.ThermalState names; Linux and NVIDIA readings are mapped onto them.
ThermalState = Literal["nominal", "fair", "serious", "critical"]
THERMAL_STATES: tuple[ThermalState, ...] = ("nominal", "fair", "serious", "critical")


class PlatformInfo(BaseModel):
    system: str = Field(description="Linux, Darwin, ...")
    release: str
    machine: str = Field(description="x86_64, arm64, ...")
    python: str
    probe: str = Field(description="Which probe answered: linux, apple or generic (psutil only).")


class CpuInfo(BaseModel):
    brand: str | None = Field(
        None, description="Apple: sysctl machdep.cpu.brand_string; Linux: /proc/cpuinfo model name."
    )
    cores_physical: int | None = None
    cores_logical: int | None = None
    performance_cores: int | None = Field(None, description="Apple Silicon: hw.perflevel0.physicalcpu.")
    efficiency_cores: int | None = Field(None, description="Apple Silicon: hw.perflevel1.physicalcpu.")


class MemoryInfo(BaseModel):
    total_bytes: int
    available_bytes: int
    used_percent: float
    unified: bool = Field(description="CPU and GPU share this memory (Apple Silicon).")


class GpuInfo(BaseModel):
    vendor: str
    name: str
    index: int | None = None
    cores: int | None = Field(None, description="Apple: GPU cores (system_profiler).")
    memory_total_bytes: int | None = None
    memory_used_bytes: int | None = None
    utilization_percent: float | None = None
    temperature_c: float | None = None
    clock_mhz: float | None = None
    clock_max_mhz: float | None = None


class MlxInfo(BaseModel):
    version: str
    device: str = Field(description="MLX's default device: cpu or gpu.")
    device_name: str | None = None
    architecture: str | None = None
    active_memory_bytes: int | None = None
    peak_memory_bytes: int | None = None
    cache_memory_bytes: int | None = None
    compute_dtype: str = Field(description="dtype the engine computes in ('as stored' when weights keep theirs).")
    blas: str = Field(description="openblas, reference (the mlx[cpu] wheel's own) or accelerate.")
    allocator: str = Field(description="The C allocator under MLX: jemalloc, glibc or system.")


class FrequencyInfo(BaseModel):
    current_mhz: float | None = None
    min_mhz: float | None = None
    max_mhz: float | None = None


class SensorReading(BaseModel):
    sensor: str
    label: str
    current_c: float
    high_c: float | None = None
    critical_c: float | None = None


class ThermalInfo(BaseModel):
    state: ThermalState
    source: str = Field(description="Where the state came from: notify, pmset, psutil, sysfs, nvidia-smi, injected.")
    cpu_speed_limit_percent: int | None = Field(None, description="Apple: pmset's CPU_Speed_Limit (100: none).")
    sensors: list[SensorReading] = Field(default_factory=list)


class ThrottlingInfo(BaseModel):
    throttled: bool | None = Field(None, description="null when nothing can tell.")
    reasons: list[str] = Field(default_factory=list)
    cpu_frequency_ratio: float | None = Field(None, description="Current over maximum CPU frequency.")
    tokens_per_second_recent: float | None = Field(None, description="Engine throughput over the last busy 30 s.")
    tokens_per_second_peak: float | None = Field(None, description="Best 30 s throughput since start.")
    throughput_drop: float | None = Field(
        None, description="1 - recent / peak: a sustained drop under steady load hints at throttling."
    )


class BatchInfo(BaseModel):
    max_batch: int = Field(description="IMPETUS_MAX_BATCH.")
    batch_limit: int | None = Field(None, description="The lower cap in force (thermal adaptation), or null.")
    thermal_batch_size: int = Field(description="IMPETUS_THERMAL_BATCH_SIZE (0: adaptation off).")


class HardwareReport(BaseModel):
    platform: PlatformInfo
    cpu: CpuInfo | None
    memory: MemoryInfo | None
    gpus: list[GpuInfo] | None
    mlx: MlxInfo | None
    frequency: FrequencyInfo | None
    thermal: ThermalInfo | None
    throttling: ThrottlingInfo
    batch: BatchInfo
    unavailable: dict[str, str] = Field(
        default_factory=dict,
        description="Section name -> why it is null (a probe that failed never fails the request).",
    )
    sampled_at: float = Field(description="Unix time of the reading.")
