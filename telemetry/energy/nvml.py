"""NVIDIA GPU energy via NVML's total-energy counter (nvidia-ml-py, optional)."""

from __future__ import annotations

from typing import Any

from .base import EnergyMeter, MeterUnavailable, WrappingCounter


def _load_pynvml() -> Any:
    try:
        import pynvml  # type: ignore[import-not-found]  # from nvidia-ml-py
    except ImportError as exc:
        raise MeterUnavailable("nvidia-ml-py is not installed (pip install edgevlm[nvidia])") from exc
    return pynvml


class NvmlMeter(EnergyMeter):
    """Sum of ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load) over all GPUs."""

    source = "nvml"
    scope = "gpu"

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml or _load_pynvml()
        try:
            self._nvml.nvmlInit()
            count = self._nvml.nvmlDeviceGetCount()
            self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            if not self._handles:
                raise MeterUnavailable("NVML found no GPU")
            self._counters = [
                WrappingCounter(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)), 2**64)
                for h in self._handles
            ]
        except MeterUnavailable:
            raise
        except Exception as exc:  # NVMLError subclasses: driver missing, not supported (pre-Volta)
            raise MeterUnavailable(f"NVML energy counter unavailable: {exc}") from exc

    def read_joules(self) -> float:
        total_mj = sum(
            c.update(int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)))
            for c, h in zip(self._counters, self._handles)
        )
        return total_mj / 1000.0

    def describe(self) -> str:
        return f"nvml: {len(self._handles)} GPU(s)"

    def close(self) -> None:
        try:
            self._nvml.nvmlShutdown()
        except Exception:
            pass
