"""A CPU-time estimate for machines without a power sensor; always labelled ``estimate``."""

from __future__ import annotations

import os
import time

from .base import EnergyMeter

DEFAULT_CPU_TDP_WATTS = 35.0  # a mid-range laptop / small-box CPU; override per device


class EstimateMeter(EnergyMeter):
    """This process's CPU seconds x watts per busy core. Not a measurement.

    It ignores GPU, memory and idle power, and assumes every busy core draws the same
    power; useful for comparing configurations on one machine, nothing more.
    """

    source = "estimate"
    measured = False
    scope = "process"

    def __init__(self, watts_per_core: float | None = None, tdp_watts: float = DEFAULT_CPU_TDP_WATTS) -> None:
        cores = os.cpu_count() or 1
        self.watts_per_core = watts_per_core if watts_per_core is not None else tdp_watts / cores
        self._start = self._cpu_seconds()

    @staticmethod
    def _cpu_seconds() -> float:
        # user+system CPU of this process via clock_gettime: one syscall, where
        # psutil.Process().cpu_times() parses /proc/self/stat on every call.
        return time.process_time()

    def read_joules(self) -> float:
        return max(0.0, self._cpu_seconds() - self._start) * self.watts_per_core

    def describe(self) -> str:
        return f"estimate: process CPU time x {self.watts_per_core:.2f} W/core"
