"""models.reduce: resize-to-budget and keep-k-rows mechanisms on hand-built inputs."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from PIL import Image

from models.reduce import (
    ASPECT_TOLERANCE,
    ProjectorGrid,
    keep_count,
    plan_resize,
    positions_mrope,
    prune,
    resize_to_plan,
)

QWEN2VL = ProjectorGrid(patch_size=14, merge=2, min_tokens=4, max_tokens=1280)
LLAVA15 = ProjectorGrid(patch_size=14, merge=1, fixed_tokens=576, image_size=336)


# --------------------------------------------------------------------------- resize


def _brute_force_grids(w: int, h: int, budget: int, align: int) -> list[tuple[float, int]]:
    """(aspect error, tokens) of every grid that fits the budget and the source."""
    out = []
    for c in range(1, max(1, w // align) + 1):
        for r in range(1, max(1, h // align) + 1):
            if c * r <= budget:
                out.append((abs(math.log((c / r) / (w / h))), c * r))
    return out


@pytest.mark.parametrize(
    ("w", "h", "budget"),
    [(4000, 3000, 1000), (1920, 1080, 171), (1000, 333, 100), (333, 1000, 64), (2800, 28, 50), (640, 480, 4)],
)
def test_resize_fits_budget_aligns_never_upscales_and_keeps_aspect(w: int, h: int, budget: int) -> None:
    plan = plan_resize(w, h, budget, QWEN2VL)
    assert plan.tokens <= budget
    assert plan.width % 28 == 0 and plan.height % 28 == 0
    assert plan.width <= w and plan.height <= h
    assert plan.tokens == (plan.width // 28) * (plan.height // 28)
    # Relaxed aspect-ratio matching: within the tolerance of the best grid, and no
    # grid inside that tolerance uses more tokens.
    grids = _brute_force_grids(w, h, budget, 28)
    best_err = min(e for e, _ in grids)
    err = abs(math.log((plan.width / plan.height) / (w / h)))
    assert err <= best_err + ASPECT_TOLERANCE + 1e-9
    assert plan.tokens == max(t for e, t in grids if e <= best_err + ASPECT_TOLERANCE + 1e-9)


def test_resize_uses_most_of_the_budget() -> None:
    plan = plan_resize(4000, 3000, 1000, QWEN2VL)
    assert plan.tokens >= 950  # 4:3 has near-exact grids close to the budget
    assert abs(plan.width / plan.height - 4 / 3) < 0.05
    assert "downscaled" in plan.note


def test_resize_source_under_budget_is_only_aligned_down() -> None:
    plan = plan_resize(300, 200, 1000, QWEN2VL)
    assert (plan.width, plan.height, plan.tokens) == (280, 196, 10 * 7)
    assert "fits budget" in plan.note


def test_resize_tiny_image_gets_one_cell_only() -> None:
    plan = plan_resize(10, 10, 64, QWEN2VL)
    assert (plan.width, plan.height, plan.tokens) == (28, 28, 1)


def test_resize_budget_capped_by_projector_max() -> None:
    plan = plan_resize(8000, 8000, 10_000, QWEN2VL)
    assert plan.tokens <= 1280
    assert "projector max" in plan.note


def test_fixed_projector_keeps_size_and_says_resizing_saves_nothing() -> None:
    plan = plan_resize(640, 480, 100, LLAVA15)
    assert (plan.width, plan.height, plan.tokens) == (640, 480, 576)
    assert "saves nothing" in plan.note and "pruning" in plan.note


def test_resize_to_plan_produces_plan_size() -> None:
    img = Image.new("RGB", (1000, 750), (200, 30, 30))
    plan = plan_resize(*img.size, 100, QWEN2VL)
    out = resize_to_plan(img, plan)
    assert out.size == (plan.width, plan.height)
    assert out.getpixel((5, 5)) == (200, 30, 30)  # antialiasing keeps flat colour
    same = plan_resize(280, 196, 1000, QWEN2VL)
    small = Image.new("RGB", (280, 196))
    assert resize_to_plan(small, same) is small


# --------------------------------------------------------------------------- keep_count


def test_keep_count_ratio_and_count() -> None:
    assert keep_count(100, 0.5) == 50
    assert keep_count(100, 1.0) == 100
    assert keep_count(100, 1) == 1  # an int is a count
    assert keep_count(100, 500) == 100
    assert keep_count(3, 0.01) == 1
    for bad in (0, -1, 0.0, 1.5, float("nan")):
        with pytest.raises(ValueError):
            keep_count(10, bad)
    with pytest.raises(TypeError):
        keep_count(10, True)


# --------------------------------------------------------------------------- prune


def _distinct(n: int, d: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


@pytest.mark.parametrize("method", ["uniform", "merge", "diverse"])
def test_prune_keeps_exactly_k_rows_in_order(method: str) -> None:
    x = _distinct(40)
    t0 = time.perf_counter()
    res = prune(x, 13, method)
    wall_ms = (time.perf_counter() - t0) * 1000.0
    assert res.indices.shape == (13,)
    assert np.all(np.diff(res.indices) > 0)
    assert res.embeddings.shape == (13, 16)
    assert res.embeddings.dtype == np.float32 and res.embeddings.flags.c_contiguous
    assert res.method == method and res.n_before == 40
    assert 0 < res.ms <= wall_ms  # the time the call took, in milliseconds
    if method != "merge":  # merge averages; the others copy rows
        np.testing.assert_array_equal(res.embeddings, x[res.indices])


@pytest.mark.parametrize("method", ["uniform", "merge", "diverse"])
def test_prune_keep_all_is_identity(method: str) -> None:
    x = _distinct(8).astype(np.float64)
    res = prune(x, 1.0, method)
    np.testing.assert_array_equal(res.indices, np.arange(8))
    np.testing.assert_array_equal(res.embeddings, x.astype(np.float32))


def test_uniform_is_evenly_spaced_from_first_row() -> None:
    np.testing.assert_array_equal(prune(_distinct(12), 4, "uniform").indices, [0, 3, 6, 9])
    np.testing.assert_array_equal(prune(_distinct(10), 0.5, "uniform").indices, [0, 2, 4, 6, 8])
    idx = prune(_distinct(10), 3, "uniform").indices
    assert idx[0] == 0 and len(set(np.diff(idx))) <= 2  # gaps differ by at most one


def test_diverse_drops_exact_duplicates_first() -> None:
    base = _distinct(10, seed=1)
    dup_of = [2, 5, 5, 7, 0]
    x = np.vstack([base, base[dup_of]])  # rows 10..14 duplicate earlier rows
    res = prune(x, 10, "diverse")
    kept = x[res.indices]
    # Every distinct vector survives exactly once.
    assert len({r.tobytes() for r in kept}) == 10
    assert {r.tobytes() for r in kept} == {r.tobytes() for r in base}


def test_diverse_prefers_spread_over_a_cluster() -> None:
    # Six near-identical rows along e0 and three orthogonal directions.
    rng = np.random.default_rng(2)
    cluster = np.eye(8, dtype=np.float32)[0] + 0.01 * rng.standard_normal((6, 8)).astype(np.float32)
    x = np.vstack([cluster, np.eye(8, dtype=np.float32)[1:4]])
    res = prune(x, 4, "diverse")
    assert set(res.indices.tolist()) >= {6, 7, 8}  # all three outliers kept
    assert sum(i < 6 for i in res.indices) == 1  # and one representative of the cluster


def test_merge_collapses_adjacent_duplicates_first_and_averages() -> None:
    e = np.eye(6, dtype=np.float32)
    # a a b c c c d e  -> merge runs of duplicates first
    x = np.vstack([e[0], e[0], e[1], e[2], e[2], e[2], e[3], e[4]])
    res = prune(x, 5, "merge")
    np.testing.assert_array_equal(res.indices, [0, 2, 3, 6, 7])  # first token of each run
    np.testing.assert_allclose(res.embeddings, np.vstack([e[0], e[1], e[2], e[3], e[4]]))


def test_merge_average_of_a_merged_run() -> None:
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]], dtype=np.float32)
    res = prune(x, 2, "merge")
    np.testing.assert_array_equal(res.indices, [0, 2])
    np.testing.assert_allclose(res.embeddings[0], [0.95, 0.05], rtol=1e-6)


def test_prune_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        prune(np.zeros(5), 2, "uniform")
    with pytest.raises(ValueError):
        prune(_distinct(5), 2, "random")  # type: ignore[arg-type]


def test_prune_cost_is_reported_for_a_realistic_size() -> None:
    x = _distinct(1024, d=256, seed=3)
    costs = {m: prune(x, 0.5, m).ms for m in ("uniform", "merge", "diverse")}
    assert all(c >= 0 for c in costs.values())
    print("prune ms for 1024x256 -> 512:", {k: round(v, 2) for k, v in costs.items()})


# --------------------------------------------------------------------------- positions


def test_positions_mrope_keep_original_positions_in_both_layouts() -> None:
    n = 6  # a 2x3 image grid starting at text position 10
    rows, cols = np.divmod(np.arange(n), 3)
    pos_4n = np.stack([np.full(n, 10), 10 + rows, 10 + cols, np.zeros(n, int)])
    kept = np.array([0, 4, 5])
    out = positions_mrope(pos_4n, kept)
    assert out.shape == (4, 3) and out.dtype == np.int32
    np.testing.assert_array_equal(out[1], [10, 11, 11])  # heights of tokens 0, 4, 5
    np.testing.assert_array_equal(out[2], [10, 11, 12])  # widths
    out_n4 = positions_mrope(pos_4n.T, kept)
    np.testing.assert_array_equal(out_n4, out.T)
    with pytest.raises(ValueError):
        positions_mrope(np.zeros((3, 6)), kept)


def test_resize_never_pushes_an_accepted_aspect_ratio_over_the_limit() -> None:
    grid = ProjectorGrid(patch_size=16, max_tokens=1024, max_aspect=200.0)
    plan = plan_resize(4000, 20, None, grid)  # aligned down, 20 px -> 16 px would be 250:1
    assert plan.width <= 200 * plan.height and (plan.width, plan.height) == (3200, 16)
    tall = plan_resize(20, 4000, 150, grid)  # through the budget path as well
    assert tall.height <= 200 * tall.width and tall.tokens <= 150
    assert plan_resize(640, 480, None, grid) == plan_resize(640, 480, None, ProjectorGrid(16, max_tokens=1024))
