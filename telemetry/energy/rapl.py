"""Intel/AMD RAPL through the Linux powercap interface (package + DRAM zones)."""

from __future__ import annotations

import re
from pathlib import Path

from .base import EnergyMeter, MeterUnavailable, WrappingCounter

_TOP_ZONE = re.compile(r"^[a-z]+-rapl:\d+$")  # intel-rapl:0 (AMD zones use the same driver name)
_SUB_ZONE = re.compile(r"^[a-z]+-rapl:\d+:\d+$")


class _Zone:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = _read_text(path / "name") or path.name
        self.energy_file = path / "energy_uj"
        try:
            first = int(self.energy_file.read_text().strip())
        except PermissionError as exc:
            raise MeterUnavailable(
                f"permission denied reading {self.energy_file} (root-only since CVE-2020-8694; "
                "grant read access, e.g. a udev rule or chmod o+r, to measure RAPL)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise MeterUnavailable(f"cannot read {self.energy_file}: {exc}") from exc
        max_range = _read_text(path / "max_energy_range_uj")
        self.counter = WrappingCounter(first, int(max_range) if max_range and max_range.isdigit() else None)

    def read_uj(self) -> int:
        return self.counter.update(int(self.energy_file.read_text().strip()))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


class RaplMeter(EnergyMeter):
    """Sum of every package zone plus its DRAM subzone (core/uncore are inside package)."""

    source = "rapl"
    scope = "device"

    def __init__(self, sysfs_root: str = "/") -> None:
        base = Path(sysfs_root) / "sys/class/powercap"
        if not base.is_dir():
            raise MeterUnavailable(f"{base} does not exist (no powercap driver)")
        tops = sorted(p for p in base.iterdir() if _TOP_ZONE.match(p.name))
        if not tops:
            raise MeterUnavailable(f"no RAPL zones under {base}")
        zones: list[_Zone] = []
        for top in tops:
            zones.append(_Zone(top))
            for sub in sorted(top.iterdir()):
                if _SUB_ZONE.match(sub.name) and (_read_text(sub / "name") or "").startswith("dram"):
                    zones.append(_Zone(sub))
        self._zones = zones

    def read_joules(self) -> float:
        return sum(z.read_uj() for z in self._zones) / 1e6

    def describe(self) -> str:
        return "rapl: " + ", ".join(f"{z.path.name}({z.name})" for z in self._zones)
