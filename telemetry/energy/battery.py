"""Laptop battery discharge power (``/sys/class/power_supply/BAT*``), integrated over time."""

from __future__ import annotations

from pathlib import Path

from .base import EnergyMeter, MeterUnavailable, PowerIntegrator


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


class BatteryMeter(EnergyMeter):
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
            first = self._watts_or_raise()
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read battery power: {exc}") from exc
        if first is None and require_discharging:
            raise MeterUnavailable("battery is not discharging (on AC power it cannot measure the system draw)")
        self._integrator = PowerIntegrator(self._watts, interval_s)
        self._integrator.start()

    def _watts_or_raise(self) -> float | None:
        readings = [b.watts() for b in self._bats]
        if any(w is None for w in readings):
            return None
        return sum(w for w in readings if w is not None)

    def _watts(self) -> float | None:
        try:
            return self._watts_or_raise()
        except (OSError, ValueError):
            return None

    @property  # type: ignore[override]
    def gaps(self) -> int:
        return self._integrator.gaps

    def read_joules(self) -> float:
        return self._integrator.step()

    def describe(self) -> str:
        return "battery: " + ", ".join(b.path.name for b in self._bats)

    def close(self) -> None:
        self._integrator.stop()
