"""CLIP-guided vision: a tiny random-weight open_clip model scores tiles; policies use the scores.

The tiny model's scores are deterministic but meaningless, so these tests check
mechanics (shapes, caching, which tiles/rows are chosen for given scores), not quality.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("open_clip", reason="needs the clip extra (make test installs it)")

from bench.tinyclip import TINY_CLIP_NAME, tiny_clip  # noqa: E402
from models.clip import ClipScorer, ClipSpec, tile_boxes, tile_grid  # noqa: E402
from models.reduce import prune, relevance_for_tokens  # noqa: E402
from models.registry import ConfigError  # noqa: E402
from server.policy.resolution import decide_budget  # noqa: E402
from server.policy.routing import CONTENT_LABELS, route_content  # noqa: E402
from server.policy.zoom import decide_zoom  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="module")
def scorer(tiny_clip_files: tuple[Path, Path]) -> ClipScorer:
    config, checkpoint = tiny_clip_files
    return ClipScorer.load(ClipSpec(TINY_CLIP_NAME, str(checkpoint), str(config)))


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_tile_scores_have_the_grid_shape_and_are_cached(scorer: ClipScorer) -> None:
    img = noise(300, 200)
    first = scorer.score_tiles(img, "read the gauge", 3, 2, image_key="img-a")
    assert first.scores.shape == (2, 3) and first.scores.dtype == np.float32
    assert not first.cache_hit and first.ms > 0
    assert np.all(np.abs(first.scores) <= 1.0 + 1e-5)  # cosines of unit vectors
    again = scorer.score_tiles(img, "read the gauge", 3, 2, image_key="img-a")
    assert again.cache_hit and again.ms == 0.0 and np.array_equal(again.scores, first.scores)
    other = scorer.score_tiles(img, "where is the cat", 3, 2, image_key="img-a")
    assert not other.cache_hit and not np.array_equal(other.scores, first.scores)
    # the batched tile scores equal one-by-one embeddings of the same crops
    crops = [img.crop(b) for b in tile_boxes(300, 200, 3, 2)]
    one_by_one = np.array([scorer.image_features([c])[0] for c in crops]) @ scorer.text_features(["read the gauge"])[0]
    assert np.allclose(one_by_one.reshape(2, 3), first.scores, atol=1e-5)


def test_tile_boxes_cover_uneven_sizes_exactly() -> None:
    boxes = tile_boxes(101, 37, 3, 2)
    assert len(boxes) == 6 and boxes[0][:2] == (0, 0) and boxes[-1][2:] == (101, 37)
    assert sum((r - left) * (b - t) for left, t, r, b in boxes) == 101 * 37
    assert tile_grid(4000, 3000, 224, 16) == (4, 3) and tile_grid(10, 10, 224) == (1, 1)


def test_zoom_picks_the_highest_scoring_tiles_stubbed_scores() -> None:
    scores = np.zeros((3, 4))
    scores[2, 3], scores[1, 2], scores[0, 0] = 0.9, 0.8, 0.1
    z = decide_zoom(scores, 400, 300, share=2 / 12)
    assert z.tiles == (6, 11)  # row-major: (1, 2) and (2, 3)
    assert z.box == (200, 100, 400, 300) and z.crops


def test_zoom_picks_the_tiny_models_best_tiles(scorer: ClipScorer) -> None:
    img = noise(896, 672, seed=3)
    cols, rows = tile_grid(896, 672, 224, 16)
    tiles = scorer.score_tiles(img, "the pressure gauge", cols, rows)
    z = decide_zoom(tiles.scores, 896, 672)
    best = set(np.argsort(-tiles.scores.ravel(), kind="stable")[: len(z.tiles)].tolist())
    assert set(z.tiles) == best and len(z.tiles) == 3  # ceil(12 / 4)
    assert set(z.tiles) == set(tiles.order()[:3].tolist())


@pytest.mark.parametrize("nx, ny", [(7, 5), (5, 3), (13, 1), (4, 4)])
def test_token_grid_mapping_for_grids_that_do_not_divide(nx: int, ny: int) -> None:
    scores = np.arange(12, dtype=np.float64).reshape(3, 4)  # region (r, c) scores 4r + c
    rel = relevance_for_tokens(scores, nx, ny, nx * ny).reshape(ny, nx)
    for y in range(ny):
        for x in range(nx):
            r, c = int((y + 0.5) * 3 / ny), int((x + 0.5) * 4 / nx)
            assert rel[y, x] == 4 * r + c
    # each region that covers a token centre shows up; ordering along rows/cols is monotone
    assert np.all(np.diff(rel, axis=1) >= 0) and np.all(np.diff(rel, axis=0) >= 0)
    # Pixtral-style row breaks: one extra token per row but the last, taking its row's best
    with_breaks = relevance_for_tokens(scores, nx, ny, ny * (nx + 1) - 1)
    assert with_breaks.shape == (ny * (nx + 1) - 1,)
    assert np.array_equal(with_breaks[:nx], rel[0]) and (ny == 1 or with_breaks[nx] == rel[0].max())


def test_relevant_keeps_exactly_k_rows_in_order_and_prefers_relevant_ones() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((48, 16)).astype(np.float32)
    relevance = np.zeros(48)
    relevance[30:40] = 1.0  # the question points at rows 30..39
    for k in (1, 7, 12, 47):
        res = prune(x, k, "relevant", relevance)
        assert res.n_after == k and np.all(np.diff(res.indices) > 0)
        assert np.array_equal(res.embeddings, x[res.indices])
    res = prune(x, 10, "relevant", relevance)
    div = prune(x, 10, "diverse")
    assert np.sum((res.indices >= 30) & (res.indices < 40)) > np.sum((div.indices >= 30) & (div.indices < 40))
    with pytest.raises(ValueError, match="relevance"):
        prune(x, 10, "relevant")


def test_routing_uses_clip_labels_and_falls_back_to_statistics_without_clip(scorer: ClipScorer) -> None:
    page = Image.new("RGB", (256, 256), "white")
    kw = dict(model_max_tokens=1024, model_min_tokens=1, image=page, prompt="Describe it.")
    without = decide_budget(**kw, extension=None, detail="auto", server_profile="balanced")
    assert without.stats is not None and without.content == "plain" and "image statistics" in without.reason
    probs, ms, hit = scorer.classify(page, list(CONTENT_LABELS))
    assert probs.shape == (len(CONTENT_LABELS),) and abs(float(probs.sum()) - 1) < 1e-5 and not hit
    assert scorer.classify(page, list(CONTENT_LABELS))[2]  # cached
    label, content, attrs = route_content(probs)
    with_clip = decide_budget(**kw, extension=None, detail="auto", server_profile="balanced",
                              clip_label=(label, content))
    assert with_clip.content == content and with_clip.stats is None
    if content != "neutral":
        assert f"CLIP label {label!r}" in with_clip.reason
    # a document label doubles a balanced budget; a prompt cue still wins over a plain label
    doc = decide_budget(**kw, detail="auto", server_profile="balanced", clip_label=("a document", "text"))
    assert doc.tokens == 1024 and doc.content == "text"
    cue = decide_budget(**{**kw, "prompt": "Read the label."}, detail="auto", server_profile="balanced",
                        clip_label=("a plain empty surface", "plain"))
    assert cue.content == "text"


def test_missing_checkpoint_is_a_config_error_naming_the_path(tmp_path: Path, tiny_clip_files) -> None:
    config, _ = tiny_clip_files
    missing = tmp_path / "nope.pt"
    with pytest.raises(ConfigError, match=str(missing)):
        ClipScorer.load(ClipSpec(TINY_CLIP_NAME, str(missing), str(config)))
    with pytest.raises(ConfigError, match="--clip-checkpoint"):
        ClipScorer.load(ClipSpec("ViT-B-32"))


def test_missing_checkpoint_stops_the_server_with_one_line(tmp_path: Path, tiny_llm: Path) -> None:
    missing = tmp_path / "weights" / "clip.pt"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(tiny_llm),
                           "--clip-model", "ViT-B-32", "--clip-checkpoint", str(missing),
                           "--traces", "none", "--port", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error: ") and str(missing) in lines[0]


def test_clip_score_is_a_bounded_proxy(scorer: ClipScorer) -> None:
    img = noise(64, 64, seed=5)
    s = scorer.clip_score(img, "a gauge reading 40 bar")
    assert 0.0 <= s <= 2.5
