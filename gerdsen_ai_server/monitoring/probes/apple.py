"""The Apple (macOS) probe: ``sysctl``, ``pmset -g therm``, ``system_profiler`` and the notify(3)
thermal pressure level, each parsed by a pure function so it is tested against recorded output on
any machine."""

from __future__ import annotations

import ctypes
import logging
import platform
import re

from gerdsen_ai_server.monitoring.probes.base import ProbeUnavailable, run_command, worst
from gerdsen_ai_server.monitoring.probes.generic import psutil_frequency, psutil_memory
from gerdsen_ai_server.schemas.hardware import CpuInfo, FrequencyInfo, GpuInfo, MemoryInfo, ThermalInfo, ThermalState

log = logging.getLogger(__name__)

SYSCTL_KEYS = [
    "machdep.cpu.brand_string",
    "hw.physicalcpu",
    "hw.logicalcpu",
    "hw.perflevel0.physicalcpu",
    "hw.perflevel1.physicalcpu",
]
# OSThermalNotification.h pressure levels -> ProcessInfo.ThermalState names.
PRESSURE_LEVELS: dict[int, ThermalState] = {0: "nominal", 1: "fair", 2: "serious", 3: "critical", 4: "critical"}


def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl key ...`` output ('key: value' lines); unknown keys go to stderr and are simply absent."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            values[key.strip()] = value.strip()
    return values


def _int(values: dict[str, str], key: str) -> int | None:
    value = values.get(key, "")
    return int(value) if value.isdigit() else None


def apple_cpu(values: dict[str, str]) -> CpuInfo:
    return CpuInfo(
        brand=values.get("machdep.cpu.brand_string") or None,
        cores_physical=_int(values, "hw.physicalcpu"),
        cores_logical=_int(values, "hw.logicalcpu"),
        performance_cores=_int(values, "hw.perflevel0.physicalcpu"),
        efficiency_cores=_int(values, "hw.perflevel1.physicalcpu"),
    )


def speed_limit_state(limit: int) -> ThermalState:
    return "nominal" if limit >= 100 else "fair" if limit >= 80 else "serious" if limit >= 50 else "critical"


def parse_pmset_therm(text: str) -> ThermalInfo:
    """``pmset -g therm``: 'Note: No thermal warning level has been recorded' when all is well;
    'CPU_Speed_Limit = N' (percent) once macOS has slowed the CPU; a recorded warning level."""
    limit: int | None = None
    states: list[ThermalState] = []
    recognised = False
    for line in text.splitlines():
        line = line.strip()
        if match := re.match(r"CPU_Speed_Limit\s*=\s*(\d+)", line):
            limit = int(match.group(1))
            states.append(speed_limit_state(limit))
            recognised = True
        elif re.search(r"(thermal|performance) warning level", line, re.IGNORECASE):
            recognised = True
            level = re.search(r"warning level\D*(\d+)", line, re.IGNORECASE)
            if "has been recorded" not in line and level and int(level.group(1)) > 0:
                states.append("serious")
    if not recognised:
        raise ProbeUnavailable(f"pmset -g therm: unrecognised output {text.strip()[:120]!r}")
    return ThermalInfo(state=worst(states), source="pmset", cpu_speed_limit_percent=limit)


def _size_bytes(text: str) -> int | None:
    match = re.match(r"([\d.]+)\s*(GB|MB)", text.strip())
    if not match:
        return None
    return int(float(match.group(1)) * (1 << (30 if match.group(2) == "GB" else 20)))


def parse_system_profiler_displays(text: str) -> list[GpuInfo]:
    """``system_profiler SPDisplaysDataType``: one 'Chipset Model:' block per GPU."""
    gpus: list[GpuInfo] = []
    for line in text.splitlines():
        key, sep, value = line.strip().partition(":")
        value = value.strip()
        if not sep or not value:
            continue
        if key == "Chipset Model":
            gpus.append(GpuInfo(vendor="Apple" if value.startswith("Apple") else "unknown", name=value))
        elif gpus and key == "Total Number of Cores" and value.isdigit():
            gpus[-1].cores = int(value)
        elif gpus and key == "Vendor":
            gpus[-1].vendor = re.sub(r"\s*\(0x[0-9a-fA-F]+\)$", "", value)
        elif gpus and key.startswith("VRAM"):
            gpus[-1].memory_total_bytes = _size_bytes(value)
    return gpus


def thermal_pressure_level() -> int:
    """macOS's thermal pressure level (the notify(3) key behind ProcessInfo.thermalState)."""
    lib = ctypes.CDLL("/usr/lib/libSystem.B.dylib")
    lib.notify_register_check.argtypes = [ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)]
    lib.notify_register_check.restype = ctypes.c_uint32
    lib.notify_get_state.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
    lib.notify_get_state.restype = ctypes.c_uint32
    token, state = ctypes.c_int(0), ctypes.c_uint64(0)
    if lib.notify_register_check(b"com.apple.system.thermalpressurelevel", ctypes.byref(token)) != 0:
        raise ProbeUnavailable("notify_register_check(com.apple.system.thermalpressurelevel) failed")
    try:
        if lib.notify_get_state(token, ctypes.byref(state)) != 0:
            raise ProbeUnavailable("notify_get_state failed")
    finally:
        lib.notify_cancel(token)
    return int(state.value)


class AppleProbe:
    name = "apple"

    def __init__(self) -> None:
        self._sysctl: dict[str, str] | None = None
        self._gpus: list[GpuInfo] | None = None

    def sysctl(self) -> dict[str, str]:
        if self._sysctl is None:  # static facts: ask once
            self._sysctl = parse_sysctl(run_command(["sysctl", *SYSCTL_KEYS]))
        return self._sysctl

    def cpu(self) -> CpuInfo:
        return apple_cpu(self.sysctl())

    def memory(self) -> MemoryInfo:
        return psutil_memory(unified=platform.machine() == "arm64")

    def gpus(self) -> list[GpuInfo]:
        if self._gpus is None:  # system_profiler takes about a second: ask once
            self._gpus = parse_system_profiler_displays(run_command(["system_profiler", "SPDisplaysDataType"], 20))
        if not self._gpus:
            raise ProbeUnavailable("system_profiler SPDisplaysDataType listed no GPU")
        return [gpu.model_copy() for gpu in self._gpus]

    def frequency(self) -> FrequencyInfo:
        return psutil_frequency()

    def thermal(self) -> ThermalInfo:
        try:
            level = thermal_pressure_level()
        except Exception as exc:  # fall back to pmset's record
            log.debug("thermal pressure level unavailable: %s", exc)
        else:
            info = ThermalInfo(state=PRESSURE_LEVELS.get(level, "critical"), source="notify")
            try:  # pmset adds the CPU speed limit where macOS reports one
                info.cpu_speed_limit_percent = parse_pmset_therm(
                    run_command(["pmset", "-g", "therm"])
                ).cpu_speed_limit_percent
            except ProbeUnavailable:
                pass
            return info
        return parse_pmset_therm(run_command(["pmset", "-g", "therm"]))
