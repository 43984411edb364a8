"""What a benchmark's JSON records about the machine it ran on (shared by the benchmark scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def machine() -> dict:
    """Architecture, platform, CPU model, core count, Python and the load average at the start."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    return {"machine": platform.machine(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
