"""Images of a chat request: load safely, decide resolution and pruning, encode.

The policy (how many tokens each image is worth, how many rows to keep) is decided
here; the mechanisms (resize, libmtmd encode, prune) live in ``models``.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request

from models.engine import Segment
from models.registry import LoadedModel
from server.policy.extension import EdgeVLMExtension
from server.prompt import RenderedChat
from telemetry.record import RequestRecord


async def prepare_images(rendered: RenderedChat, model: LoadedModel, body: Any,
                         extension: EdgeVLMExtension | None, request: Request,
                         record: RequestRecord) -> list[Segment]:
    """The prompt as engine segments: token runs and (pruned) image embeddings."""
    if not rendered.images:
        return [model.engine.tokenize(rendered.text)]
    raise NotImplementedError
