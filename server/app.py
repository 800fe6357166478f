"""Application factory: settings in, a ready FastAPI app out (no global state)."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from models.registry import LoadedModel, ModelSpec, Registry, build_registry
from models.runner import RestartPolicy
from server import __version__
from server.clip import load_clip
from server.csp import ContentSecurityPolicy
from server.errors import install_handlers
from server.limits import BodySizeLimit
from server.openapi import install_openapi
from server.policy.profiles import DEFAULT_PROFILES, ProfileSet
from server.routes import chat, completions, console, dashboard, health, metrics, models, requests
from server.settings import Settings
from server.warmup import measure_cost_model
from telemetry import Telemetry, TelemetrySettings
from telemetry.dashboard import MetricsWindow

log = logging.getLogger("edgevlm.app")


def telemetry_settings(settings: Settings) -> TelemetrySettings:
    return TelemetrySettings(
        traces_path=settings.traces_path(), traces_max_bytes=settings.traces_max_bytes,
        traces_keep=settings.traces_keep, traces_flush_ms=settings.traces_flush_ms,
        otlp_endpoint=settings.otlp_endpoint,
        console=settings.console_traces, capture_content=settings.capture_content,
        energy=settings.energy, energy_sysfs_root=settings.energy_sysfs_root,
        cpu_watts_per_core=settings.cpu_watts_per_core, metrics=settings.metrics,
    )


def runner_policy(settings: Settings) -> RestartPolicy | None:
    """The runners' restart policy with ``--runners on``; None runs models in process."""
    if settings.runners != "on":
        return None
    return RestartPolicy(max_crashes=settings.runner_max_crashes, window_s=settings.runner_crash_window_s)


def registry_from(settings: Settings) -> Registry:
    defaults = {"ctx_size": settings.ctx_size, "threads": settings.threads,
                "parallel": settings.parallel, "batch": settings.batch, "repack": settings.repack,
                "flash_attn": settings.flash_attn,
                "speculative": settings.speculative, "draft_model": settings.draft_model,
                "kv_layout": settings.kv_layout, "stream_interval": settings.stream_interval,
                "image_cache_mb": settings.image_cache_mb, "prompt_cache_mb": settings.prompt_cache_mb}
    return build_registry(
        model=settings.model, mmproj=settings.mmproj, config=settings.config,
        model_options={"image_min_tokens": settings.image_min_tokens,
                       "image_max_tokens": settings.image_max_tokens},
        models_dir=settings.models_dir, defaults=defaults, embedded_model=settings.embedded_model,
        max_loaded=settings.max_loaded_models,
        max_memory_bytes=settings.max_model_memory_mb * 2**20 if settings.max_model_memory_mb else None,
        runners=runner_policy(settings),
    )


def image_cache_stats(registry: Registry) -> dict[str, dict[str, int]]:
    """Each loaded vision model's image-embedding cache counters, for /metrics."""
    return {lm.spec.id: lm.vision.cache.stats() for lm in registry.loaded() if lm.vision is not None}


def runner_stats(registry: Registry) -> dict[str, dict[str, object]]:
    """Each loaded model's runner process (pid, RSS, restarts, last exit), for /metrics."""
    return {lm.spec.id: lm.runner.supervision() for lm in registry.loaded() if lm.runner is not None}


def profiles_for(settings: Settings) -> ProfileSet:
    """The middleware presets, with the operator's resolution mode (resize | zoom)."""
    if settings.resolution_mode == DEFAULT_PROFILES.quality.resolution:
        return DEFAULT_PROFILES
    mode = {"resolution": settings.resolution_mode}
    return DEFAULT_PROFILES.model_copy(update={
        name: getattr(DEFAULT_PROFILES, name).model_copy(update=mode) for name in ("quality", "balanced", "fast")})


def create_app(settings: Settings | None = None, *, registry: Registry | None = None,
               telemetry: Telemetry | None = None, preload: bool = True) -> FastAPI:
    settings = settings or Settings()
    registry = registry or registry_from(settings)
    clip = load_clip(settings)
    telemetry = telemetry or Telemetry(telemetry_settings(settings), service_version=__version__)
    telemetry.label_models(spec.id for spec in registry.list())
    telemetry.watch_image_caches(lambda: image_cache_stats(registry))
    if settings.runners == "on":
        telemetry.watch_runners(lambda: runner_stats(registry))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        telemetry.start()
        loader = None
        if preload and registry.default_id is not None:
            loader = asyncio.create_task(_preload(app))
        try:
            yield
        finally:
            if loader is not None and not loader.done():
                loader.cancel()
            await asyncio.get_running_loop().run_in_executor(None, registry.close)
            telemetry.shutdown()

    # /docs (and /redoc, which leads there) come from server.routes.console, with their assets
    # served from the package instead of a CDN.
    app = FastAPI(title="edgevlm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible local inference for quantized vision-language models.")
    app.state.settings = settings
    app.state.registry = registry
    app.state.telemetry = telemetry
    app.state.api_keys = settings.api_keys()
    app.state.load_error = None
    app.state.metrics_window = MetricsWindow(telemetry.metrics.registry) if telemetry.metrics else None
    app.state.cost_models = {}  # model id -> server.policy.budget.CostModel (TTFT budgets)
    app.state.profiles = profiles_for(settings)
    app.state.clip = clip  # models.clip.ClipScorer or None (zoom, relevant pruning, routing)
    install_handlers(app)
    install_openapi(app)
    _warm_on_load(app, registry)

    for module in (chat, completions, models, health, metrics, dashboard, requests, console):
        app.include_router(module.router)
    console.mount_static(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ArrivalTime)
    app.add_middleware(ContentSecurityPolicy)
    return app


class ArrivalTime:
    """Stamp each request on arrival so TTFT and queue time start when the client asked."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope.setdefault("state", {})["arrival"] = time.perf_counter()
        await self.app(scope, receive, send)


def _warm_on_load(app: FastAPI, registry: Registry) -> None:
    """Each model, right after loading, runs one warm-up request that seeds its cost model."""
    load = registry.loader

    def load_and_warm(spec: ModelSpec) -> LoadedModel:
        model = load(spec)
        try:
            app.state.cost_models[spec.id] = measure_cost_model(model)
        except Exception:  # a failed warm-up leaves the generic defaults in place
            log.warning("warm-up of %s failed; TTFT predictions start from defaults", spec.id,
                        exc_info=True)
        return model

    registry.loader = load_and_warm


async def _preload(app: FastAPI) -> None:
    try:
        async with app.state.registry.use(None):
            pass
    except Exception as exc:  # surfaced by /health; requests get the error too
        log.exception("loading the default model failed")
        app.state.load_error = str(exc)
        return
    if app.state.settings.energy:
        # Idle power right after loading, before traffic: the baseline that per-request
        # "idle-subtracted" joules are computed against.
        await asyncio.get_running_loop().run_in_executor(None, app.state.telemetry.sample_idle_power, 1.0)
