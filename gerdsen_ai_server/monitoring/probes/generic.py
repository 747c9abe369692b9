"""The psutil probe: memory, frequency and CPU as every OS but macOS reads them; ``GenericProbe``
for a platform with no probe of its own (no thermal state)."""

from __future__ import annotations

import platform
import sys

import psutil

from gerdsen_ai_server.monitoring.probes.base import ProbeUnavailable
from gerdsen_ai_server.monitoring.probes.nvidia import nvidia_gpus
from gerdsen_ai_server.schemas.hardware import CpuInfo, FrequencyInfo, GpuInfo, MemoryInfo, ThermalInfo


def psutil_memory(unified: bool) -> MemoryInfo:
    vm = psutil.virtual_memory()
    return MemoryInfo(total_bytes=vm.total, available_bytes=vm.available, used_percent=vm.percent, unified=unified)


def psutil_frequency() -> FrequencyInfo:
    freq = psutil.cpu_freq()
    if freq is None:
        raise ProbeUnavailable("the CPU frequency is not exposed (psutil.cpu_freq() is None)")
    # psutil reports 0 for a bound it cannot read (e.g. no cpufreq driver in a VM).
    return FrequencyInfo(current_mhz=freq.current or None, min_mhz=freq.min or None, max_mhz=freq.max or None)


def psutil_cpu(brand: str | None) -> CpuInfo:
    return CpuInfo(brand=brand, cores_physical=psutil.cpu_count(logical=False), cores_logical=psutil.cpu_count())


class PsutilProbe:
    """Memory (never unified), GPUs (nvidia-smi) and frequency as every OS but macOS reads them:
    the base of LinuxProbe and GenericProbe."""

    def memory(self) -> MemoryInfo:
        return psutil_memory(unified=False)

    def gpus(self) -> list[GpuInfo]:
        return nvidia_gpus()

    def frequency(self) -> FrequencyInfo:
        return psutil_frequency()


class GenericProbe(PsutilProbe):
    name = "generic"

    def cpu(self) -> CpuInfo:
        return psutil_cpu(platform.processor() or None)

    def thermal(self) -> ThermalInfo:
        raise ProbeUnavailable(f"no thermal probe for {sys.platform}")
