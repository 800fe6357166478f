"""Dashboard figures over the last minutes, computed from the /metrics registry itself.

Prometheus counters and histograms only grow, so the figures for a window are the
difference between now and a snapshot taken when the window began: no second set of
counts is kept beside the metrics. Snapshots are taken when the dashboard asks (at
most one per :attr:`MetricsWindow.every_s`), plus an all-zero one at start, so the
window a summary covers is reported with it (``window_s``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

Key = tuple[str, tuple[tuple[str, str], ...]]
MODEL = "gen_ai_request_model"
OPERATION = "gen_ai_operation_name"
PROFILE = "edgevlm_profile"


@dataclass
class Snapshot:
    t: float
    samples: dict[Key, float] = field(default_factory=dict)


def read_samples(registry: CollectorRegistry) -> dict[Key, float]:
    """Every sample in the registry, keyed by name and sorted labels."""
    out: dict[Key, float] = {}
    for family in registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear interpolation inside the bucket that
    holds rank ``q * count``; ``buckets`` are (upper bound, cumulative count)."""
    buckets = sorted(buckets)
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the largest finite bound: its bound is the best answer
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


class MetricsWindow:
    """Windowed per-model figures from a metrics registry (thread-safe)."""

    def __init__(self, registry: CollectorRegistry, keep_s: float = 3600.0, every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.keep_s = keep_s
        self.every_s = every_s
        self.clock = clock
        self._snapshots = [Snapshot(clock())]  # metrics start at zero with the app
        self._lock = threading.Lock()

    def _baseline(self, now: float, window_s: float, current: dict[Key, float]) -> Snapshot:
        with self._lock:
            if now - self._snapshots[-1].t >= self.every_s:
                self._snapshots.append(Snapshot(now, current))
                # the zero snapshot stays until a kept one is old enough to replace it
                cutoff = now - self.keep_s
                while len(self._snapshots) > 2 and self._snapshots[1].t <= cutoff:
                    self._snapshots.pop(0)
            older = [s for s in self._snapshots if s.t <= now - window_s]
            return older[-1] if older else self._snapshots[0]

    def summary(self, window_s: float = 300.0) -> dict[str, Any]:
        """Per (model, operation, profile): requests, errors, TTFT p50/p95, decode tok/s, tokens,
        with in-flight and queued requests now; energy per meter source and J/token."""
        now = self.clock()
        current = read_samples(self.registry)
        base = self._baseline(now, window_s, current)

        def delta(key: Key) -> float:
            return current.get(key, 0.0) - base.samples.get(key, 0.0)

        rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        gauges: dict[str, dict[str, float]] = {}
        ttft_buckets: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
        joules: dict[str, float] = {}
        output_tokens = 0.0
        for key in current:
            name, labels = key
            lab = dict(labels)
            model, op, profile = lab.get(MODEL), lab.get(OPERATION), lab.get(PROFILE, "none")
            if name in ("edgevlm_requests_in_flight", "edgevlm_queue_depth") and model is not None:
                gauges.setdefault(model, {})[name] = current[key]
            elif name == "edgevlm_energy_joules_total":
                source = lab.get("source", "unknown")
                joules[source] = joules.get(source, 0.0) + delta(key)
            if model is None or op is None:
                continue
            row = rows.setdefault((model, op, profile), {"model": model, "operation": op,
                                                         "profile": profile, "requests": 0.0, "joules": 0.0,
                                                         "energy_sources": set(),
                                                "errors": 0.0, "input_tokens": 0.0, "output_tokens": 0.0,
                                                "tpot_sum": 0.0, "tpot_count": 0.0})
            if name == "edgevlm_energy_joules_total":
                row["joules"] += delta(key)
                row["energy_sources"].add(lab.get("source", "unknown"))
            elif name == "gen_ai_server_request_duration_seconds_count":
                row["requests"] += delta(key)
            elif name == "edgevlm_requests_total" and lab.get("status") == "error":
                row["errors"] += delta(key)
            elif name == "edgevlm_tokens_total":
                row[f"{lab.get('gen_ai_token_type')}_tokens"] += delta(key)
                if lab.get("gen_ai_token_type") == "output":
                    output_tokens += delta(key)
            elif name == "gen_ai_server_time_per_output_token_seconds_sum":
                row["tpot_sum"] += delta(key)
            elif name == "gen_ai_server_time_per_output_token_seconds_count":
                row["tpot_count"] += delta(key)
            elif name == "gen_ai_server_time_to_first_token_seconds_bucket":
                ttft_buckets.setdefault((model, op, profile), []).append((float(lab["le"]), delta(key)))

        for model in gauges.keys() - {m for m, _, _ in rows}:  # busy before its first request ended
            rows[(model, "", "")] = {"model": model, "operation": None, "profile": None,
                                     "requests": 0.0, "errors": 0.0, "joules": 0.0, "energy_sources": set(),
                                 "input_tokens": 0.0, "output_tokens": 0.0, "tpot_sum": 0.0,
                                 "tpot_count": 0.0}
        models = []
        for (model, op, profile), row in sorted(rows.items()):
            tpot_sum, tpot_count = row.pop("tpot_sum"), row.pop("tpot_count")
            sources = sorted(row.pop("energy_sources"))
            buckets = ttft_buckets.get((model, op, profile), [])
            p50, p95 = histogram_quantile(0.5, buckets), histogram_quantile(0.95, buckets)
            row.update({
                "ttft_p50_ms": None if p50 is None else p50 * 1000.0,
                "ttft_p95_ms": None if p95 is None else p95 * 1000.0,
                "decode_tokens_per_s": tpot_count / tpot_sum if tpot_sum > 0 else None,
                "joules_per_output_token": (row["joules"] / row["output_tokens"]
                                            if sources and row["output_tokens"] > 0 else None),
                "energy_source": ",".join(sources) or None,
                "in_flight": gauges.get(model, {}).get("edgevlm_requests_in_flight", 0.0),
                "queued": gauges.get(model, {}).get("edgevlm_queue_depth", 0.0),
            })
            models.append(row)
        total_j = sum(joules.values())
        return {
            "window_s": round(now - base.t, 3), "models": models,
            "energy": {"joules": joules, "joules_per_output_token":
                       total_j / output_tokens if output_tokens > 0 and joules else None},
        }
