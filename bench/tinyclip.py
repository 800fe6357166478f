"""A tiny, randomly initialised open_clip model: a config JSON plus a checkpoint file.

Tests and benchmarks of the CLIP-guided middleware need a real open_clip model that
loads, tokenizes and embeds exactly like ViT-B-32 does, but no weights may be
downloaded. :func:`tiny_clip` writes one (about 2 M parameters, most of them the
49 408-token embedding the stock BPE tokenizer needs) from a seeded generator in well
under a second. Its scores are deterministic but meaningless: anything measured with
it is mechanics (shapes, costs, plumbing), never quality.

Needs the ``clip`` extra (torch, open_clip_torch).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["TINY_CLIP_CONFIG", "TINY_CLIP_NAME", "tiny_clip"]

TINY_CLIP_NAME = "edgevlm-tiny-clip"
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_clip(directory: str | os.PathLike[str], seed: int = 0) -> tuple[Path, Path]:
    """``(config_json, checkpoint)`` of the tiny model in ``directory``, written only if missing.

    The config file is named ``<TINY_CLIP_NAME>.json``, so ``--clip-config`` registers
    it under that model name; the checkpoint is a plain ``state_dict`` saved by torch.
    """
    import torch

    from models.clip import register_model_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / f"{TINY_CLIP_NAME}.json"
    checkpoint = directory / f"{TINY_CLIP_NAME}-seed{seed}.pt"
    if not config.exists():
        _atomic(config, json.dumps(TINY_CLIP_CONFIG, indent=1).encode())
    if not checkpoint.exists():
        import open_clip

        name = register_model_config(config)
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        os.close(fd)
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, checkpoint)
    return config, checkpoint


def _atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
