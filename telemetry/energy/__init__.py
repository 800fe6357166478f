"""Energy meters (RAPL, NVML, Jetson INA3221, battery, CPU-time estimate) and request windows."""

from .base import EnergyMeter, EnergyReading, MeterUnavailable, WrappingCounter
from .battery import BatteryMeter
from .estimate import EstimateMeter
from .jetson import JetsonMeter
from .meter import DEFAULT_ORDER, Detection, detect_meter
from .nvml import NvmlMeter
from .rapl import RaplMeter
from .window import EnergyTracker, EnergyWindow

__all__ = [
    "DEFAULT_ORDER",
    "BatteryMeter",
    "Detection",
    "EnergyMeter",
    "EnergyReading",
    "EnergyTracker",
    "EnergyWindow",
    "EstimateMeter",
    "JetsonMeter",
    "MeterUnavailable",
    "NvmlMeter",
    "RaplMeter",
    "WrappingCounter",
    "detect_meter",
]
