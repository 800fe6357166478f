"""The one interface every energy source implements, plus wrap-around handling."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass


class MeterUnavailable(Exception):
    """Raised by a meter's constructor when it cannot work here; the message is the reason."""


@dataclass(frozen=True)
class EnergyReading:
    """A cumulative energy figure, always tagged with where it came from."""

    joules: float
    source: str
    monotonic_s: float
    gaps: int = 0  # times the meter could not measure (e.g. battery charging)


class EnergyMeter(ABC):
    """A monotonic cumulative joule counter.

    ``source`` names the sensor (rapl, nvml, jetson, battery, estimate) so a figure is
    never shown without it; ``measured`` is False for estimates; ``scope`` says what
    the figure covers (``device``, ``gpu``, ``battery`` or ``process``).
    """

    source: str = "unknown"
    measured: bool = True
    scope: str = "device"
    gaps: int = 0

    @abstractmethod
    def read_joules(self) -> float:
        """Cumulative joules since the meter was created; never decreases."""

    def read(self) -> EnergyReading:
        """One tagged reading."""
        return EnergyReading(self.read_joules(), self.source, time.monotonic(), self.gaps)

    def describe(self) -> str:
        """A short human description (which zones/rails/devices are summed)."""
        return self.source

    def close(self) -> None:
        """Release sensors or stop sampling threads."""


class WrappingCounter:
    """Turns a raw hardware counter that wraps at ``max_range`` into a monotonic total.

    RAPL's ``energy_uj`` rolls over at ``max_energy_range_uj`` (every ~60 s at high
    power on some parts), so a single delta can be negative; one wrap between two
    reads is assumed, which holds as long as reads are closer than the wrap period.
    """

    def __init__(self, first_raw: int, max_range: int | None) -> None:
        self._last = first_raw
        self._max = max_range if max_range and max_range > 0 else None
        self.total = 0

    def update(self, raw: int) -> int:
        """Feed a new raw value; returns the accumulated total since the first one."""
        delta = raw - self._last
        if delta < 0:
            delta = delta + self._max if self._max else 0  # unknown range: drop the step
        self.total += delta
        self._last = raw
        return self.total


class PowerIntegrator:
    """Integrates power samples (watts) over time for sensors that only report power.

    A daemon thread samples every ``interval_s`` so energy between requests is not
    lost; ``read_joules`` also takes a sample so a window's end is exact to one read.
    """

    def __init__(self, sample_watts, interval_s: float = 0.1) -> None:  # noqa: ANN001
        self._sample = sample_watts  # () -> float | None (None: cannot measure now)
        self._interval = interval_s
        self._lock = threading.Lock()
        self._joules = 0.0
        self._last_t = time.monotonic()
        self._last_w: float | None = self._sample()
        self.gaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self._interval > 0:
            self._thread = threading.Thread(target=self._run, name="edgevlm-energy", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.step()
            except Exception:  # a flaky sensor read must not kill the sampler
                self.gaps += 1

    def step(self) -> float:
        """Take one sample and add the trapezoid since the previous one."""
        w = self._sample()
        now = time.monotonic()
        with self._lock:
            if w is None:
                self.gaps += 1
            elif self._last_w is not None:
                self._joules += (w + self._last_w) / 2.0 * (now - self._last_t)
            self._last_w, self._last_t = w, now
            return self._joules

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None


class IntegratingMeter(EnergyMeter):
    """A sensor that only reports instantaneous watts; a sampling thread integrates them.

    Samples that cannot be read (``None``, or an OS/parse error) count as gaps.
    """

    _integrator: PowerIntegrator

    def _start_integrating(self, interval_s: float) -> None:
        self._integrator = PowerIntegrator(self._watts, interval_s)
        self._integrator.start()

    @abstractmethod
    def _read_watts(self) -> float | None:
        """Current power draw in watts; may raise OSError or ValueError."""

    def _watts(self) -> float | None:
        try:
            return self._read_watts()
        except (OSError, ValueError):
            return None

    @property  # type: ignore[override]
    def gaps(self) -> int:
        return self._integrator.gaps

    def read_joules(self) -> float:
        return self._integrator.step()

    def close(self) -> None:
        self._integrator.stop()
