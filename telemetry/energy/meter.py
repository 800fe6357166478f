"""Pick the first energy meter that works here, logging why each earlier one was skipped."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .base import EnergyMeter, MeterUnavailable
from .battery import BatteryMeter
from .estimate import DEFAULT_CPU_TDP_WATTS, EstimateMeter
from .jetson import JetsonMeter
from .nvml import NvmlMeter
from .rapl import RaplMeter

log = logging.getLogger("edgevlm.telemetry.energy")

DEFAULT_ORDER: tuple[str, ...] = ("rapl", "nvml", "jetson", "battery", "estimate")


@dataclass
class Detection:
    """The meter that won (or None) and, per skipped source, the reason."""

    meter: EnergyMeter | None
    skipped: dict[str, str] = field(default_factory=dict)


def _factories(
    sysfs_root: str, cpu_watts_per_core: float | None, cpu_tdp_watts: float
) -> dict[str, Callable[[], EnergyMeter]]:
    return {
        "rapl": lambda: RaplMeter(sysfs_root),
        "nvml": lambda: NvmlMeter(),
        "jetson": lambda: JetsonMeter(sysfs_root),
        "battery": lambda: BatteryMeter(sysfs_root),
        "estimate": lambda: EstimateMeter(cpu_watts_per_core, cpu_tdp_watts),
    }


def detect_meter(
    sysfs_root: str = "/",
    order: Sequence[str] = DEFAULT_ORDER,
    cpu_watts_per_core: float | None = None,
    cpu_tdp_watts: float = DEFAULT_CPU_TDP_WATTS,
) -> Detection:
    """Try each source in ``order``; the first whose constructor succeeds wins.

    Permission denied on RAPL's ``energy_uj`` is the common case on desktops, so a
    failure is never fatal: it is logged with its reason and the next source is tried.
    """
    factories = _factories(sysfs_root, cpu_watts_per_core, cpu_tdp_watts)
    skipped: dict[str, str] = {}
    for name in order:
        factory = factories.get(name)
        if factory is None:
            skipped[name] = "unknown energy source"
            log.warning("energy meter %s skipped: unknown source", name)
            continue
        try:
            meter = factory()
        except MeterUnavailable as exc:
            skipped[name] = str(exc)
            log.info("energy meter %s skipped: %s", name, exc)
            continue
        except Exception as exc:  # a broken sensor must never stop the server starting
            skipped[name] = f"{type(exc).__name__}: {exc}"
            log.warning("energy meter %s skipped after error: %s", name, exc)
            continue
        log.info("energy meter: %s%s", meter.describe(), "" if meter.measured else " (ESTIMATE, not measured)")
        return Detection(meter, skipped)
    log.info("no energy meter available; energy will not be recorded")
    return Detection(None, skipped)
