"""What one inference request cost, as plain data.

``server`` fills these records, from what it measured and from the figures the engine
(``models``) reports in each request's final event, and passes them to telemetry. Keeping the type here lets both sides
depend on telemetry without ``telemetry`` importing either of them, and gives span
attributes, metrics and reports one source of truth.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass, field
from typing import Any


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class ImageRecord:
    """One image's path through the middleware and the vision encoder."""

    index: int
    source_width: int = 0
    source_height: int = 0
    encoded_width: int = 0
    encoded_height: int = 0
    tokens_before: int = 0  # tokens the projector produced for the encoded image
    tokens_after: int = 0  # tokens prefilled into the LLM after pruning
    encode_ms: float = 0.0
    cache_hit: bool = False  # every part of the image came from the embedding cache
    cached_tokens: int = 0  # of tokens_before, those the embedding cache served (not encoded now)
    budget_tokens: int | None = None  # token budget the resolution policy asked for
    budget_source: str | None = None  # request | detail | profile | ttft_budget | model
    resize_note: str | None = None  # why the encoder saw the size it saw
    prune_method: str | None = None
    prune_keep: float | None = None  # fraction of rows kept
    prune_ms: float = 0.0
    clip_ms: float = 0.0  # CLIP scoring of this image (zoom tiles, relevance, label); 0 on a cache hit
    zoom_tiles: list[int] | None = None  # tiles zoom sent (tiles) or cropped to (crop), row-major; None when not zoomed
    zoom_grid: str | None = None  # the zoom tile grid, "colsxrows"
    zoom_mode: str | None = None  # "tiles" (overview + tiles as image parts) or "crop"
    zoom_parts: int | None = None  # image parts sent for the image (tiles: overview + tiles; crop: 1)
    clip_label: str | None = None  # CLIP's zero-shot image type (routing for auto detail)

    @property
    def source_pixels(self) -> int:
        return self.source_width * self.source_height

    @property
    def encoded_pixels(self) -> int:
        return self.encoded_width * self.encoded_height


@dataclass
class ModelInfo:
    """Facts about the loaded model file that explain its speed and memory."""

    model_id: str
    path: str = ""
    mmproj_path: str | None = None
    quantization: str | None = None  # e.g. Q4_1, Q4_K_M (from GGUF file type)
    bits_per_weight: float | None = None  # file bytes * 8 / parameter count
    n_params: int | None = None
    file_bytes: int | None = None
    n_ctx: int = 0  # the most tokens one request may hold (its slot's share, per slot)
    n_threads: int = 0
    n_parallel: int = 1
    kv_layout: str = "shared"  # shared | per-slot (models.engine.types.KV_LAYOUTS)
    stream_interval: int = 1  # decode steps per hand-over of a running request's text
    flash_attn: bool | None = None  # attention kernel: flash, plain (False), llama.cpp's choice (None)


@dataclass
class RequestRecord:
    """Everything telemetry records about one request; times are milliseconds."""

    operation: str  # "chat" | "text_completion"
    model: ModelInfo
    request_id: str = ""
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a reused KV prefix
    restored_tokens: int = 0  # KV tokens copied back from host RAM before reuse
    # prompt tokens whose KV another request's slot holds or computed in the same step
    shared_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually computed
    dropped_tokens: int = 0  # tokens removed by the long-prompt policy
    drafted_tokens: int = 0  # speculative decoding: tokens proposed and verified
    accepted_tokens: int = 0  # of those, tokens the model agreed with
    finish_reason: str | None = None
    error_type: str | None = None
    runner_exit: str | None = None  # how the model's runner process died under the request (SIGSEGV...)
    profile: str | None = None  # the middleware profile the request ran under (its own or the server's)

    load_ms: float = 0.0  # waiting for the model to load on first use (inside ttft_ms)
    queue_ms: float = 0.0
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    e2e_ms: float = 0.0
    slot: int | None = None
    batch_size_mean: float | None = None

    images: list[ImageRecord] = field(default_factory=list)
    middleware: dict[str, Any] = field(default_factory=dict)  # profile, budget, predictions

    peak_rss_bytes: int | None = None  # the server process's peak, plus the runner's (below)
    runner_peak_rss_bytes: int | None = None  # peak of the model's runner process, when it has one
    energy: dict[str, Any] = field(default_factory=dict)  # filled by telemetry.energy

    prompt_text: str | None = None  # only kept when content capture is opted in
    completion_text: str | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first one, over the time spent producing them."""
        if self.output_tokens <= 1 or self.decode_ms <= 0:
            return 0.0
        return (self.output_tokens - 1) / (self.decode_ms / 1000.0)

    @property
    def prefill_tokens_per_s(self) -> float:
        if self.prefilled_tokens <= 0 or self.prefill_ms <= 0:
            return 0.0
        return self.prefilled_tokens / (self.prefill_ms / 1000.0)

    @property
    def time_per_output_token_ms(self) -> float:
        if self.output_tokens <= 1:
            return 0.0
        return self.decode_ms / (self.output_tokens - 1)

    @property
    def image_tokens(self) -> int:
        return sum(im.tokens_after for im in self.images)

    def timings(self) -> dict[str, Any]:
        """The response's ``timings`` extension (llama-server/Ollama style)."""
        out: dict[str, Any] = {
            "queue_ms": round(self.queue_ms, 3),
            "prompt_ms": round(self.prefill_ms + self.encode_ms, 3),
            "encode_ms": round(self.encode_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3),
            "decode_ms": round(self.decode_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "prompt_tokens": self.input_tokens,
            "prompt_cached_tokens": self.cached_tokens,
            "prompt_prefilled_tokens": self.prefilled_tokens,
            "completion_tokens": self.output_tokens,
        }
        if self.images:
            out["images"] = [asdict(im) for im in self.images]
        if self.middleware:
            out["middleware"] = dict(self.middleware)
        if self.dropped_tokens:
            out["dropped_tokens"] = self.dropped_tokens
        if self.drafted_tokens:
            out["drafted_tokens"] = self.drafted_tokens
            out["accepted_tokens"] = self.accepted_tokens
        if self.load_ms:
            out["load_ms"] = round(self.load_ms, 3)
        return out
