"""Hardware probes: the Apple and NVIDIA parsers against command output in the formats those tools
print, the Linux probe for real, failing probes (null plus a reason, never an exception), the
thermal mapping, the thermal governor and the throughput tracker."""

from __future__ import annotations

import sys
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from gerdsen_ai_server.engine.stats import EngineStats
from gerdsen_ai_server.events import EventBus
from gerdsen_ai_server.monitoring.monitor import Monitor, ThermalGovernor, Throughput
from gerdsen_ai_server.monitoring.probes.apple import (
    apple_cpu,
    parse_pmset_therm,
    parse_sysctl,
    parse_system_profiler_displays,
)
from gerdsen_ai_server.monitoring.probes.base import SECTIONS, InjectedThermal, ProbeUnavailable, read
from gerdsen_ai_server.monitoring.probes.linux import (
    LinuxProbe,
    parse_cpuinfo,
    reading_state,
    thermal_from_sensors,
    thermal_from_sysfs,
)
from gerdsen_ai_server.monitoring.probes.nvidia import parse_nvidia_smi
from gerdsen_ai_server.schemas.hardware import CpuInfo, FrequencyInfo, GpuInfo, HardwareReport, MemoryInfo, ThermalInfo

# ---- Apple: `sysctl KEYS`, `pmset -g therm`, `system_profiler SPDisplaysDataType` -------------------

SYSCTL_M2_PRO = """\
machdep.cpu.brand_string: Apple M2 Pro
hw.physicalcpu: 12
hw.logicalcpu: 12
hw.perflevel0.physicalcpu: 8
hw.perflevel1.physicalcpu: 4
"""
# An Intel Mac has no performance levels: sysctl names them on stderr and prints the rest.
SYSCTL_INTEL = """\
machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz
hw.physicalcpu: 8
hw.logicalcpu: 16
"""
PMSET_QUIET = """\
Note: No thermal warning level has been recorded
Note: No performance warning level has been recorded
Note: No CPU power status has been recorded
"""
PMSET_THROTTLED = """\
Note: No thermal warning level has been recorded
Note: No performance warning level has been recorded
2024-07-02 11:00:04 +0200 CPU Power notify
\tCPU_Scheduler_Limit \t= 100
\tCPU_Available_CPUs \t= 8
\tCPU_Speed_Limit \t= 62
"""
PMSET_WARNING = """\
2024-07-02 11:00:04 +0200 Thermal Warning Level = 2
Note: No performance warning level has been recorded
"""
PROFILER_M2_PRO = """\
Graphics/Displays:

    Apple M2 Pro:

      Chipset Model: Apple M2 Pro
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 19
      Vendor: Apple (0x106b)
      Metal Support: Metal 3
      Displays:
        Color LCD:
          Display Type: Built-in Liquid Retina XDR Display
          Resolution: 3456 x 2234 Retina
"""
PROFILER_INTEL_AMD = """\
Graphics/Displays:

    Intel UHD Graphics 630:

      Chipset Model: Intel UHD Graphics 630
      Type: GPU
      Bus: Built-In
      VRAM (Dynamic, Max): 1536 MB
      Vendor: Intel

    AMD Radeon Pro 5500M:

      Chipset Model: AMD Radeon Pro 5500M
      Type: GPU
      Bus: PCIe
      PCIe Lane Width: x16
      VRAM (Total): 8 GB
      Vendor: AMD (0x1002)
"""
# nvidia-smi --query-gpu=index,name,memory.total,memory.used,utilization.gpu,temperature.gpu,
#   clocks.sm,clocks.max.sm --format=csv,noheader,nounits
NVIDIA_SMI = """\
0, NVIDIA H100 80GB HBM3, 81559, 1, 0, 31, 345, 1980
1, NVIDIA GeForce RTX 4090, 24564, 1203, 37, 45, [N/A], 3120
"""


def test_sysctl_apple_silicon() -> None:
    cpu = apple_cpu(parse_sysctl(SYSCTL_M2_PRO))
    assert cpu == CpuInfo(
        brand="Apple M2 Pro", cores_physical=12, cores_logical=12, performance_cores=8, efficiency_cores=4
    )


def test_sysctl_intel_mac_has_no_core_kinds() -> None:
    cpu = apple_cpu(parse_sysctl(SYSCTL_INTEL))
    assert (cpu.brand, cpu.cores_physical, cpu.cores_logical) == ("Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", 8, 16)
    assert cpu.performance_cores is None and cpu.efficiency_cores is None


