"""Prometheus metrics for GET /metrics, named after the OpenTelemetry GenAI conventions."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Bucket boundaries from the GenAI semantic conventions (gen_ai.server.* metrics).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
REQUEST_DURATION_BUCKETS = TTFT_BUCKETS
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

MODEL_OP = ("gen_ai_request_model", "gen_ai_operation_name")
# Finished-request metrics also carry the middleware profile (quality | balanced | fast |
# none): three values, so the series stay bounded.
MODEL_OP_PROFILE = (*MODEL_OP, "edgevlm_profile")

# model id -> cache counters (entries, bytes, max_bytes, hits, misses, evictions)
CacheStats = Callable[[], Mapping[str, Mapping[str, int]]]


class ImageCacheCollector:
    """Reads each vision model's image-embedding cache counters at scrape time.

    The cache lives with the model and keeps its own counts; reading them when
    /metrics is asked keeps telemetry free of model code and adds nothing per request.
    """

    GAUGES = (("entries", "edgevlm_image_cache_entries", "Image embeddings held in the cache"),
              ("bytes", "edgevlm_image_cache_bytes", "Bytes of image embeddings held in the cache"),
              ("max_bytes", "edgevlm_image_cache_max_bytes", "Size limit of the image-embedding cache"))
    COUNTERS = (("hits", "edgevlm_image_cache_hits", "Images whose embeddings came from the cache"),
                ("misses", "edgevlm_image_cache_misses", "Images encoded because they were not cached"),
                ("evictions", "edgevlm_image_cache_evictions", "Embeddings dropped to stay under the limit"))

    def __init__(self, stats: CacheStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []  # families depend on which models are loaded

    def collect(self) -> Iterator[Metric]:
        per_model = self.stats()
        labels = ["gen_ai_request_model"]
        for key, name, doc in self.GAUGES:
            g = GaugeMetricFamily(name, doc, labels=labels)
            for model, s in per_model.items():
                g.add_metric([model], s.get(key, 0))
            yield g
        for key, name, doc in self.COUNTERS:
            c = CounterMetricFamily(name, doc, labels=labels)
            for model, s in per_model.items():
                c.add_metric([model], s.get(key, 0))
            yield c


# model id -> runner row (pid, rss_bytes, restarts, last_exit, state)
RunnerStats = Callable[[], Mapping[str, Mapping[str, object]]]


class RunnerCollector:
    """Reads each model's runner process (pid, RSS, restarts, last exit) at scrape time.

    Present only in runner mode; like the image caches, read when /metrics is asked, so
    telemetry needs no model code and no per-request work.
    """

    def __init__(self, stats: RunnerStats) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []  # families depend on which models are loaded

    def collect(self) -> Iterator[Metric]:
        per_model = self.stats()
        info = GaugeMetricFamily("edgevlm_runner_info", "A model's runner process: pid, state and last exit",
                                 labels=["gen_ai_request_model", "pid", "state", "last_exit"])
        rss = GaugeMetricFamily("edgevlm_runner_resident_memory_bytes", "Resident memory of a model's runner",
                                labels=["gen_ai_request_model"])
        restarts = CounterMetricFamily("edgevlm_runner_restarts", "Times a model's runner was restarted after a crash",
                                       labels=["gen_ai_request_model"])
        for model, s in per_model.items():
            info.add_metric([model, str(s.get("pid") or ""), str(s.get("state") or ""),
                             str(s.get("last_exit") or "")], 1)
            rss.add_metric([model], float(s.get("rss_bytes") or 0))  # type: ignore[arg-type]
            restarts.add_metric([model], float(s.get("restarts") or 0))  # type: ignore[arg-type]
        yield from (info, rss, restarts)


class Metrics:
    """All server metrics on a private registry, so several apps in one process don't clash."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "gen_ai_server_time_to_first_token", "Time to generate the first token (s)",
            MODEL_OP_PROFILE, buckets=TTFT_BUCKETS, unit="seconds", registry=r,
        )
        self.tpot = Histogram(
            "gen_ai_server_time_per_output_token", "Time per output token after the first (s)",
            MODEL_OP_PROFILE, buckets=TPOT_BUCKETS, unit="seconds", registry=r,
        )
        self.duration = Histogram(
            "gen_ai_server_request_duration", "Server-side request duration (s)",
            MODEL_OP_PROFILE, buckets=REQUEST_DURATION_BUCKETS, unit="seconds", registry=r,
        )
        self.tokens = Counter(
            "edgevlm_tokens", "Tokens processed, by gen_ai.token.type (input/output)",
            (*MODEL_OP_PROFILE, "gen_ai_token_type"), registry=r,
        )
        self.requests = Counter(
            "edgevlm_requests", "Finished requests by status (ok/error) and error.type",
            (*MODEL_OP_PROFILE, "status", "error_type"), registry=r,
        )
        self.rejected = Counter(
            "edgevlm_requests_rejected", "Requests refused with 429 because the queue was full",
            ("gen_ai_request_model",), registry=r,
        )
        self.queue_depth = Gauge(
            "edgevlm_queue_depth", "Requests waiting for an engine slot", ("gen_ai_request_model",), registry=r,
        )
        self.in_flight = Gauge(
            "edgevlm_requests_in_flight", "Requests begun and not finished", ("gen_ai_request_model",), registry=r,
        )
        self.energy = Counter(
            "edgevlm_energy_joules", "Energy attributed to request windows, by meter source",
            (*MODEL_OP_PROFILE, "source"), registry=r,
        )
        self.export_failures = Counter(
            "edgevlm_telemetry_export_failures", "Span export batches that failed, by exporter",
            ("exporter",), registry=r,
        )

    def watch_image_caches(self, stats: CacheStats) -> None:
        """Report the image-embedding caches ``stats()`` describes on every scrape."""
        self.registry.register(ImageCacheCollector(stats))

    def watch_runners(self, stats: RunnerStats) -> None:
        """Report the runner processes ``stats()`` describes on every scrape."""
        self.registry.register(RunnerCollector(stats))

    def render(self) -> tuple[bytes, str]:
        """Prometheus text exposition body and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
