"""Hand-built request records for tests and demos (no model needed)."""

from __future__ import annotations

from typing import Any

from .record import ImageRecord, ModelInfo, RequestRecord


def sample_record(**overrides: Any) -> RequestRecord:
    """A plausible finished chat request with one pruned image; override any field."""
    model = overrides.pop("model", None) or ModelInfo(
        model_id="smolvlm-256m", path="/models/smolvlm-256m-q4_k_m.gguf", mmproj_path="/models/mmproj.gguf",
        quantization="Q4_K_M", bits_per_weight=4.85, n_params=256_000_000, file_bytes=155_000_000,
        n_ctx=4096, n_threads=2,
    )
    fields: dict[str, Any] = dict(
        operation="chat", model=model, request_id="chatcmpl-123", stream=True, max_tokens=64,
        temperature=0.2, top_p=0.9, seed=7, input_tokens=120, output_tokens=33, cached_tokens=10,
        restored_tokens=40, prefilled_tokens=110, finish_reason="stop", queue_ms=4.0, encode_ms=30.0, prefill_ms=60.0,
        ttft_ms=95.0, decode_ms=320.0, e2e_ms=420.0, slot=0, batch_size_mean=1.0,
        images=[ImageRecord(
            index=0, source_width=1024, source_height=768, encoded_width=512, encoded_height=384,
            tokens_before=64, tokens_after=32, encode_ms=30.0, budget_tokens=64, budget_source="detail",
            prune_method="divprune", prune_keep=0.5, prune_ms=1.5,
        )],
        middleware={"profile": "balanced", "ttft_budget_ms": 250.0, "predicted_ttft_ms": 180.0},
        prompt_text="What is in this picture?", completion_text="A cat on a mat.",
    )
    fields.update(overrides)
    return RequestRecord(**fields)