@pytest.mark.parametrize(
    ("text", "state", "limit"),
    [
        (PMSET_QUIET, "nominal", None),
        (PMSET_THROTTLED, "serious", 62),
        (PMSET_THROTTLED.replace("= 62", "= 90"), "fair", 90),
        (PMSET_THROTTLED.replace("= 62", "= 30"), "critical", 30),
        (PMSET_THROTTLED.replace("= 62", "= 100"), "nominal", 100),
        (PMSET_WARNING, "serious", None),
        (PMSET_WARNING.replace("= 2", "= 0"), "nominal", None),
    ],
)
def test_pmset_therm(text: str, state: str, limit: int | None) -> None:
    info = parse_pmset_therm(text)
    assert (info.state, info.cpu_speed_limit_percent, info.source) == (state, limit, "pmset")


def test_pmset_unrecognised_output_is_unavailable() -> None:
    with pytest.raises(ProbeUnavailable, match="unrecognised"):
        parse_pmset_therm("pmset: command changed its mind\n")


def test_system_profiler_apple_gpu_cores() -> None:
    assert parse_system_profiler_displays(PROFILER_M2_PRO) == [GpuInfo(vendor="Apple", name="Apple M2 Pro", cores=19)]


def test_system_profiler_two_gpus_with_vram() -> None:
    intel, amd = parse_system_profiler_displays(PROFILER_INTEL_AMD)
    assert (intel.vendor, intel.name, intel.memory_total_bytes) == ("Intel", "Intel UHD Graphics 630", 1536 << 20)
    assert (amd.vendor, amd.name, amd.memory_total_bytes, amd.cores) == ("AMD", "AMD Radeon Pro 5500M", 8 << 30, None)


def test_nvidia_smi_csv() -> None:
    h100, rtx = parse_nvidia_smi(NVIDIA_SMI)
    assert h100 == GpuInfo(
        vendor="NVIDIA",
        name="NVIDIA H100 80GB HBM3",
        index=0,
        memory_total_bytes=81559 << 20,
        memory_used_bytes=1 << 20,
        utilization_percent=0,
        temperature_c=31,
        clock_mhz=345,
        clock_max_mhz=1980,
    )
    assert (rtx.index, rtx.clock_mhz, rtx.clock_max_mhz) == (1, None, 3120)  # [N/A] is null


# ---- Linux -------------------------------------------------------------------------------------


def test_cpuinfo_model_name() -> None:
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    arm = "processor\t: 0\nBogoMIPS\t: 48.00\nCPU part\t: 0xd0c\n\nHardware\t: BCM2835\nModel\t: Raspberry Pi 4\n"
    assert parse_cpuinfo(x86) == "Intel(R) Xeon(R) Processor"
    assert parse_cpuinfo(arm) == "BCM2835"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux probe reads /proc")
def test_linux_probe_for_real() -> None:
    probe = LinuxProbe()
    cpu, reason = read(probe, "cpu")
    assert reason is None and cpu.cores_logical == psutil.cpu_count() and cpu.brand
    memory, _ = read(probe, "memory")
    assert memory.total_bytes == psutil.virtual_memory().total and not memory.unified
    for section in SECTIONS:  # whatever this machine lacks, reading never raises
        value, reason = read(probe, section)
        assert (value is None) == (reason is not None), section
        if value is None:
            assert reason, section


Temp = namedtuple("Temp", "label current high critical")  # psutil's shwtemp


def test_sensor_thresholds_map_to_states() -> None:
    assert reading_state(50, 80, 100) == "nominal"
    assert reading_state(72, 80, 100) == "fair"  # within 10 C of "high"
    assert reading_state(85, 80, 100) == "serious"
    assert reading_state(101, 80, 100) == "critical"
    assert reading_state(90, None, None) == "serious"  # no thresholds: typical CPU limits
    info = thermal_from_sensors(
        {
            "coretemp": [Temp("Package id 0", 55.0, 80.0, 100.0), Temp("Core 0", 86.0, 80.0, 100.0)],
            "acpitz": [Temp("", 30.0, None, None)],
        }
    )
    assert info.state == "serious" and info.source == "psutil" and len(info.sensors) == 3
    assert info.sensors[2].label == "acpitz"
    with pytest.raises(ProbeUnavailable):
        thermal_from_sensors({})


