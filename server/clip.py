"""The server's CLIP model: configured from flags, env and the TOML ``[clip]`` table.

``--clip-model`` / ``--clip-checkpoint`` / ``--clip-config`` (``EDGEVLM_CLIP_*``) win
over the config file's ``[clip]`` table (keys ``model``, ``checkpoint``, ``config``,
``threads``; relative paths are relative to the file). Loading happens at start-up, so
a missing checkpoint stops the server with one ``edgevlm: error:`` line naming it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from models.clip import ClipScorer, ClipSpec
from models.registry import ConfigError
from server.settings import Settings

__all__ = ["CLIP_NOT_CONFIGURED", "clip_spec", "load_clip"]

CLIP_NOT_CONFIGURED = ("CLIP is not configured on this server: start it with --clip-model and "
                       "--clip-checkpoint (pip install 'edgevlm[clip]')")
_TABLE_KEYS = {"model", "checkpoint", "config", "threads"}


def _table(settings: Settings) -> tuple[dict[str, Any], Path | None]:
    if not settings.config:
        return {}, None
    path = Path(settings.config)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}, None  # the registry reports an unreadable config file
    table = data.get("clip", {})
    if not isinstance(table, dict):
        raise ConfigError(f"model config {path}: [clip] must be a table")
    unknown = set(table) - _TABLE_KEYS
    if unknown:
        raise ConfigError(f"model config {path}: [clip] has unknown keys {sorted(unknown)}")
    return table, path.parent.resolve()


def clip_spec(settings: Settings) -> ClipSpec | None:
    """What CLIP to load, or ``None`` when none is configured."""
    table, base = _table(settings)

    def path_of(flag: str | None, key: str) -> str | None:
        if flag is not None:
            return flag
        value = table.get(key)
        if value is None:
            return None
        p = Path(str(value))
        return str(p if p.is_absolute() or base is None else base / p)

    model = settings.clip_model or table.get("model")
    checkpoint = path_of(settings.clip_checkpoint, "checkpoint")
    config = path_of(settings.clip_config, "config")
    if model is None:
        if checkpoint is not None or config is not None:
            raise ConfigError("--clip-checkpoint / --clip-config need --clip-model (the model name)")
        return None
    threads = settings.clip_threads or table.get("threads")
    return ClipSpec(model=str(model), checkpoint=checkpoint, config=config,
                    threads=int(threads) if threads else None)


def load_clip(settings: Settings) -> ClipScorer | None:
    """The configured CLIP model, loaded on the CPU; ``ConfigError`` when it cannot be."""
    spec = clip_spec(settings)
    return ClipScorer.load(spec) if spec is not None else None
