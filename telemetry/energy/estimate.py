"""A CPU-time estimate for machines without a power sensor; always labelled ``estimate``."""

from __future__ import annotations

import os
import time

import psutil

from .base import EnergyMeter

DEFAULT_CPU_TDP_WATTS = 35.0  # a mid-range laptop / small-box CPU; override per device


class EstimateMeter(EnergyMeter):
    """CPU seconds of this process and its children x watts per busy core. Not a measurement.

    The children are the model runners, where the inference computes: without them the
    estimate would hold only the HTTP work. It ignores GPU, memory and idle power, and
    assumes every busy core draws the same power; useful for comparing configurations
    on one machine, nothing more.
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
        # user+system CPU of this process via clock_gettime (one syscall), of the children
        # already reaped (os.times), and of the live ones (one /proc read each).
        total = time.process_time()
        t = os.times()
        total += t.children_user + t.children_system
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return total
        for child in children:
            try:
                c = child.cpu_times()
            except psutil.Error:  # ended meanwhile: counted once reaped
                continue
            total += c.user + c.system
        return total

    def read_joules(self) -> float:
        return max(0.0, self._cpu_seconds() - self._start) * self.watts_per_core

    def describe(self) -> str:
        return f"estimate: CPU time of the server and its runners x {self.watts_per_core:.2f} W/core"
