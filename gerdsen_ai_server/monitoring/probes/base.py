"""The probe interface and what every platform's probe shares: ``read`` never raises, ``run_command``.

A probe method returns its section or raises; ``read(probe, section)`` turns any failure into
``(None, reason)``, so a machine without sensors, ``sysctl`` or ``nvidia-smi`` gets nulls with
reasons, never a 500. Thermal states use Apple's names (nominal < fair < serious < critical).
"""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess  # nosec B404  # runs fixed hardware probes (nvidia-smi, sysctl...), never user input
from typing import Any, Protocol

from gerdsen_ai_server.schemas.hardware import (
    THERMAL_STATES,
    CpuInfo,
    FrequencyInfo,
    GpuInfo,
    MemoryInfo,
    PlatformInfo,
    ThermalInfo,
    ThermalState,
)

log = logging.getLogger(__name__)

SECTIONS = ("cpu", "memory", "gpus", "frequency", "thermal")


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
    return PlatformInfo(
        system=platform.system(),
        release=platform.release(),
        machine=platform.machine(),
        python=platform.python_version(),
        probe=probe.name,
    )


def run_command(args: list[str], timeout: float = 5.0, require_success: bool = False) -> str:
    """A command's stdout; ProbeUnavailable when it is missing, fails or prints nothing."""
    exe = shutil.which(args[0])
    if exe is None:
        raise ProbeUnavailable(f"{args[0]} is not installed")
    try:
        # an argv list without a shell; the probes pass constant commands, resolved by shutil.which
        result = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=timeout, check=False)  # nosec B603
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ProbeUnavailable(f"{' '.join(args)} failed: {exc}") from None
    if (require_success and result.returncode != 0) or not result.stdout.strip():
        detail = (result.stderr.strip() or result.stdout.strip())[:200]
        raise ProbeUnavailable(f"{' '.join(args)} exited {result.returncode}: {detail}")
    return result.stdout


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
