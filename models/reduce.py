"""Mechanisms that trade image detail for speed: resize to a token budget, keep k embedding rows.

The server's policy decides *how many* image tokens a request may spend; this module
only carries the decision out, so it stays free of request types and never imports
``server``. Two levers exist:

* **Resolution** (``plan_resize`` / ``resize_to_plan``): for dynamic-resolution
  projectors (Qwen2-VL, SmolVLM, MiniCPM-V slices) fewer pixels means fewer tokens and
  less encoder *and* prefill time. Plain downsampling is a strong baseline (VTC-Bench).
* **Pruning** (``prune``): drop or merge rows of the projector output before prefill.
  The only lever for fixed-token projectors (LLaVA-1.5: 576, Gemma 3: 256); saves
  prefill time, not encoder time.

``positions_mrope`` gives M-RoPE models the original positions of the kept rows (1-D
RoPE models number kept rows consecutively; the engine does that as it prefills).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
from PIL import Image

__all__ = [
    "ASPECT_TOLERANCE",
    "PRUNE_METHODS",
    "PruneMethod",
    "ProjectorGrid",
    "PruneResult",
    "ResizePlan",
    "keep_count",
    "plan_resize",
    "plan_resize_tiling",
    "positions_mrope",
    "prune",
    "relevance_for_tokens",
    "resize_to_plan",
]

PruneMethod = Literal["uniform", "merge", "diverse", "relevant"]
PRUNE_METHODS: tuple[str, ...] = ("uniform", "merge", "diverse", "relevant")
# ``relevant``: a row's relevance (rescaled to [floor, 1]) multiplies its diversity
# gain, so an irrelevant row is only picked when it is far more novel than any
# relevant one (conditional diversity, as in CDPruner).
RELEVANCE_FLOOR = 0.1

# Relaxed aspect-ratio matching (BlueLM-V-3B): a grid is "as good as the best" when its
# aspect error |log(grid_ratio / image_ratio)| is within this much of the best one.
# 0.1 in log space is ~10% stretch along one axis — below what ViT features notice
# (Qwen2-VL's own smart_resize rounds each side independently by up to a patch), and
# it lets the planner use e.g. 960 of 1000 tokens instead of 750 for a perfect ratio.
ASPECT_TOLERANCE = 0.1

# Above this many rows, ``diverse`` streams one similarity row per step instead of
# building the n x n Gram matrix (4096^2 float32 = 64 MiB).
_GRAM_MAX_ROWS = 4096


# --------------------------------------------------------------------------- resize


@dataclass(frozen=True)
class ProjectorGrid:
    """How a vision projector turns pixels into LLM tokens.

    Dynamic projectors emit ``(h / align) * (w / align)`` tokens with
    ``align = patch_size * merge`` (Qwen2-VL: 14 * 2 = 28 px per token). Fixed
    projectors (``fixed_tokens`` set) always emit the same count at ``image_size``.
    """

    patch_size: int
    merge: int = 1
    min_tokens: int | None = None
    max_tokens: int | None = None
    fixed_tokens: int | None = None
    image_size: int | None = None
    # Longest side over shortest the encoder accepts; a resize never goes beyond it.
    max_aspect: float | None = None

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.merge < 1:
            raise ValueError("patch_size and merge must be >= 1")
        if self.fixed_tokens is not None and self.fixed_tokens < 1:
            raise ValueError("fixed_tokens must be >= 1")

    @property
    def align(self) -> int:
        """Pixels per output token along one side."""
        return self.patch_size * self.merge

    @property
    def is_fixed(self) -> bool:
        return self.fixed_tokens is not None

    def tokens_for(self, width: int, height: int) -> int:
        """Tokens the projector emits for an image of this (already aligned) size."""
        if self.fixed_tokens is not None:
            return self.fixed_tokens
        return max(1, width // self.align) * max(1, height // self.align)


@dataclass(frozen=True)
class ResizePlan:
    """Size to encode an image at, the tokens that costs, and why."""

    width: int
    height: int
    tokens: int
    note: str


def plan_resize(width: int, height: int, budget_tokens: int | None, grid: ProjectorGrid) -> ResizePlan:
    """Pick the grid-aligned size that spends at most ``budget_tokens`` and keeps aspect.

    Never upscales (except to one grid cell for images smaller than ``align``). If the
    source already fits, it is only aligned *down* to the grid. Otherwise every
    ``cols x rows`` grid with ``cols * rows <= budget`` (and no larger than the source)
    is scored by aspect error; among grids within ``ASPECT_TOLERANCE`` of the best
    error the one using the most tokens wins (ties: smaller error). ``budget_tokens``
    of ``None`` means the projector's maximum.
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if grid.fixed_tokens is not None:
        return ResizePlan(
            width,
            height,
            grid.fixed_tokens,
            f"fixed projector ({grid.fixed_tokens} tokens at "
            f"{grid.image_size or '?'}px): resizing saves nothing, pruning is the lever",
        )

    notes: list[str] = []
    budget = budget_tokens if budget_tokens is not None else grid.max_tokens
    if budget is None:
        budget = 2**31 - 1
    if budget < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget}")
    if grid.max_tokens is not None and budget > grid.max_tokens:
        budget = grid.max_tokens
        notes.append(f"budget capped at projector max {grid.max_tokens}")
    if grid.min_tokens is not None and budget < grid.min_tokens:
        budget = grid.min_tokens
        notes.append(f"budget raised to projector min {grid.min_tokens}")

    a = grid.align
    max_cols, max_rows = max(1, width // a), max(1, height // a)
    if max_cols * max_rows <= budget:
        cols, rows = max_cols, max_rows
        if width < a or height < a:
            notes.append(f"source smaller than one {a}px cell: padded up to the grid")
        notes.insert(0, "source fits budget; aligned down to grid")
    else:
        cols, rows = _best_grid(width / height, max_cols, max_rows, budget)
        notes.insert(0, f"downscaled to {cols}x{rows} grid for budget {budget}")
    if grid.max_aspect is not None and max(cols, rows) > grid.max_aspect * min(cols, rows):
        # Aligning the short side down (4000x20 -> 250x1 cells) must not make a strip the
        # encoder accepts into one it refuses: trim the long side back to the limit.
        limit = max(1, int(grid.max_aspect * min(cols, rows)))
        cols, rows = (limit, rows) if cols > rows else (cols, limit)
        notes.append(f"long side trimmed to keep the aspect ratio within {grid.max_aspect:g}:1")
    if grid.min_tokens is not None and cols * rows < grid.min_tokens:
        notes.append(f"below projector min {grid.min_tokens}: source too small, not upscaled")
    return ResizePlan(cols * a, rows * a, cols * rows, "; ".join(notes))


# Each step of the tiling planner's size ladder shrinks the long side by this factor.
TILING_STEP = 0.9


def plan_resize_tiling(width: int, height: int, budget_tokens: int | None,
                       count_tokens: Callable[[int, int], int], tile_px: int) -> ResizePlan:
    """The largest aspect-keeping size whose token count fits ``budget_tokens`` on a tiling projector.

    A tiling projector (LLaVA-1.6, MiniCPM-V, ...) cuts an image into an overview plus
    slices chosen from the image's size, so its token count is a step function of the
    size that no grid formula states; ``count_tokens`` asks the encoder (libmtmd, on a
    placeholder: no pixels are processed). Sizes are tried from the source down a
    ladder of ``TILING_STEP`` to one tile (``tile_px`` on the long side, one chunk),
    never upscaling; if even one tile is over budget, that is the plan (its note says so).
    """
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if budget_tokens is not None and budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    tokens = count_tokens(width, height)
    if budget_tokens is None or tokens <= budget_tokens:
        return ResizePlan(width, height, tokens, f"tiling projector: {tokens} tokens at the source size fit the budget")
    long_side = max(width, height)
    side = long_side
    while side > tile_px:
        side = max(tile_px, int(side * TILING_STEP))
        scale = side / long_side
        w, h = max(1, round(width * scale)), max(1, round(height * scale))
        tokens = count_tokens(w, h)
        if tokens <= budget_tokens:
            return ResizePlan(w, h, tokens, f"tiling projector: downscaled to {w}x{h} ({tokens} tokens) "
                                            f"for budget {budget_tokens}")
    w, h = (width, height) if long_side <= tile_px else (w, h)
    return ResizePlan(w, h, tokens, f"tiling projector: one {tile_px}px tile costs {tokens} tokens, "
                                    f"over budget {budget_tokens}; not lowered further")


def _best_grid(aspect: float, max_cols: int, max_rows: int, budget: int) -> tuple[int, int]:
    """Relaxed aspect-ratio matching over all grids that fit the budget and the source."""
    cols = np.arange(1, min(max_cols, budget) + 1, dtype=np.int64)
    # Per column count, every row count up to the budget/source limit is a candidate.
    row_cap = np.minimum(budget // cols, max_rows)
    cols = cols[row_cap >= 1]
    row_cap = row_cap[row_cap >= 1]
    c = np.repeat(cols, row_cap)
    starts = np.cumsum(row_cap) - row_cap
    r = np.arange(c.size, dtype=np.int64) - np.repeat(starts, row_cap) + 1
    err = np.abs(np.log((c / r) / aspect))
    tokens = c * r
    ok = err <= err.min() + ASPECT_TOLERANCE
    # lexsort: last key is primary -> most tokens, then smallest error.
    order = np.lexsort((err[ok], -tokens[ok]))
    best = order[0]
    return int(c[ok][best]), int(r[ok][best])


def resize_to_plan(img: Image.Image, plan: ResizePlan) -> Image.Image:
    """Resize ``img`` to the plan's size with an antialiased (Lanczos) filter."""
    size = (plan.width, plan.height)
    if img.size == size:
        return img
    # reducing_gap first shrinks by an integer factor (box filter) then finishes with
    # Lanczos: same quality as pure Lanczos on big downscales, several times faster.
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


# --------------------------------------------------------------------------- pruning


@dataclass(frozen=True, eq=False)
class PruneResult:
    """Rows kept from a projector output, in original order, and what it cost."""

    indices: np.ndarray  # (keep,) int64, ascending: representative token of each kept row
    embeddings: np.ndarray  # (keep, d) float32, C-contiguous
    method: str
    ms: float
    n_before: int

    @property
    def n_after(self) -> int:
        return int(self.indices.shape[0])

    @property
    def keep_fraction(self) -> float:
        return self.n_after / self.n_before if self.n_before else 1.0


def keep_count(n: int, keep: float | int) -> int:
    """Rows to keep out of ``n``: a float in (0, 1] is a ratio, an int >= 1 a count.

    ``1.0`` keeps everything, ``1`` keeps one row. Always at least 1 (when ``n > 0``)
    and never more than ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if isinstance(keep, bool):
        raise TypeError("keep must be a ratio (float) or a count (int), not bool")
    if isinstance(keep, (int, np.integer)):
        if keep < 1:
            raise ValueError(f"keep count must be >= 1, got {keep}")
        return min(int(keep), n)
    keep = float(keep)
    if not (0.0 < keep <= 1.0):
        raise ValueError(f"keep ratio must be in (0, 1], got {keep}")
    if n == 0:
        return 0
    return min(n, max(1, int(round(n * keep))))


def prune(embeddings: np.ndarray, keep: float | int, method: PruneMethod = "diverse",
          relevance: np.ndarray | None = None) -> PruneResult:
    """Reduce ``embeddings`` (n, d) to ``keep_count(n, keep)`` rows.

    ``uniform`` keeps every j-th row (the spatial-downsampling baseline), ``diverse``
    keeps a max-min cosine-diverse subset (DivPrune), ``merge`` averages the most
    similar neighbouring tokens (ToMe-style, sequence order), ``relevant`` is
    ``diverse`` weighted by ``relevance`` (n,) (how well each row's image region
    matches the prompt, e.g. from ``relevance_for_tokens``). Rows keep their
    original order so position ids stay monotone.
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown prune method {method!r}; expected one of {PRUNE_METHODS}")
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (n, d), got shape {x.shape}")
    n = x.shape[0]
    if method == "relevant" and (relevance is None or np.asarray(relevance).shape != (n,)):
        raise ValueError(f"method 'relevant' needs one relevance value per row ({n})")
    k = keep_count(n, keep)
    t0 = time.perf_counter()
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if k == n:
        idx, out = np.arange(n, dtype=np.int64), x32
    elif method == "uniform":
        idx = _uniform_indices(n, k)
        out = x32[idx]
    elif method == "diverse":
        idx = _diverse_indices(x32, k)
        out = x32[idx]
    elif method == "relevant":
        idx = _diverse_indices(x32, k, _relevance_weights(np.asarray(relevance, dtype=np.float64)))
        out = x32[idx]
    else:
        idx, out = _merge_adjacent(x32, k)
    ms = (time.perf_counter() - t0) * 1000.0
    return PruneResult(idx, np.ascontiguousarray(out, dtype=np.float32), method, ms, n)


def _uniform_indices(n: int, k: int) -> np.ndarray:
    """``k`` evenly spaced indices starting at 0 (floor(i * n / k))."""
    return (np.arange(k, dtype=np.int64) * n) // k


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _relevance_weights(r: np.ndarray) -> np.ndarray:
    """Relevance rescaled to [RELEVANCE_FLOOR, 1]; all equal (or not finite) -> all 1."""
    r = np.where(np.isfinite(r), r, np.nan)
    lo, hi = np.nanmin(r) if np.isfinite(r).any() else 0.0, np.nanmax(r) if np.isfinite(r).any() else 0.0
    if not hi > lo:
        return np.ones(r.shape[0])
    return RELEVANCE_FLOOR + (1.0 - RELEVANCE_FLOOR) * np.nan_to_num((r - lo) / (hi - lo), nan=0.0)


def _diverse_indices(x: np.ndarray, k: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Greedy max-min cosine distance selection, O(n*k) after one similarity pass.

    Starts from the row least similar to the mean direction (the most atypical
    token), then repeatedly adds the row whose nearest selected row is farthest. An
    exact duplicate of a selected row has distance 0, so duplicates go first.
    With ``weights`` (conditional diversity) the first row is the most relevant one
    and each step maximises ``weight * distance``.
    """
    n = x.shape[0]
    u = _unit_rows(x)
    mean = u.mean(axis=0)
    mnorm = float(np.linalg.norm(mean))
    if weights is not None:
        first = int(np.argmax(weights))  # ties -> lowest index
    elif mnorm > 0:
        first = int(np.argmin(u @ (mean / mnorm)))
    else:
        first = int(np.argmax(np.linalg.norm(x, axis=1)))
    gram = u @ u.T if n <= _GRAM_MAX_ROWS else None

    def dist_to(i: int) -> np.ndarray:
        sim = gram[i] if gram is not None else u @ u[i]
        return np.maximum(1.0 - sim, 0.0)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = first
    min_dist = dist_to(first)
    min_dist[first] = -np.inf
    for j in range(1, k):
        # ties -> lowest index, deterministic; chosen rows hold -inf either way
        i = int(np.argmax(min_dist if weights is None else min_dist * weights))
        chosen[j] = i
        np.minimum(min_dist, dist_to(i), out=min_dist)
        min_dist[i] = -np.inf
    return np.sort(chosen)


def _merge_adjacent(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge the most cosine-similar adjacent pair of runs until ``k`` runs remain.

    Runs are kept as a linked list over the original rows (sum vector + count), so
    each merge is O(n) for the argmax plus O(d) for the two updated neighbour
    similarities. A run is represented by its first token and its mean embedding.
    """
    n = x.shape[0]
    sums = x.copy()  # float32: enough for means of a few thousand rows, half the memory
    counts = np.ones(n, dtype=np.int64)
    nxt = np.arange(1, n + 1, dtype=np.int64)  # n == end of list
    prv = np.arange(-1, n - 1, dtype=np.int64)
    u = _unit_rows(sums)
    # sim[i]: cosine between run starting at i and the run after it (-inf if none/dead).
    sim = np.full(n, -np.inf)
    sim[:-1] = np.einsum("ij,ij->i", u[:-1], u[1:])

    def pair_sim(i: int) -> float:
        j = nxt[i]
        if j >= n:
            return -np.inf
        a, b = sums[i], sums[j]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0

    for _ in range(n - k):
        i = int(np.argmax(sim))  # ties -> earliest pair
        j = int(nxt[i])
        sums[i] += sums[j]
        counts[i] += counts[j]
        nxt[i] = nxt[j]
        if nxt[j] < n:
            prv[nxt[j]] = i
        sim[j] = -np.inf
        counts[j] = 0
        sim[i] = pair_sim(i)
        if prv[i] >= 0:
            sim[prv[i]] = pair_sim(int(prv[i]))
    idx = np.flatnonzero(counts)
    return idx.astype(np.int64), (sums[idx] / counts[idx, None]).astype(np.float32)


def relevance_for_tokens(scores: np.ndarray, nx: int, ny: int, n_tokens: int) -> np.ndarray:
    """Per-token relevance ``(n_tokens,)`` from region scores ``(rows, cols)`` of the image.

    The projector lays its tokens out row-major on an ``nx x ny`` grid (libmtmd's
    counts); token (y, x) takes the score of the region holding its centre, so grids
    that do not divide evenly by the region grid map without gaps. Projectors that add
    one separator per row (Pixtral's row breaks: ``ny * (nx + 1)`` or one fewer
    tokens) give the separator its row's best score, so a kept row keeps its break.
    Any other count is mapped by its share of the sequence onto the row-major grid.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 2-D (rows, cols) array, got shape {s.shape}")
    if nx < 1 or ny < 1 or n_tokens < 1:
        raise ValueError(f"token grid and count must be >= 1, got {nx}x{ny}, {n_tokens}")
    rows, cols = s.shape
    ry = np.minimum(((np.arange(ny) + 0.5) * rows / ny).astype(np.int64), rows - 1)
    rx = np.minimum(((np.arange(nx) + 0.5) * cols / nx).astype(np.int64), cols - 1)
    grid = s[ry][:, rx]  # (ny, nx)
    if n_tokens == nx * ny:
        return grid.ravel()
    if n_tokens in (ny * (nx + 1), ny * (nx + 1) - 1):
        with_break = np.concatenate([grid, grid.max(axis=1, keepdims=True)], axis=1)
        return with_break.ravel()[:n_tokens]
    flat = grid.ravel()
    return flat[np.minimum((np.arange(n_tokens) * flat.size) // n_tokens, flat.size - 1)]


# --------------------------------------------------------------------------- positions


def positions_mrope(original_pos: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Original M-RoPE positions (temporal, height, width, extra) of the kept tokens.

    Qwen2-VL encodes where a token sat in the image in its 4 position components;
    pruning must keep them, not renumber. Accepts llama.cpp's ``(4, n)`` layout (also
    assumed when n == 4) or ``(n, 4)`` and returns the same layout, int32.
    """
    pos = np.asarray(original_pos)
    idx = np.asarray(indices, dtype=np.int64)
    if pos.ndim != 2 or 4 not in pos.shape:
        raise ValueError(f"M-RoPE positions must be (4, n) or (n, 4), got {pos.shape}")
    if pos.shape[0] == 4:
        out = pos[:, idx]
    else:
        out = pos[idx, :]
    return np.ascontiguousarray(out, dtype=np.int32)

