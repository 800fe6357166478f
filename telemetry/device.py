"""Describe the machine (CPU, cores, RAM, OS, GPU) as OpenTelemetry resource attributes."""

from __future__ import annotations

import os
import platform
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

import psutil


def cpu_model(proc_root: str = "/") -> str:
    """CPU model name from /proc/cpuinfo (``model name`` on x86, ``Hardware``/``Model`` on ARM)."""
    try:
        text = (Path(proc_root) / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "model", "cpu model", "processor"):
        if fields.get(key) and not fields[key].isdigit():
            return fields[key]
    return platform.processor() or platform.machine()


def board_model(proc_root: str = "/") -> str | None:
    """Board name from the device tree (Jetson, Raspberry Pi), when there is one."""
    try:
        return (Path(proc_root) / "proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def gpu_names() -> list[str]:
    """NVIDIA GPU names via nvidia-ml-py when it is installed and a driver answers."""
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            names = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(name.decode() if isinstance(name, bytes) else str(name))
            return names
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return []


@lru_cache(maxsize=1)
def device_attributes() -> dict[str, Any]:
    """Resource attributes for this machine; computed once per process."""
    attrs: dict[str, Any] = {
        "host.name": socket.gethostname(),
        "host.arch": platform.machine(),
        "os.type": platform.system().lower(),
        "os.description": platform.platform(),
        "host.cpu.model.name": cpu_model(),
        "edgevlm.device.cpu_logical_cores": os.cpu_count() or 0,
        "edgevlm.device.cpu_physical_cores": psutil.cpu_count(logical=False) or 0,
        "edgevlm.device.memory_bytes": psutil.virtual_memory().total,
    }
    board = board_model()
    if board:
        attrs["edgevlm.device.board"] = board
    gpus = gpu_names()
    if gpus:
        attrs["edgevlm.device.gpus"] = gpus
    return attrs
