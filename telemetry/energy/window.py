"""Per-request energy windows: start/end readings, overlap and idle-baseline subtraction."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from .base import EnergyMeter, EnergyReading

log = logging.getLogger("edgevlm.telemetry.energy")


@dataclass
class EnergyWindow:
    """An open request window; ``max_in_flight`` grows as other requests overlap it."""

    id: int
    start: EnergyReading | None
    max_in_flight: int = 1


class EnergyTracker:
    """Opens and closes windows on one meter and keeps the idle baseline.

    A device-level meter sees everything the machine does, so a window that overlapped
    other requests reports ``overlap_requests`` > 0: its joules are shared, not its own.
    """

    def __init__(self, meter: EnergyMeter | None) -> None:
        self.meter = meter
        self.idle_watts: float | None = None
        self._lock = threading.Lock()
        self._open: dict[int, EnergyWindow] = {}
        self._ids = itertools.count(1)

    def _read(self) -> EnergyReading | None:
        if self.meter is None:
            return None
        try:
            return self.meter.read()
        except Exception as exc:  # a sensor hiccup costs this window its figure, nothing more
            log.warning("energy read failed (%s): %s", self.meter.source, exc)
            return None

    def open(self) -> EnergyWindow:
        """Start a window and count it as in flight for every window already open."""
        reading = self._read()
        with self._lock:
            w = EnergyWindow(next(self._ids), reading)
            self._open[w.id] = w
            n = len(self._open)
            for other in self._open.values():
                if n > other.max_in_flight:
                    other.max_in_flight = n
        return w

    def close(self, window: EnergyWindow, output_tokens: int) -> dict[str, Any]:
        """End a window; returns the ``edgevlm.energy.*`` figures (empty without a meter)."""
        with self._lock:
            self._open.pop(window.id, None)
        end = self._read()
        start = window.start
        if start is None or end is None or self.meter is None:
            return {}
        joules = max(0.0, end.joules - start.joules)
        seconds = max(0.0, end.monotonic_s - start.monotonic_s)
        out: dict[str, Any] = {
            "joules": joules,
            "source": self.meter.source,
            "measured": self.meter.measured,
            "scope": self.meter.scope,
            "window_s": seconds,
            "overlap_requests": window.max_in_flight - 1,
        }
        if seconds > 0:
            out["watts_mean"] = joules / seconds
        if self.idle_watts is not None:
            out["idle_watts"] = self.idle_watts
            out["joules_idle_subtracted"] = max(0.0, joules - self.idle_watts * seconds)
        if output_tokens > 0:
            out["joules_per_output_token"] = joules / output_tokens
        if end.gaps != start.gaps:
            out["incomplete"] = True  # e.g. the battery started charging mid-window
        return out

    def sample_idle(self, seconds: float = 1.0) -> float | None:
        """Average watts over ``seconds`` of (assumed) idleness; stored as the baseline."""
        a = self._read()
        if a is None:
            return None
        time.sleep(seconds)
        b = self._read()
        if b is None or b.monotonic_s <= a.monotonic_s:
            return None
        self.idle_watts = max(0.0, (b.joules - a.joules) / (b.monotonic_s - a.monotonic_s))
        return self.idle_watts