def test_sysfs_trip_points(tmp_path: Path) -> None:
    def zone(n: int, temp: int, trips: dict[str, int]) -> None:
        folder = tmp_path / f"thermal_zone{n}"
        folder.mkdir()
        (folder / "temp").write_text(f"{temp}\n")
        (folder / "type").write_text("x86_pkg_temp\n")
        for i, (kind, trip) in enumerate(trips.items()):
            (folder / f"trip_point_{i}_type").write_text(kind + "\n")
            (folder / f"trip_point_{i}_temp").write_text(f"{trip}\n")

    zone(0, 45000, {"passive": 90000, "critical": 105000})
    assert thermal_from_sysfs(tmp_path).state == "nominal"
    zone(1, 92000, {"passive": 90000, "critical": 105000})
    info = thermal_from_sysfs(tmp_path)
    assert info.state == "serious" and info.sensors[1].current_c == 92.0 and info.sensors[1].critical_c == 105.0
    with pytest.raises(ProbeUnavailable, match="no thermal zones"):
        thermal_from_sysfs(tmp_path / "missing")


# ---- failing probes ------------------------------------------------------------------------------


class BrokenProbe:
    """Every way a probe can fail: a tool missing, a parser bug, an OS error."""

    name = "broken"

    def cpu(self) -> CpuInfo:
        raise ProbeUnavailable("sysctl is not installed")

    def memory(self) -> MemoryInfo:
        raise KeyError("hw.memsize")

    def gpus(self) -> list[GpuInfo]:
        raise OSError("permission denied")

    def frequency(self) -> FrequencyInfo:
        raise ZeroDivisionError("division by zero")

    def thermal(self) -> ThermalInfo:
        raise ProbeUnavailable("no temperature sensors")


def test_a_failing_probe_reads_as_null_with_a_reason() -> None:
    probe = BrokenProbe()
    assert read(probe, "cpu") == (None, "sysctl is not installed")
    value, reason = read(probe, "memory")
    assert value is None and "KeyError" in reason and "hw.memsize" in reason
    assert read(probe, "gpus")[0] is None and "permission denied" in read(probe, "gpus")[1]


def stub_engine(**stats: Any) -> SimpleNamespace:
    limits: list[int | None] = []
    engine = SimpleNamespace(
        max_batch=8,
        batch_limit=None,
        compute_dtype="float32",
        limits=limits,
        stats=lambda: EngineStats(**stats),
        models=lambda: [],
        is_alive=lambda: True,
    )
    engine.set_batch_limit = lambda n: (limits.append(n), setattr(engine, "batch_limit", n))
    return engine


def test_report_from_a_broken_probe_is_all_nulls_and_reasons() -> None:
    monitor = Monitor(stub_engine(), BrokenProbe(), EventBus())  # type: ignore[arg-type]
    report = monitor.hardware_report()
    HardwareReport.model_validate(report.model_dump())
    assert report.cpu is report.memory is report.gpus is report.frequency is report.thermal is report.mlx is None
    assert set(report.unavailable) == {"cpu", "memory", "gpus", "frequency", "thermal", "mlx"}
    assert report.platform.probe == "broken" and report.throttling.throttled is None


def test_injected_thermal_state_drives_the_governor() -> None:
    engine = stub_engine()
    events: list[tuple[str, dict[str, Any]]] = []
    bus = EventBus()
    bus.subscribe(lambda kind, payload: events.append((kind, payload)))
    monitor = Monitor(
        engine,
        InjectedThermal(BrokenProbe(), "critical"),
        bus,  # type: ignore[arg-type]
        thermal_batch_size=2,
    )
    monitor.tick()
    assert engine.limits == [2] and monitor.thermal is not None and monitor.thermal.source == "injected"
    kind, payload = events[-1]
    assert kind == "metrics" and payload["thermal_state"] == "critical" and payload["engine"]["batch_limit"] == 2
    assert payload["timestamp"] > 0
    report = monitor.hardware_report()
    assert report.throttling.throttled and report.batch.batch_limit == 2


def test_governor_caps_when_hot_and_lifts_when_cool() -> None:
    limits: list[int | None] = []
    governor = ThermalGovernor(limits.append, reduced=2, max_batch=8)
    for state in ("nominal", "fair", "serious", "critical", None, "serious", "fair", "nominal"):
        governor.update(state)  # type: ignore[arg-type]
    assert limits == [2, None]  # set once when hot, unchanged while unknown, lifted once when cool
    off = ThermalGovernor(limits.append, reduced=0, max_batch=8)
    off.update("critical")
    assert limits == [2, None] and off.limit is None


def test_throughput_drop() -> None:
    tracker = Throughput(window=10.0)
    total = 0
    for second in range(20):  # 100 tok/s for 20 s, then 50 tok/s
        total += 100
        tracker.add(float(second), total, busy=True)
    assert tracker.recent() == pytest.approx(100.0) and tracker.drop() == pytest.approx(0.0)
    for second in range(20, 40):
        total += 50
        tracker.add(float(second), total, busy=True)
    assert tracker.peak == pytest.approx(100.0)
    assert tracker.drop() == pytest.approx(0.5)
