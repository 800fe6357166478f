"""From OpenAI messages to the model's templated prompt (images as media markers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.registry import LoadedModel
from server.errors import APIError
from server.policy.extension import EdgeVLMExtension
from server.policy.truncation import PromptTooLongError, truncate_messages
from server.protocol.chat import ChatMessage, ImagePart, TextPart
from server.settings import Settings
from telemetry.record import RequestRecord

# Stands in for an image while counting tokens of text-only turns for truncation.
_IMAGE_PLACEHOLDER = "<image>"


@dataclass
class ImageRef:
    index: int  # position among all images of the request (for error messages)
    url: str
    detail: str


@dataclass
class RenderedChat:
    text: str  # templated prompt; one media marker per image, in order
    images: list[ImageRef] = field(default_factory=list)
    prompt_cue: str = ""  # the last user turn's text, for content-aware resolution


def _flatten(messages: list[ChatMessage], marker: str) -> tuple[list[dict[str, Any]], list[ImageRef]]:
    out: list[dict[str, Any]] = []
    images: list[ImageRef] = []
    for msg in messages:
        content = msg.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            pieces = []
            for part in content:
                if isinstance(part, TextPart):
                    pieces.append(part.text)
                elif isinstance(part, ImagePart):
                    images.append(ImageRef(len(images), part.image_url.url, part.image_url.detail))
                    pieces.append(marker)
            text = "\n".join(pieces) if any(isinstance(p, ImagePart) for p in content) else "".join(pieces)
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": text})
    return out, images


def render_chat(messages: list[ChatMessage], model: LoadedModel, *, extension: EdgeVLMExtension | None,
                settings: Settings, record: RequestRecord) -> RenderedChat:
    engine = model.engine
    marker = model.vision.media_marker if model.vision is not None else _IMAGE_PLACEHOLDER
    flat, images = _flatten(messages, marker)
    if images and model.vision is None:
        raise APIError(400, f"The model '{model.spec.id}' has no vision projector (mmproj), so it "
                       "cannot read images; send text only or use a vision model.",
                       param="messages", code="model_not_multimodal")
    if images and len(images) > settings.max_images:
        raise APIError(400, f"Too many images: {len(images)} (the limit is {settings.max_images}).",
                       param="messages", code="too_many_images")
    truncate = settings.truncate_prompts if extension is None or extension.truncate is None \
        else extension.truncate
    if truncate:
        limit = engine.n_ctx - 1 - min(record.max_tokens or 0, engine.n_ctx // 4)

        def count(msgs: list[dict[str, Any]]) -> int:
            return len(engine.tokenize(engine.template.render(list(msgs))))

        try:
            kept, dropped = truncate_messages(flat, count, limit)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        if dropped:
            kept_ids = {id(m) for m in kept}
            # Images inside dropped turns go too, keeping markers and images aligned.
            images = _images_in(kept, flat, kept_ids, images, marker)
            flat = kept
            record.dropped_tokens = dropped
            record.middleware["truncate.dropped_tokens"] = dropped
    cue = next((m["content"] for m in reversed(flat) if m["role"] == "user"), "")
    return RenderedChat(text=engine.template.render(flat), images=images, prompt_cue=cue)


def _images_in(kept: list[dict[str, Any]], flat: list[dict[str, Any]], kept_ids: set[int],
               images: list[ImageRef], marker: str) -> list[ImageRef]:
    out: list[ImageRef] = []
    it = iter(images)
    for msg in flat:
        n = msg["content"].count(marker)
        for _ in range(n):
            ref = next(it)
            if id(msg) in kept_ids:
                out.append(ref)
    return out
