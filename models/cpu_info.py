"""What CPU this process runs on and how much of it the process may really use.

Two facts matter to llama.cpp on an edge box and are easy to get wrong:
- which SIMD/matrix features the CPU *advertises* (AMX, AVX-512, NEON dot products...):
  llama.cpp's fast paths key off them, and an advertised feature is not a working one;
- how many CPUs the process may use. ``os.cpu_count()`` counts the machine, but a
  container's cgroup quota or a taskset affinity can leave far fewer, and llama.cpp's
  spinning threads then fight for cores (decode falls from tens of tok/s to below one).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from telemetry.device import cpu_model  # noqa: F401  (one place for the CPU's name)

# Flags that decide which llama.cpp kernels run (x86 and ARM spellings).
_FEATURE_PATTERN = re.compile(
    r"^(sse\d?(_\d)?|ssse3|avx.*|fma|f16c|bmi\d|amx.*|.*vnni.*|neon|asimd.*|sve.*|sme.*|i8mm|"
    r"dotprod|bf16|fphp|fp16|svei8mm|svebf16)$")


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags() -> list[str]:
    """Every feature flag the kernel reports for the first CPU, sorted."""
    m = re.search(r"^(flags|Features)\s*:\s*(.*)$", _cpuinfo(), re.MULTILINE)
    return sorted(set(m.group(2).split())) if m else []


def simd_features(flags: list[str] | None = None) -> list[str]:
    """The flags that pick llama.cpp's kernels (AVX*, AMX*, FMA, NEON, SVE, ...)."""
    return [f for f in (cpu_flags() if flags is None else flags) if _FEATURE_PATTERN.match(f)]


@dataclass(frozen=True)
class CpuBudget:
    """CPUs this process may use, and what limits them."""

    machine: int  # logical CPUs on the machine
    affinity: int  # CPUs in the process's affinity mask
    quota: float | None  # cgroup CPU quota in CPUs (None = unlimited)

    @property
    def usable(self) -> int:
        n = self.affinity
        if self.quota is not None:
            n = min(n, max(1, math.floor(self.quota)))
        return max(1, n)

    def describe(self) -> str:
        parts = [f"{self.usable} usable", f"{self.machine} on the machine"]
        if self.affinity != self.machine:
            parts.append(f"affinity allows {self.affinity}")
        if self.quota is not None:
            parts.append(f"cgroup quota {self.quota:g} CPUs")
        return ", ".join(parts)


def _cgroup_quota(root: Path) -> float | None:
    v2 = root / "cpu.max"
    try:
        quota, period = v2.read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def cpu_budget(cgroup_root: str | Path = "/sys/fs/cgroup") -> CpuBudget:
    """How many CPUs this process may really run on (affinity and cgroup quota)."""
    machine = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = machine
    return CpuBudget(machine=machine, affinity=affinity, quota=_cgroup_quota(Path(cgroup_root)))


def threads_warning(n_threads: int, budget: CpuBudget | None = None) -> str | None:
    """A warning when llama.cpp would run more threads than the process has CPUs for.

    llama.cpp's threads spin at every barrier; with fewer CPUs than threads they wait
    on each other's time slices and a decode step can take a hundred times longer.
    """
    budget = budget or cpu_budget()
    if n_threads > budget.usable:
        return (f"{n_threads} threads configured but only {budget.usable} CPUs are usable by this "
                f"process ({budget.describe()}): decode will crawl; set --threads {budget.usable} or lower")
    return None
