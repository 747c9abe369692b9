"""The Linux probe: the CPU's name from /proc/cpuinfo, the thermal state from psutil's sensors or
sysfs thermal zones, their temperatures and trip points mapped onto Apple's state names."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import psutil

from gerdsen_ai_server.monitoring.probes.base import ProbeUnavailable, worst
from gerdsen_ai_server.monitoring.probes.generic import PsutilProbe, psutil_cpu
from gerdsen_ai_server.schemas.hardware import CpuInfo, SensorReading, ThermalInfo, ThermalState

# Without thresholds from the sensor itself: typical CPU limits (most throttle at 95-105 C).
FALLBACK_LIMITS_C = {"critical": 95.0, "serious": 85.0, "fair": 75.0}
FAIR_MARGIN_C = 10.0  # within this many degrees of a sensor's "high" mark counts as fair


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
        return (
            "critical"
            if current >= limits["critical"]
            else "serious"
            if current >= limits["serious"]
            else "fair"
            if current >= limits["fair"]
            else "nominal"
        )
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
        SensorReading(
            sensor=sensor,
            label=entry[0] or sensor,
            current_c=float(entry[1]),
            high_c=entry[2] or None,
            critical_c=entry[3] or None,
        )
        for sensor, entries in temperatures.items()
        for entry in entries
        if entry[1] is not None
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
        states.append(
            "critical"
            if {"critical", "hot"} & set(reached)
            else "serious"
            if "passive" in reached
            else "fair"
            if "active" in reached
            else "nominal"
        )
        readings.append(
            SensorReading(
                sensor=zone.name,
                label=kind,
                current_c=current,
                high_c=trips.get("passive") or trips.get("hot"),
                critical_c=trips.get("critical"),
            )
        )
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
