"""Hardware probes behind one interface: what this machine is, how hot it runs.

``probe_for_this_machine()`` picks ``LinuxProbe`` or ``AppleProbe`` (``GenericProbe``, psutil only,
anywhere else). A probe method returns its section or raises; ``read(probe, section)`` turns any
failure into ``(None, reason)``, so a machine without sensors, ``sysctl`` or ``nvidia-smi`` gets
nulls with reasons, never a 500. The Apple and NVIDIA paths parse command output with pure functions
(``parse_sysctl``, ``parse_pmset_therm``, ``parse_system_profiler_displays``, ``parse_nvidia_smi``)
so they are tested against recorded outputs on any machine.

Thermal states use Apple's names (nominal < fair < serious < critical); Linux temperatures and
trip points are mapped onto them. A leaf module: no Flask, no MLX (monitor.py reads MLX's counters).
"""

from __future__ import annotations

import csv
import ctypes
import io
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

import psutil

from gerdsen_ai_server.schemas.hardware import (
    THERMAL_STATES,
    CpuInfo,
    FrequencyInfo,
    GpuInfo,
    MemoryInfo,
    PlatformInfo,
    SensorReading,
    ThermalInfo,
    ThermalState,
)

log = logging.getLogger(__name__)

SECTIONS = ("cpu", "memory", "gpus", "frequency", "thermal")
# Without thresholds from the sensor itself: typical CPU limits (most throttle at 95-105 C).
FALLBACK_LIMITS_C = {"critical": 95.0, "serious": 85.0, "fair": 75.0}
FAIR_MARGIN_C = 10.0  # within this many degrees of a sensor's "high" mark counts as fair


class ProbeUnavailable(RuntimeError):
    """This probe cannot answer on this machine; the message says why."""


class HardwareProbe(Protocol):
    """One platform's way of reading the machine. Each method may raise: use ``read``."""

    name: str

    def cpu(self) -> CpuInfo: ...

    def memory(self) -> MemoryInfo: ...

    def gpus(self) -> list[GpuInfo]: ...

    def frequency(self) -> FrequencyInfo: ...

    def thermal(self) -> ThermalInfo: ...


def read(probe: HardwareProbe, section: str) -> tuple[Any, str | None]:
    """``(value, None)``, or ``(None, reason)`` when the probe failed in any way. Never raises."""
    try:
        return getattr(probe, section)(), None
    except ProbeUnavailable as exc:
        return None, str(exc)
    except Exception as exc:  # a probe bug must cost its section, never the request
        log.debug("hardware probe %s.%s failed", probe.name, section, exc_info=True)
        return None, f"{probe.name} {section} probe failed: {type(exc).__name__}: {exc}"


def worst(states: list[ThermalState]) -> ThermalState:
    return max(states, key=THERMAL_STATES.index) if states else "nominal"


def platform_info(probe: HardwareProbe) -> PlatformInfo:
    return PlatformInfo(system=platform.system(), release=platform.release(), machine=platform.machine(),
                        python=platform.python_version(), probe=probe.name)


def run_command(args: list[str], timeout: float = 5.0, require_success: bool = False) -> str:
    """A command's stdout; ProbeUnavailable when it is missing, fails or prints nothing."""
    exe = shutil.which(args[0])
    if exe is None:
        raise ProbeUnavailable(f"{args[0]} is not installed")
    try:
        result = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeUnavailable(f"{' '.join(args)} failed: {exc}") from None
    if (require_success and result.returncode != 0) or not result.stdout.strip():
        detail = (result.stderr.strip() or result.stdout.strip())[:200]
        raise ProbeUnavailable(f"{' '.join(args)} exited {result.returncode}: {detail}")
    return result.stdout


# ---- shared by every probe (psutil) ---------------------------------------------------------


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


# ---- Linux ------------------------------------------------------------------------------------


