"""What the operator can configure about telemetry; the server fills it from its own settings."""

from __future__ import annotations

from dataclasses import dataclass

from .energy.estimate import DEFAULT_CPU_TDP_WATTS
from .energy.meter import DEFAULT_ORDER


@dataclass
class TelemetrySettings:
    """Plain dataclass so telemetry does not depend on the server's settings classes."""

    traces_path: str | None = "traces/edgevlm-traces.jsonl"  # None disables the JSONL file
    traces_max_bytes: int = 50_000_000
    traces_keep: int = 5
    traces_flush_ms: int = 1000  # batch delay for the file: a crash loses at most this much
    traces_fsync: bool = True
    otlp_endpoint: str | None = None  # base URL (…/v1/traces appended) or full traces URL; else OTEL_EXPORTER_OTLP_* env
    otlp_timeout_s: float = 5.0
    console: bool = False
    capture_content: bool = False  # prompt/completion text only when the operator opts in
    energy: bool = True
    energy_sysfs_root: str = "/"
    energy_meters: tuple[str, ...] = DEFAULT_ORDER  # tried in order, first that works wins
    cpu_watts_per_core: float | None = None  # for the estimate meter; default cpu_tdp_watts / cores
    cpu_tdp_watts: float = DEFAULT_CPU_TDP_WATTS
    metrics: bool = True
