"""The one place that turns a RequestRecord into span attributes (GenAI semconv + edgevlm.*)."""

from __future__ import annotations

import json
from typing import Any

from .record import RequestRecord

PROVIDER = "llama.cpp"
Attrs = dict[str, Any]
MAX_MODEL_ID_CHARS = 128  # a client may name any model: spans keep what it sent, this much


def span_model_id(model_id: str) -> str:
    """The model id as sent, cut to :data:`MAX_MODEL_ID_CHARS` for the span."""
    return model_id[:MAX_MODEL_ID_CHARS]

# Middleware keys that also get a short, well-known attribute name.
MIDDLEWARE_ALIASES = {
    "profile": "edgevlm.profile",
    "ttft_budget_ms": "edgevlm.budget.ttft_ms",
    "budget_ttft_ms": "edgevlm.budget.ttft_ms",
    "predicted_ttft_ms": "edgevlm.predicted_ttft_ms",
}


def _attr_value(value: Any) -> Any | None:
    """A value OpenTelemetry accepts (scalar or homogeneous list), else a JSON string."""
    if value is None:
        return None
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, type(value[0])) for v in value) \
            and isinstance(value[0], (bool, int, float, str)):
        return list(value)
    return json.dumps(value, default=str, separators=(",", ":"))


def flatten(prefix: str, data: dict[str, Any], out: Attrs) -> None:
    """Nested dicts become dotted keys under ``prefix``."""
    for key, value in data.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flatten(name, value, out)
        else:
            v = _attr_value(value)
            if v is not None:
                out[name] = v


def _put(out: Attrs, key: str, value: Any) -> None:
    if value is not None:
        out[key] = value


def request_attributes(record: RequestRecord) -> Attrs:
    """Request parameters, known before generation starts."""
    a: Attrs = {
        "gen_ai.operation.name": record.operation,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": span_model_id(record.model.model_id),
        "gen_ai.request.stream": record.stream,
    }
    _put(a, "gen_ai.request.max_tokens", record.max_tokens)
    _put(a, "gen_ai.request.temperature", record.temperature)
    _put(a, "gen_ai.request.top_p", record.top_p)
    _put(a, "gen_ai.request.seed", record.seed)
    return a


