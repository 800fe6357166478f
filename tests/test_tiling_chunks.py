"""A tiling projector's image chunks: one request image, several libmtmd chunks.

libmtmd cuts an image larger than one projector tile into an overview plus slices
(LLaVA-1.6 with grid pinpoints here), each its own image chunk, with text chunks
between them on some projectors. Every chunk is encoded and cached on its own, the
image is recorded, budgeted and pruned as one, and the load-time warm-up works.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import llama_cpp
import numpy as np
import openai
import pytest
from PIL import Image

from bench.tinymodels import tiny_vlm
from models import cpu_paths
from models.llama_lib import ensure_backend
from models.registry import model_id_for
from models.vision import ImageChunk, TextChunk, VisionEncoder
from server.policy.budget import CostModel
from tests.conftest import LiveServer, live_server
from tests.test_vision_api import image_message, png_uri

# 64 px tiles of 64 tokens (8 px patches); grids up to 3 x 3 tiles.
TILING = {"grid_pinpoints": [128, 128, 192, 128, 128, 192, 192, 192]}
TILE_TOKENS = 64


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_vlm(tmp_path_factory.mktemp("tiny-tiling-vlm"), "mlp", mmproj=TILING)


@pytest.fixture(scope="module")
def encoder(files: tuple[Path, Path]) -> Iterator[VisionEncoder]:
    ensure_backend()
    llm, mmproj = files
    model = cpu_paths.load_model(str(llm), ())
    assert model
    with VisionEncoder(str(mmproj), model, n_threads=1, warmup=False) as enc:
        assert enc.projector.tiling and enc.projector.tile_tokens == TILE_TOKENS
        yield enc
    llama_cpp.llama_model_free(model)


def _image_chunks(chunks: list[Any]) -> list[ImageChunk]:
    return [c for c in chunks if isinstance(c, ImageChunk)]


def test_every_chunk_of_a_tiled_image_is_mapped_encoded_and_cached_on_its_own(encoder: VisionEncoder) -> None:
    big, small = _image(200, 150, seed=1), _image(48, 40, seed=2)
    m = encoder.media_marker
    chunks = encoder.tokenize(f"a {m} b {m} c {m} d", [big, small, big])
    images = _image_chunks(chunks)
    n_big = encoder.count_tokens(200, 150) // TILE_TOKENS
    assert n_big > 2  # overview + several slices
    # in prompt order: each image's chunks, numbered from 0, then the next image's
    want = [(0, p) for p in range(n_big)] + [(1, 0)] + [(2, p) for p in range(n_big)]
    assert [(c.index, c.part) for c in images] == want
    assert all(c.n_tokens == TILE_TOKENS and (c.width, c.height) in ((200, 150), (48, 40)) for c in images)
    # the text between images stays where it was: "b" after all of image 0's chunks
    first_small = next(i for i, c in enumerate(chunks) if isinstance(c, ImageChunk) and c.index == 1)
    assert isinstance(chunks[first_small - 1], TextChunk)
    # the overview and every slice are different projector outputs, each cached under its own key
    first = images[:n_big]
    assert all(not np.array_equal(first[0].embeddings, c.embeddings) for c in first[1:])
    assert all(not c.cache_hit for c in first)
    # the third image has the first one's pixels: every part comes from the cache, part for part
    third = images[n_big + 1:]
    assert all(c.cache_hit for c in third)
    assert all(np.array_equal(a.embeddings, b.embeddings) for a, b in zip(first, third))


def test_tiling_resize_plans_on_what_libmtmd_makes_of_the_size(encoder: VisionEncoder) -> None:
    from models.reduce import plan_resize_tiling

    count = encoder.count_tokens
    side = encoder.projector.image_size
    full = plan_resize_tiling(896, 672, None, count, side)
    assert (full.width, full.height) == (896, 672) and full.tokens == count(896, 672) > 5 * TILE_TOKENS
    mid = plan_resize_tiling(896, 672, 5 * TILE_TOKENS, count, side)
    assert mid.tokens == count(mid.width, mid.height) <= 5 * TILE_TOKENS
    assert mid.tokens > TILE_TOKENS and abs(mid.width / mid.height - 896 / 672) < 0.05
    one = plan_resize_tiling(896, 672, 100, count, side)
    assert one.tokens == TILE_TOKENS and max(one.width, one.height) == side
    assert "fit" in plan_resize_tiling(60, 50, 100, count, side).note  # one tile already


# --------------------------------------------------------------------------- end to end


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def tiling_server(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[LiveServer, _Warnings]]:
    llm, mmproj = files
    warnings = _Warnings()
    logger = logging.getLogger("edgevlm.app")
    logger.addHandler(warnings)
    try:
        with live_server(tmp_path_factory.mktemp("tiling-server"), model=str(llm), mmproj=str(mmproj),
                         ctx_size=4096) as srv:
            srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
            yield srv, warnings
    finally:
        logger.removeHandler(warnings)


def ask(srv: LiveServer, image_url: str, edgevlm: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None, text: str = "What is in the image?") -> tuple[Any, dict[str, Any]]:
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=srv.model_id, max_tokens=2, temperature=0,  # type: ignore[attr-defined]
        messages=[image_message(image_url, text)], extra_body={"edgevlm": edgevlm} if edgevlm else None,
        extra_headers=headers)
    assert raw.http_response.status_code == 200
    reply = raw.parse()
    assert reply.choices[0].finish_reason in ("stop", "length")
    return reply, raw.http_response.json()["timings"]


def _vision(srv: LiveServer) -> VisionEncoder:
    model = next(m for m in srv.app.state.registry.loaded() if m.spec.id == srv.model_id)  # type: ignore[attr-defined]
    assert model.vision is not None
    return model.vision


def test_warm_up_on_a_tiling_projector_seeds_the_cost_model(tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, warnings = tiling_server
    assert not [m for m in warnings.messages if "warm-up" in m]
    assert srv.model_id in srv.app.state.cost_models  # type: ignore[attr-defined]
    seeded = srv.app.state.cost_models[srv.model_id].snapshot()  # type: ignore[attr-defined]
    assert seeded != CostModel().snapshot() and seeded.encode_ms_per_token > 0


def test_an_image_larger_than_a_tile_is_answered_and_counted_over_its_chunks(
        tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = tiling_server
    cache = _vision(srv).cache
    reply, timings = ask(srv, png_uri(200, 150, seed=3), {"resolution": "resize"})
    im = timings["images"][0]
    n_chunks = _vision(srv).count_tokens(im["encoded_width"], im["encoded_height"]) // TILE_TOKENS
    assert n_chunks > 1 and (im["encoded_width"], im["encoded_height"]) == (200, 150)
    assert im["tokens_before"] == im["tokens_after"] == n_chunks * TILE_TOKENS
    assert im["encode_ms"] > 0 and not im["cache_hit"]
    assert reply.usage.prompt_tokens >= im["tokens_after"]
    # the same request again: every chunk comes from the embedding cache
    hits = cache.stats()["hits"]
    _, again = ask(srv, png_uri(200, 150, seed=3), {"resolution": "resize"})
    im2 = again["images"][0]
    assert cache.stats()["hits"] - hits == n_chunks
    assert im2["cache_hit"] and im2["cached_tokens"] == im2["tokens_before"] == im["tokens_before"]
    assert im2["encode_ms"] == 0


def test_pruning_keeps_exactly_k_rows_over_the_images_chunks(tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = tiling_server
    _, timings = ask(srv, png_uri(200, 150, seed=4), {"prune": {"method": "diverse", "keep": 50}})
    im = timings["images"][0]
    assert im["tokens_before"] > TILE_TOKENS and im["tokens_after"] == 50
    assert im["prune_method"] == "diverse"


def test_an_image_token_budget_is_met_in_the_projectors_real_tokens(
        tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = tiling_server
    _, timings = ask(srv, png_uri(896, 672, seed=5), {"max_image_tokens": 5 * TILE_TOKENS})
    im = timings["images"][0]
    real = _vision(srv).count_tokens(im["encoded_width"], im["encoded_height"])
    assert TILE_TOKENS < im["tokens_before"] == real <= 5 * TILE_TOKENS
    # a TTFT budget plans with those tokens; the final prediction is for what was prefilled
    _, timed = ask(srv, png_uri(896, 672, seed=6), headers={"X-EdgeVLM-TTFT-Budget-Ms": "1"})
    im, mw = timed["images"][0], timed["middleware"]
    assert im["tokens_before"] <= mw["ttft_plan_tokens"][0] and im["tokens_before"] >= TILE_TOKENS
    assert im["tokens_before"] == _vision(srv).count_tokens(im["encoded_width"], im["encoded_height"])


# --------------------------------------------------------------------------- where the overview is


def _gradient(width: int, height: int) -> Image.Image:
    """A smooth image whose every region looks different (no two slices alike)."""
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)],
                                    axis=-1).astype(np.uint8))


def test_the_overview_chunk_sits_where_the_projector_facts_say(encoder: VisionEncoder) -> None:
    """libmtmd puts an mlp projector's overview last (mtmd.cpp ov_img_first); it is the whole image at one tile."""
    img = _gradient(200, 150)
    m = encoder.media_marker
    parts = _image_chunks(encoder.tokenize(m, [img]))
    side = encoder.projector.image_size
    whole = _image_chunks(encoder.tokenize(m, [img.resize((side, side), Image.Resampling.BICUBIC)]))[0]
    dist = [float(np.abs(c.embeddings - whole.embeddings).mean()) for c in parts]
    assert int(np.argmin(dist)) == encoder.projector.overview_part % len(parts) == len(parts) - 1
    assert min(dist) * 20 < sorted(dist)[1]


