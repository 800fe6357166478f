"""Warm-up at load time: one real request that seeds the TTFT cost model.

Without it the first requests' TTFT predictions come from generic defaults, and the
very first encode after loading (cold caches, first-touch of weights) is several
times slower than later ones, which would skew an online estimate for a while.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from PIL import Image

from models.engine import GenerationRequest, ImageSegment, Segment
from models.registry import LoadedModel
from models.sampling import SamplingParams
from models.vision import ImageChunk
from server.policy.budget import CostModel
from telemetry.record import RequestRecord

log = logging.getLogger("edgevlm.warmup")

WARMUP_IMAGE_PX = 256


def _synthetic_image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:WARMUP_IMAGE_PX, 0:WARMUP_IMAGE_PX]
    base = np.stack([xx, yy, (xx + yy) // 2], axis=-1).astype(np.float32)
    noise = rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def _prefill_ms(model: LoadedModel, segments: list[Segment]) -> tuple[float, int]:
    engine = model.engine
    record = RequestRecord(operation="chat", model=engine.info)
    done = threading.Event()
    engine.submit(GenerationRequest(segments, SamplingParams(temperature=0), 1, record),
                  lambda ev: done.set() if not hasattr(ev, "text") else None, max_queue=1 << 30)
    if not done.wait(120):
        raise TimeoutError("warm-up request did not finish")
    return record.prefill_ms, record.prefilled_tokens


def measure_cost_model(model: LoadedModel) -> CostModel:
    """Encode (twice: the first is cold) and prefill once; rates become the start-up model."""
    engine = model.engine
    if model.vision is None:
        text = engine.template.render([{"role": "user", "content": "Warm-up."}])
        prefill_ms, n = _prefill_ms(model, [engine.tokenize(text)])
        return CostModel.from_warmup(0.0, 0, prefill_ms, n)
    vision = model.vision
    text = engine.template.render([{"role": "user", "content": vision.media_marker + "\nDescribe."}])
    vision.tokenize(text, [_synthetic_image(1)])  # cold run, not measured
    chunks = vision.tokenize(text, [_synthetic_image(2)])
    segments: list[Segment] = []
    encode_ms, image_tokens = 0.0, 0
    for i, chunk in enumerate(chunks):
        if isinstance(chunk, ImageChunk):
            encode_ms += chunk.encode_ms
            image_tokens += chunk.n_tokens
            segments.append(ImageSegment(np.ascontiguousarray(chunk.embeddings), f"warmup:{i}",
                                         chunk.non_causal))
        else:
            segments.append(list(chunk.tokens))
    prefill_ms, n = _prefill_ms(model, segments)
    cm = CostModel.from_warmup(encode_ms, image_tokens, prefill_ms, n)
    log.info("warm-up %s: encode %.2f ms/token, prefill %.3f ms/token", model.spec.id,
             encode_ms / max(1, image_tokens), prefill_ms / max(1, n))
    return cm