def parse_cpuinfo(text: str) -> str | None:
    """The CPU's name from /proc/cpuinfo (x86 'model name'; ARM 'Hardware' or 'Model')."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and value.strip():
            fields.setdefault(key.strip().lower(), value.strip())
    return fields.get("model name") or fields.get("hardware") or fields.get("model") or fields.get("cpu model")


def reading_state(current: float, high: float | None, critical: float | None) -> ThermalState:
    high = high if high and high > 0 else None
    critical = critical if critical and critical > 0 else None
    if high is None and critical is None:
        limits = FALLBACK_LIMITS_C
        return ("critical" if current >= limits["critical"] else "serious" if current >= limits["serious"]
                else "fair" if current >= limits["fair"] else "nominal")
    if critical is not None and current >= critical:
        return "critical"
    if high is not None and current >= high:
        return "serious"
    if current >= (high if high is not None else critical or 0.0) - FAIR_MARGIN_C:
        return "fair"
    return "nominal"


def thermal_from_sensors(temperatures: dict[str, list[Any]]) -> ThermalInfo:
    """``psutil.sensors_temperatures()`` (entries of label, current, high, critical) as a state."""
    readings = [
        SensorReading(sensor=sensor, label=entry[0] or sensor, current_c=float(entry[1]),
                      high_c=entry[2] or None, critical_c=entry[3] or None)
        for sensor, entries in temperatures.items() for entry in entries if entry[1] is not None
    ]
    if not readings:
        raise ProbeUnavailable("no temperature sensors (psutil.sensors_temperatures() is empty)")
    state = worst([reading_state(r.current_c, r.high_c, r.critical_c) for r in readings])
    return ThermalInfo(state=state, source="psutil", sensors=readings)


def thermal_from_sysfs(root: Path = Path("/sys/class/thermal")) -> ThermalInfo:
    """Thermal zones and their trip points: past a critical/hot trip is critical, past a passive one
    (where the kernel starts throttling) serious, past an active one (fans) fair."""
    readings: list[SensorReading] = []
    states: list[ThermalState] = []
    for zone in sorted(root.glob("thermal_zone*")):
        try:
            current = int((zone / "temp").read_text().strip()) / 1000
            kind = (zone / "type").read_text().strip()
        except (OSError, ValueError):
            continue
        trips: dict[str, float] = {}
        for trip_type in zone.glob("trip_point_*_type"):
            try:
                trip_temp = int(Path(str(trip_type)[: -len("_type")] + "_temp").read_text().strip()) / 1000
                name = trip_type.read_text().strip()
            except (OSError, ValueError):
                continue
            if trip_temp > 0:
                trips[name] = min(trip_temp, trips.get(name, trip_temp))
        reached = [name for name, temp in trips.items() if current >= temp]
        states.append("critical" if {"critical", "hot"} & set(reached) else "serious" if "passive" in reached
                      else "fair" if "active" in reached else "nominal")
        readings.append(SensorReading(sensor=zone.name, label=kind, current_c=current,
                                      high_c=trips.get("passive") or trips.get("hot"), critical_c=trips.get("critical")))
    if not readings:
        raise ProbeUnavailable(f"no thermal zones under {root}")
    return ThermalInfo(state=worst(states), source="sysfs", sensors=readings)


class LinuxProbe(PsutilProbe):
    name = "linux"

    def cpu(self) -> CpuInfo:
        try:
            brand = parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
        except OSError:
            brand = platform.processor() or None
        return psutil_cpu(brand)

    def thermal(self) -> ThermalInfo:
        sensors = getattr(psutil, "sensors_temperatures", None)
        reasons = []
        if sensors is not None:
            try:
                return thermal_from_sensors(sensors())
            except ProbeUnavailable as exc:
                reasons.append(str(exc))
        try:
            return thermal_from_sysfs()
        except ProbeUnavailable as exc:
            reasons.append(str(exc))
        raise ProbeUnavailable("; ".join(reasons) + " (usual in VMs and containers)")


# ---- NVIDIA (any OS with nvidia-smi) ---------------------------------------------------------

NVIDIA_QUERY = "index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,clocks.sm,clocks.max.sm"


def _number(text: str) -> float | None:
    try:
        return float(text.strip())
    except ValueError:  # "[N/A]", "N/A", "[Not Supported]"
        return None


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """``nvidia-smi --query-gpu=NVIDIA_QUERY --format=csv,noheader,nounits`` (memory in MiB)."""
    gpus = []
    for row in csv.reader(io.StringIO(text)):
        if len(row) < 8:
            continue
        index, name, total, used, util, temp, clock, clock_max = (cell.strip() for cell in row[:8])
        mib = 1 << 20
        total_mib, used_mib = _number(total), _number(used)
        gpus.append(GpuInfo(
            vendor="NVIDIA", name=name, index=int(index) if index.isdigit() else None,
            memory_total_bytes=int(total_mib * mib) if total_mib is not None else None,
            memory_used_bytes=int(used_mib * mib) if used_mib is not None else None,
            utilization_percent=_number(util), temperature_c=_number(temp),
            clock_mhz=_number(clock), clock_max_mhz=_number(clock_max),
        ))
    return gpus


def nvidia_gpus() -> list[GpuInfo]:
    out = run_command(["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"],
                      require_success=True)
    gpus = parse_nvidia_smi(out)
    if not gpus:
        raise ProbeUnavailable("nvidia-smi listed no GPUs")
    return gpus


# ---- Apple (macOS) -----------------------------------------------------------------------------

SYSCTL_KEYS = ["machdep.cpu.brand_string", "hw.physicalcpu", "hw.logicalcpu",
               "hw.perflevel0.physicalcpu", "hw.perflevel1.physicalcpu"]
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
    return CpuInfo(brand=values.get("machdep.cpu.brand_string") or None,
                   cores_physical=_int(values, "hw.physicalcpu"), cores_logical=_int(values, "hw.logicalcpu"),
                   performance_cores=_int(values, "hw.perflevel0.physicalcpu"),
                   efficiency_cores=_int(values, "hw.perflevel1.physicalcpu"))


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
                info.cpu_speed_limit_percent = parse_pmset_therm(run_command(["pmset", "-g", "therm"])).cpu_speed_limit_percent
            except ProbeUnavailable:
                pass
            return info
        return parse_pmset_therm(run_command(["pmset", "-g", "therm"]))


# ---- anywhere else ---------------------------------------------------------------------------


class GenericProbe(PsutilProbe):
    name = "generic"

    def cpu(self) -> CpuInfo:
        return psutil_cpu(platform.processor() or None)

    def thermal(self) -> ThermalInfo:
        raise ProbeUnavailable(f"no thermal probe for {sys.platform}")


class InjectedThermal:
    """Another probe, but with a fixed thermal state: IMPETUS_FAULT_THERMAL_STATE, for tests."""

    def __init__(self, inner: HardwareProbe, state: ThermalState) -> None:
        self.inner, self.state, self.name = inner, state, inner.name

    def cpu(self) -> CpuInfo:
        return self.inner.cpu()

    def memory(self) -> MemoryInfo:
        return self.inner.memory()

    def gpus(self) -> list[GpuInfo]:
        return self.inner.gpus()

    def frequency(self) -> FrequencyInfo:
        return self.inner.frequency()

    def thermal(self) -> ThermalInfo:
        return ThermalInfo(state=self.state, source="injected")


def probe_for_this_machine(thermal_override: str = "") -> HardwareProbe:
    probe: HardwareProbe
    if sys.platform == "darwin":
        probe = AppleProbe()
    elif sys.platform.startswith("linux") and os.path.exists("/proc/cpuinfo"):
        probe = LinuxProbe()
    else:
        probe = GenericProbe()
    if thermal_override:
        probe = InjectedThermal(probe, thermal_override)  # type: ignore[arg-type]
    return probe
