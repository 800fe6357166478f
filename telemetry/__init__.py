"""Observability for edgevlm: tracing, metrics, energy and reports. Imports neither server nor models."""

from .record import ImageRecord, ModelInfo, RequestRecord
from .service import RequestTrace, Telemetry
from .settings import TelemetrySettings

__all__ = ["ImageRecord", "ModelInfo", "RequestRecord", "RequestTrace", "Telemetry", "TelemetrySettings"]
