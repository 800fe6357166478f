"""NVIDIA Jetson on-board INA3221 power monitors (hwmon or the older iio driver)."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from .base import IntegratingMeter, MeterUnavailable

# Rails that measure the whole module's input; when present the others are sub-rails.
_TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VDD_5V_IN", "VIN_SYS_5V0")


@dataclass
class Rail:
    """One rail: either a power file (mW) or a voltage (mV) + current (mA) pair."""

    label: str
    power_mw: Path | None = None
    volt_mv: Path | None = None
    curr_ma: Path | None = None

    def watts(self) -> float:
        if self.power_mw is not None:
            return int(self.power_mw.read_text().strip()) / 1000.0
        assert self.volt_mv is not None and self.curr_ma is not None
        mv = int(self.volt_mv.read_text().strip())
        ma = int(self.curr_ma.read_text().strip())
        return mv * ma / 1e6


def _label(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def find_rails(sysfs_root: str = "/") -> list[Rail]:
    """All INA3221 rails under hwmon (L4T >= 34) or iio (older L4T)."""
    root = Path(sysfs_root)
    rails: list[Rail] = []
    for hw in sorted(glob.glob(str(root / "sys/class/hwmon/hwmon*"))):
        d = Path(hw)
        if (_label(d / "name") or "") != "ina3221":
            continue
        for volt in sorted(d.glob("in[0-9]*_input")):
            n = volt.name[2:-6]
            curr = d / f"curr{n}_input"
            if curr.exists():
                rails.append(Rail(_label(d / f"in{n}_label") or f"{d.name}/in{n}", volt_mv=volt, curr_ma=curr))
    iio_dirs = glob.glob(str(root / "sys/bus/iio/devices/iio:device*")) + glob.glob(
        str(root / "sys/bus/i2c/drivers/ina3221x/*/iio:device*")
    )
    seen: set[str] = set()
    for io in sorted(iio_dirs):
        d = Path(io)
        real = os.path.realpath(d)
        if real in seen:
            continue
        seen.add(real)
        for pw in sorted(d.glob("in_power*_input")):
            n = pw.name[len("in_power") : -len("_input")]
            rails.append(Rail(_label(d / f"rail_name_{n}") or f"{d.name}/power{n}", power_mw=pw))
    return rails


def pick_rails(rails: list[Rail]) -> list[Rail]:
    """The module-input rail when there is one, else every real rail (never 'sum of shunt')."""
    real = [r for r in rails if not r.label.lower().startswith("sum")]
    total = [r for r in real if r.label.upper() in _TOTAL_RAILS]
    return total or real


class JetsonMeter(IntegratingMeter):
    """Integrates INA3221 power over time with a sampling thread."""

    source = "jetson"
    scope = "device"

    def __init__(self, sysfs_root: str = "/", interval_s: float = 0.1) -> None:
        rails = pick_rails(find_rails(sysfs_root))
        if not rails:
            raise MeterUnavailable("no INA3221 power rails under hwmon or iio")
        try:
            for r in rails:
                r.watts()
        except PermissionError as exc:
            raise MeterUnavailable(f"permission denied reading Jetson power rails: {exc}") from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read Jetson power rails: {exc}") from exc
        self._rails = rails
        self._start_integrating(interval_s)

    def _read_watts(self) -> float | None:
        return sum(r.watts() for r in self._rails)

    def describe(self) -> str:
        return "jetson: " + "+".join(r.label for r in self._rails)
