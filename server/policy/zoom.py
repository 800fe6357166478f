"""Prompt-aware zoom: which tiles of a large image the question points at.

CLIP (``models.clip``) scores a grid of tiles against the prompt; this module only
decides with those scores. Plain resizing spends the token budget evenly over the
image; zoom spends it on the bounding box of the best tiles, so a gauge or a label
in one corner of a 12 MP photo is encoded with several times more pixels per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from models.clip import tile_boxes

__all__ = ["ZOOM_MAX_TILES", "ZOOM_TILE_PX", "ZOOM_TILE_SHARE", "ZoomDecision", "decide_zoom"]

# Tiles of about this many source pixels per side (CLIP's usual 224 input), at most
# ZOOM_MAX_TILES per image so one CLIP batch stays small on a CPU.
ZOOM_TILE_PX = 224
ZOOM_MAX_TILES = 16
# Share of the tiles kept (at least one): a quarter of the area gives the kept region
# up to 4x the pixels per token of the whole image at the same budget.
ZOOM_TILE_SHARE = 0.25


@dataclass(frozen=True)
class ZoomDecision:
    """The tiles chosen (row-major indices, ascending) and the source crop box they span."""

    tiles: tuple[int, ...]
    cols: int
    rows: int
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in source pixels
    reason: str

    crops: bool  # False when the box is the whole image (one tile, or the best tiles span it)

    def attributes(self) -> dict[str, Any]:
        return {"zoom_tiles": list(self.tiles), "zoom_grid": f"{self.cols}x{self.rows}",
                "zoom_box": list(self.box), "zoom_reason": self.reason}


def decide_zoom(scores: np.ndarray, width: int, height: int, share: float = ZOOM_TILE_SHARE) -> ZoomDecision:
    """Keep the ``ceil(share * tiles)`` best tiles of ``scores`` (rows, cols) and their bounding box.

    Ties go to the earlier tile (row-major), so equal scores give a stable choice.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty (rows, cols) array, got shape {s.shape}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    rows, cols = s.shape
    flat = s.ravel()
    m = max(1, int(np.ceil(share * flat.size)))
    best = np.lexsort((np.arange(flat.size), -flat))[:m]
    tiles = tuple(sorted(int(i) for i in best))
    boxes = [tile_boxes(width, height, cols, rows)[t] for t in tiles]
    box = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    reason = f"{m} of {flat.size} tiles ({cols}x{rows}) by CLIP relevance to the prompt"
    return ZoomDecision(tiles, cols, rows, box, reason, box != (0, 0, width, height))
