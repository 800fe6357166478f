"""From OpenAI messages to the model's templated prompt (images as media markers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from models.registry import LoadedModel, ModelSpec
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
    truncate: bool = False  # the long-chat policy is on for this request


def refuse_images_without_projector(spec: ModelSpec, messages: list[ChatMessage]) -> None:
    """400 for images sent to a text-only model, decided from its spec before it is loaded
    (loading it only to refuse would cost memory and may evict a model in use)."""
    if spec.mmproj is None and any(isinstance(part, ImagePart) for msg in messages
                                   if isinstance(msg.content, list) for part in msg.content):
        raise APIError(400, f"The model '{spec.id}' has no vision projector (mmproj), so it "
                       "cannot read images; send text only or use a vision model.",
                       param="messages", code="model_not_multimodal")


def _flatten(messages: list[ChatMessage], marker: str
             ) -> tuple[list[dict[str, Any]], list[tuple[int, ImageRef]]]:
    """Template-ready messages, and each image with the ``id`` of the message holding it.

    A client's text never carries the media marker itself (it would make the marker
    count and the image count disagree), so literal occurrences are removed.
    """
    out: list[dict[str, Any]] = []
    images: list[tuple[int, ImageRef]] = []
    for msg in messages:
        content = msg.content
        entry: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role}
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content.replace(marker, "")
        else:
            pieces = []
            for part in content:
                if isinstance(part, TextPart):
                    pieces.append(part.text.replace(marker, ""))
                elif isinstance(part, ImagePart):
                    ref = ImageRef(len(images), part.image_url.url, part.image_url.detail)
                    images.append((id(entry), ref))
                    pieces.append(marker)
            text = "\n".join(pieces) if any(isinstance(p, ImagePart) for p in content) else "".join(pieces)
        entry["content"] = text
        out.append(entry)
    return out, images


def render_chat(messages: list[ChatMessage], model: LoadedModel, *, extension: EdgeVLMExtension | None,
                settings: Settings, record: RequestRecord,
                image_tokens: Mapping[int, int] | None = None) -> RenderedChat:
    """Template the conversation; with truncation on, drop the oldest turns that do not fit.

    ``image_tokens`` (request image index -> tokens it was encoded to) lets a second
    pass count images exactly once they have been encoded; without it images count 0.
    """
    engine = model.engine
    marker = model.vision.media_marker if model.vision is not None else _IMAGE_PLACEHOLDER
    flat, owned = _flatten(messages, marker)
    images = [ref for _, ref in owned]
    refuse_images_without_projector(model.spec, messages)
    if images and len(images) > settings.max_images:
        raise APIError(400, f"Too many images: {len(images)} (the limit is {settings.max_images}).",
                       param="messages", code="too_many_images")
    truncate = settings.truncate_prompts if extension is None or extension.truncate is None \
        else extension.truncate
    if truncate:
        limit = engine.n_ctx - 1 - min(record.max_tokens or 0, engine.n_ctx // 4)
        cost: dict[int, int] = {}
        for owner, ref in owned:
            cost[owner] = cost.get(owner, 0) + (image_tokens or {}).get(ref.index, 0)

        def count(msgs: list[dict[str, Any]]) -> int:
            text_tokens = len(engine.tokenize(engine.template.render(list(msgs))))
            return text_tokens + sum(cost.get(id(m), 0) for m in msgs)

        try:
            kept, dropped = truncate_messages(flat, count, limit)
        except PromptTooLongError as exc:
            raise APIError(400, str(exc), param="messages", code="context_length_exceeded") from exc
        if dropped:
            kept_ids = {id(m) for m in kept}
            images = [ref for owner, ref in owned if owner in kept_ids]
            flat = kept
            record.dropped_tokens = dropped
            record.middleware["truncate.dropped_tokens"] = dropped
    cue = next((m["content"] for m in reversed(flat) if m["role"] == "user"), "")
    return RenderedChat(text=engine.template.render(flat), images=images, prompt_cue=cue,
                        truncate=bool(truncate))
