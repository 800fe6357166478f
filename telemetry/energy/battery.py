"""Laptop battery discharge power (``/sys/class/power_supply/BAT*``), integrated over time."""

from __future__ import annotations

from pathlib import Path

from .base import IntegratingMeter, MeterUnavailable


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class _Battery:
    def __init__(self, path: Path) -> None:
        self.path = path

    def watts(self) -> float | None:
        """Discharge power, or None when not discharging (on AC the battery can't see the draw)."""
        if _read(self.path / "status") != "Discharging":
            return None
        power = _read(self.path / "power_now")
        if power is not None:
            return abs(int(power)) / 1e6
        current, voltage = _read(self.path / "current_now"), _read(self.path / "voltage_now")
        if current is None or voltage is None:
            raise OSError(f"{self.path} has neither power_now nor current_now+voltage_now")
        return abs(int(current)) * int(voltage) / 1e12


class BatteryMeter(IntegratingMeter):
    """Integrates battery discharge power; samples taken while charging count as gaps."""

    source = "battery"
    scope = "battery"

    def __init__(self, sysfs_root: str = "/", interval_s: float = 0.25, require_discharging: bool = True) -> None:
        base = Path(sysfs_root) / "sys/class/power_supply"
        bats = sorted(p for p in base.glob("BAT*") if p.is_dir()) if base.is_dir() else []
        if not bats:
            raise MeterUnavailable(f"no battery under {base}")
        self._bats = [_Battery(p) for p in bats]
        try:
            first = self._read_watts()
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read battery power: {exc}") from exc
        if first is None and require_discharging:
            raise MeterUnavailable("battery is not discharging (on AC power it cannot measure the system draw)")
        self._start_integrating(interval_s)

    def _read_watts(self) -> float | None:
        readings = [b.watts() for b in self._bats]
        if any(w is None for w in readings):
            return None
        return sum(w for w in readings if w is not None)

    def describe(self) -> str:
        return "battery: " + ", ".join(b.path.name for b in self._bats)
