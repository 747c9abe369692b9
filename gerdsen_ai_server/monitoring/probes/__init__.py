"""Hardware probes behind one interface, one module per platform: what this machine is, how hot it runs.

``probe_for_this_machine()`` picks ``LinuxProbe`` (linux.py) or ``AppleProbe`` (apple.py)
(``GenericProbe``, psutil only, anywhere else; generic.py); NVIDIA GPUs come from ``nvidia-smi``
wherever it is (nvidia.py). A probe method returns its section or raises; ``read(probe, section)``
(base.py) turns any failure into ``(None, reason)``, so a machine without sensors, ``sysctl`` or
``nvidia-smi`` gets nulls with reasons, never a 500. The Apple and NVIDIA paths parse command output
with pure functions (``parse_sysctl``, ``parse_pmset_therm``, ``parse_system_profiler_displays``,
``parse_nvidia_smi``) so they are tested against recorded outputs on any machine.

Thermal states use Apple's names (nominal < fair < serious < critical); Linux temperatures and
trip points are mapped onto them. No Flask, no MLX here (monitor.py reads MLX's counters).
"""

from __future__ import annotations

import os
import sys

from gerdsen_ai_server.monitoring.probes.apple import AppleProbe
from gerdsen_ai_server.monitoring.probes.base import HardwareProbe, InjectedThermal
from gerdsen_ai_server.monitoring.probes.generic import GenericProbe
from gerdsen_ai_server.monitoring.probes.linux import LinuxProbe


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