def record_attributes(record: RequestRecord, capture_content: bool = False) -> Attrs:
    """Every attribute of a finished request; content only when ``capture_content``."""
    a = request_attributes(record)
    a["gen_ai.usage.input_tokens"] = record.input_tokens
    a["gen_ai.usage.output_tokens"] = record.output_tokens
    if record.finish_reason:
        a["gen_ai.response.finish_reasons"] = [record.finish_reason]
    if record.request_id:
        a["gen_ai.response.id"] = record.request_id
    if record.profile:  # every request, images or not (the middleware block repeats it for images)
        a["edgevlm.profile"] = record.profile
    a["gen_ai.response.model"] = span_model_id(record.model.model_id)
    if record.error_type:
        a["error.type"] = record.error_type
    if record.runner_exit:
        a["edgevlm.runner.exit"] = record.runner_exit

    # timings
    a.update({
        "edgevlm.queue_ms": record.queue_ms,
        "edgevlm.encode_ms": record.encode_ms,
        "edgevlm.prefill_ms": record.prefill_ms,
        "edgevlm.ttft_ms": record.ttft_ms,
        "edgevlm.decode_ms": record.decode_ms,
        "edgevlm.e2e_ms": record.e2e_ms,
        "edgevlm.decode_tokens_per_s": record.decode_tokens_per_s,
        "edgevlm.prefill_tokens_per_s": record.prefill_tokens_per_s,
        "edgevlm.time_per_output_token_ms": record.time_per_output_token_ms,
        "edgevlm.cache.reused_tokens": record.cached_tokens,
        "edgevlm.prefilled_tokens": record.prefilled_tokens,
    })
    if record.dropped_tokens:
        a["edgevlm.dropped_tokens"] = record.dropped_tokens
    if record.load_ms:
        a["edgevlm.load_ms"] = record.load_ms
    if record.restored_tokens:
        a["edgevlm.cache.restored_tokens"] = record.restored_tokens
    if record.shared_tokens:
        a["edgevlm.cache.shared_tokens"] = record.shared_tokens
    if record.drafted_tokens:
        a["edgevlm.speculative.drafted_tokens"] = record.drafted_tokens
        a["edgevlm.speculative.accepted_tokens"] = record.accepted_tokens
    _put(a, "edgevlm.slot", record.slot)
    _put(a, "edgevlm.batch_size_mean", record.batch_size_mean)

    # images and the middleware's decisions about them
    if record.images:
        ims = record.images
        a["edgevlm.image.count"] = len(ims)
        a["edgevlm.image.pixels"] = sum(im.encoded_pixels for im in ims)
        a["edgevlm.image.source_pixels"] = sum(im.source_pixels for im in ims)
        a["edgevlm.image.tokens_before"] = sum(im.tokens_before for im in ims)
        a["edgevlm.image.tokens_after"] = sum(im.tokens_after for im in ims)
        a["edgevlm.image.cache_hits"] = sum(1 for im in ims if im.cache_hit)
        a["edgevlm.image.resize.from"] = [f"{im.source_width}x{im.source_height}" for im in ims]
        a["edgevlm.image.resize.to"] = [f"{im.encoded_width}x{im.encoded_height}" for im in ims]
        pruned = [im for im in ims if im.prune_method]
        if pruned:
            a["edgevlm.prune.method"] = pruned[0].prune_method
            keeps = [im.prune_keep for im in pruned if im.prune_keep is not None]
            if keeps:
                a["edgevlm.prune.keep"] = sum(keeps) / len(keeps)
            a["edgevlm.prune.ms"] = sum(im.prune_ms for im in pruned)
        if any(im.clip_ms or im.zoom_tiles is not None or im.clip_label for im in ims):
            a["edgevlm.clip.ms"] = sum(im.clip_ms for im in ims)
        zoomed = [im for im in ims if im.zoom_tiles is not None]
        if zoomed:
            a["edgevlm.zoom.tiles"] = [len(im.zoom_tiles or ()) for im in zoomed]
            a["edgevlm.zoom.grid"] = [im.zoom_grid or "" for im in zoomed]
            a["edgevlm.zoom.mode"] = [im.zoom_mode or "" for im in zoomed]
            a["edgevlm.zoom.parts"] = [im.zoom_parts or 0 for im in zoomed]
        labels = [im.clip_label for im in ims if im.clip_label]
        if labels:
            a["edgevlm.clip.label"] = labels
        budgets = [im.budget_tokens for im in ims if im.budget_tokens is not None]
        if budgets:
            a["edgevlm.image.budget_tokens"] = budgets
        sources = [im.budget_source for im in ims if im.budget_source]
        if sources:
            a["edgevlm.image.budget_source"] = sources[0]

    if record.middleware:
        flatten("edgevlm.middleware", record.middleware, a)
        for key, alias in MIDDLEWARE_ALIASES.items():
            v = _attr_value(record.middleware.get(key))
            if v is not None:
                a[alias] = v

    # the model file that explains speed and memory
    m = record.model
    _put(a, "edgevlm.model.file", m.path or None)
    _put(a, "edgevlm.model.mmproj_file", m.mmproj_path)
    _put(a, "edgevlm.model.quantization", m.quantization)
    _put(a, "edgevlm.model.bits_per_weight", m.bits_per_weight)
    _put(a, "edgevlm.model.n_params", m.n_params)
    _put(a, "edgevlm.model.file_bytes", m.file_bytes)
    a["edgevlm.model.n_ctx"] = m.n_ctx
    a["edgevlm.model.threads"] = m.n_threads
    a["edgevlm.model.n_parallel"] = m.n_parallel
    a["edgevlm.model.kv_layout"] = m.kv_layout
    _put(a, "edgevlm.model.flash_attn", m.flash_attn)

    _put(a, "edgevlm.process.peak_rss_bytes", record.peak_rss_bytes)
    _put(a, "edgevlm.runner.peak_rss_bytes", record.runner_peak_rss_bytes)
    for key, value in record.energy.items():
        v = _attr_value(value)
        if v is not None:
            a[f"edgevlm.energy.{key}"] = v

    if capture_content:
        if record.prompt_text is not None:
            a["gen_ai.input.messages"] = json.dumps(
                [{"role": "user", "parts": [{"type": "text", "content": record.prompt_text}]}]
            )
        if record.completion_text is not None:
            a["gen_ai.output.messages"] = json.dumps([{
                "role": "assistant",
                "parts": [{"type": "text", "content": record.completion_text}],
                "finish_reason": record.finish_reason or "",
            }])
    return a