def test_relevant_pruning_scores_only_the_overview_of_a_tiled_image(encoder: VisionEncoder) -> None:
    """CLIP scored the whole image: that maps onto the overview, never onto a slice's grid."""
    from models.reduce import prune, relevance_for_tokens
    from server.images import _encode_and_prune
    from server.policy.pruning import PruneDecision

    img = _gradient(200, 150)
    scores = np.zeros((3, 4))
    scores[0, 0] = 1.0  # the question points at the top-left corner
    decision = PruneDecision("relevant", 0.25)
    chunks, pruned = _encode_and_prune(encoder, encoder.media_marker, [img], [decision], {0: scores},
                                       encoder.projector.align)
    parts = _image_chunks(chunks)
    keeps = decision.keep_for_parts([c.n_tokens for c in parts])
    assert sum(int(pruned[0, c.part][0].shape[0]) for c in parts) == decision.keep_for(sum(c.n_tokens for c in parts))
    overview = len(parts) - 1
    for chunk, keep in zip(parts, keeps):
        emb, method, _, _ = pruned[0, chunk.part]
        if chunk.part == overview:
            rel = relevance_for_tokens(scores, 8, 8, chunk.n_tokens)
            want = prune(chunk.embeddings, keep, "relevant", rel)
            assert method == "relevant"
        else:
            want = prune(chunk.embeddings, keep, "diverse")
            assert method == "diverse"
        assert np.array_equal(emb, want.embeddings)
    # question-blind slices are what they would be without CLIP; the overview is not
    blind = prune(parts[overview].embeddings, keeps[overview], "diverse")
    assert not np.array_equal(pruned[0, overview][0], blind.embeddings)



# --------------------------------------------------------------------------- profiles on a tiling projector


def test_the_projectors_maximum_is_what_libmtmd_makes_of_a_large_image(encoder: VisionEncoder) -> None:
    # the largest grid pinpoint (3 x 3 tiles) plus the overview, not a made-up 1024
    assert encoder.projector.max_tokens == encoder.count_tokens(4096, 4096) == 10 * TILE_TOKENS


def test_the_fast_profile_encodes_far_fewer_tokens_than_quality(tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, _ = tiling_server
    q = "Read the label."  # a text cue doubles a content-aware budget: fast must still cut the slices
    encoded = {}
    for seed, profile in enumerate(("quality", "balanced", "fast")):
        _, timings = ask(srv, png_uri(768, 768, seed=20 + seed), {"profile": profile}, text=q)
        im = timings["images"][0]
        assert im["tokens_before"] == _vision(srv).count_tokens(im["encoded_width"], im["encoded_height"])
        encoded[profile] = im["tokens_before"]
    assert encoded["quality"] == 10 * TILE_TOKENS  # the full slice grid
    assert encoded["quality"] >= encoded["balanced"] > encoded["fast"]
    assert encoded["quality"] >= 4 * encoded["fast"]
