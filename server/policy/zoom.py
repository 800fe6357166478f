"""Prompt-aware zoom: which tiles of a large image the question points at, and what to send.

CLIP (``models.clip``) scores a grid of tiles against the prompt; this module only
decides with those scores. Plain resizing spends the token budget evenly over the
image; zoom spends it where the question points, so a gauge or a label in one corner
of a 12 MP photo is encoded with several times more pixels per token. How depends on
the projector (``zoom_parts``):

* ``tiles`` (tiling projectors: libmtmd already encodes an image as an overview plus
  fixed-size tiles): the one image becomes several image parts, a low-resolution
  overview of the whole image first, then the most relevant tiles in reading order,
  as many as the token budget pays for at the projector's tokens per part;
* ``crop`` (every other projector): the image is cropped to the bounding box of the
  relevant tiles and that crop is resized to the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from models.clip import tile_boxes

__all__ = ["ZOOM_MAX_TILES", "ZOOM_TILE_PX", "ZOOM_TILE_SHARE", "ZoomDecision", "ZoomMode", "ZoomParts",
           "decide_zoom", "zoom_parts"]

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
    ranked: tuple[int, ...] = ()  # the same tiles, best first
    width: int = 0  # source size the boxes are in
    height: int = 0

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
    return ZoomDecision(tiles, cols, rows, box, reason, box != (0, 0, width, height),
                        tuple(int(i) for i in best), width, height)


ZoomMode = Literal["tiles", "crop"]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class ZoomParts:
    """What the encoder gets for one zoomed image: source boxes in prompt order."""

    mode: ZoomMode
    boxes: tuple[Box, ...]  # tiles: the whole image (overview) then each tile sent; crop: one box
    tiles: tuple[int, ...]  # tiles sent (tiles) or spanned by the crop box (crop), row-major
    reason: str

    def attributes(self) -> dict[str, Any]:
        return {"zoom_mode": self.mode, "zoom_parts": len(self.boxes), "zoom_sent": list(self.tiles),
                "zoom_parts_reason": self.reason}


def zoom_parts(zoom: ZoomDecision, *, tiling: bool, budget_tokens: int, part_tokens: int | None,
               part_px: int | None = None) -> ZoomParts:
    """The parts to encode for ``zoom`` on a tiling (``tiles``) or other (``crop``) projector.

    A tiling projector spends ``part_tokens`` on every part it is sent (libmtmd resizes
    each part to one tile), so ``budget_tokens // part_tokens`` parts fit: the overview
    and up to that many minus one of the chosen tiles, the best ones, sent in reading
    order so the model sees them laid out as in the image. The overview is always sent
    (it is what keeps the rest of the scene in view), even when the budget is below
    one part. An image that fits one projector tile (``part_px`` per side) is seen at
    full resolution in the overview already, so it gets no tiles. Any other projector
    gets the crop to the chosen tiles' bounding box.
    """
    if not tiling:
        return ZoomParts("crop", (zoom.box,), zoom.tiles,
                         "crop to the bounding box of the relevant tiles" if zoom.crops
                         else "the relevant tiles span the whole image: no crop")
    if part_tokens is None or part_tokens < 1:
        raise ValueError("a tiling projector needs its tokens per part")
    if budget_tokens < 1:
        raise ValueError(f"budget_tokens must be >= 1, got {budget_tokens}")
    n = max(0, min(len(zoom.ranked), budget_tokens // part_tokens - 1))
    reason = (f"overview + {n} of {len(zoom.ranked)} relevant tiles: {budget_tokens} tokens "
              f"at {part_tokens} per part")
    if part_px is not None and max(zoom.width, zoom.height) <= part_px:
        n, reason = 0, f"overview only: the image fits one {part_px} px projector tile"
    sent = tuple(sorted(zoom.ranked[:n]))
    boxes = tile_boxes(zoom.width, zoom.height, zoom.cols, zoom.rows)
    return ZoomParts("tiles", ((0, 0, zoom.width, zoom.height), *(boxes[t] for t in sent)), sent, reason)
