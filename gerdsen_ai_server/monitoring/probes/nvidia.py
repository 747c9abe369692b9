"""NVIDIA GPUs on any OS with ``nvidia-smi``: its CSV output parsed by a pure function."""

from __future__ import annotations

import csv
import io

from gerdsen_ai_server.monitoring.probes.base import ProbeUnavailable, run_command
from gerdsen_ai_server.schemas.hardware import GpuInfo

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
        gpus.append(
            GpuInfo(
                vendor="NVIDIA",
                name=name,
                index=int(index) if index.isdigit() else None,
                memory_total_bytes=int(total_mib * mib) if total_mib is not None else None,
                memory_used_bytes=int(used_mib * mib) if used_mib is not None else None,
                utilization_percent=_number(util),
                temperature_c=_number(temp),
                clock_mhz=_number(clock),
                clock_max_mhz=_number(clock_max),
            )
        )
    return gpus


def nvidia_gpus() -> list[GpuInfo]:
    out = run_command(
        ["nvidia-smi", f"--query-gpu={NVIDIA_QUERY}", "--format=csv,noheader,nounits"], require_success=True
    )
    gpus = parse_nvidia_smi(out)
    if not gpus:
        raise ProbeUnavailable("nvidia-smi listed no GPUs")
    return gpus
