"""CLIP (open_clip) as a look-ahead for the middleware: how well image regions match the prompt.

A small CLIP model looks at the image *and the question* before the VLM does, so the
policy can spend image tokens where the question points. This module is the
mechanism only: it embeds image tiles and texts and returns cosine scores; the
server's policy decides what to do with them (``server.policy.zoom`` and friends).

* ``ClipScorer.load`` builds the model from local files only: an open_clip model
  name (or a custom model-config JSON) plus a checkpoint path. Nothing is downloaded;
  a missing checkpoint is a ``ConfigError`` naming the path.
* Tiles are scored in one batch on the CPU (``torch.inference_mode``); results are
  cached per (image hash, prompt, grid), since a chat repeats the same image.
* Preprocessing is done here with PIL/numpy (resize to the model's square input,
  normalise with its mean/std), not with torchvision transforms.

torch and open_clip come with the ``clip`` extra (``pip install edgevlm[clip]``);
importing this module does not import them, ``load`` does.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from models.registry import ConfigError

__all__ = [
    "CLIP_SCORE_WEIGHT",
    "ClipScorer",
    "ClipSpec",
    "TileScores",
    "tile_boxes",
    "tile_grid",
]

# CLIPScore (Hessel et al., 2021): w * max(cos(image, text), 0) with w = 2.5, which
# stretches the cosines real CLIP models give (about 0.15-0.4) over roughly [0, 1].
CLIP_SCORE_WEIGHT = 2.5
# Results kept per scorer: (image hash, prompt, grid) -> scores. A few KiB each.
CACHE_ENTRIES = 512


@dataclass(frozen=True)
class ClipSpec:
    """Where the CLIP model comes from: all local files, never a hub."""

    model: str  # an open_clip model name (e.g. "ViT-B-32") or the name a config file defines
    checkpoint: str | None = None  # a local .pt/.bin/.safetensors file with the weights
    config: str | None = None  # an open_clip model-config JSON (custom or tiny models)
    device: str = "cpu"
    threads: int | None = None  # torch intra-op threads (None: torch's default)


@dataclass(frozen=True)
class TileScores:
    """Cosine similarity of each tile to the prompt, ``(rows, cols)``, and what it cost."""

    scores: np.ndarray  # (rows, cols) float32, row-major like the image
    cols: int
    rows: int
    ms: float  # 0.0 when served from the cache
    cache_hit: bool

    def order(self) -> np.ndarray:
        """Flat tile indices (row-major), best first; ties go to the earlier tile."""
        flat = self.scores.ravel()
        return np.lexsort((np.arange(flat.size), -flat))


def tile_grid(width: int, height: int, tile_px: int, max_tiles: int = 64) -> tuple[int, int]:
    """``(cols, rows)`` of near-square tiles of about ``tile_px`` covering the image.

    At least 1 x 1; at most ``max_tiles`` tiles (the tile size grows instead), so a
    huge image does not cost a huge CLIP batch.
    """
    if width < 1 or height < 1 or tile_px < 1:
        raise ValueError("width, height and tile_px must be >= 1")
    size = float(tile_px)
    while True:
        cols, rows = max(1, round(width / size)), max(1, round(height / size))
        if cols * rows <= max_tiles:
            return int(cols), int(rows)
        size *= 1.25


def tile_boxes(width: int, height: int, cols: int, rows: int) -> list[tuple[int, int, int, int]]:
    """PIL crop boxes ``(left, top, right, bottom)`` of a ``cols x rows`` grid, row-major.

    Edges are rounded so the tiles cover every pixel exactly once, also when the size
    does not divide evenly.
    """
    xs = [round(i * width / cols) for i in range(cols + 1)]
    ys = [round(j * height / rows) for j in range(rows + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(rows) for i in range(cols)]


class ClipScorer:
    """An open_clip model on the CPU, scoring images and image tiles against texts."""

    def __init__(self, model: Any, tokenizer: Any, name: str, *, image_size: int,
                 mean: Sequence[float], std: Sequence[float], n_params: int, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.image_size = int(image_size)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.n_params = int(n_params)
        self.device = device
        self._lock = threading.Lock()  # one forward at a time; torch has its own threads
        self._cache: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()
        self._texts: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_hits = 0
        self.cache_misses = 0

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, spec: ClipSpec) -> "ClipScorer":
        """Build the model from local files; ``ConfigError`` for anything missing.

        With ``spec.config`` the JSON file is registered with open_clip under
        ``spec.model`` (its file stem when the JSON holds one model), so tiny test
        models and custom architectures need no change to open_clip. Without a
        checkpoint the weights stay random: only allowed with a config file (tests).
        """
        if spec.checkpoint is not None and not Path(spec.checkpoint).is_file():
            raise ConfigError(f"--clip-checkpoint: CLIP checkpoint not found: {spec.checkpoint}")
        if spec.config is not None and not Path(spec.config).is_file():
            raise ConfigError(f"--clip-config: CLIP model config not found: {spec.config}")
        if spec.checkpoint is None and spec.config is None:
            raise ConfigError(f"--clip-model {spec.model}: needs --clip-checkpoint (a local weights file; "
                              "nothing is downloaded at run time)")
        try:
            import open_clip
            import torch
        except ImportError as exc:
            raise ConfigError(f"--clip-model needs the clip extra (pip install 'edgevlm[clip]'): {exc}") from exc
        if spec.threads:
            torch.set_num_threads(int(spec.threads))
        name = spec.model
        if spec.config is not None:
            name = register_model_config(spec.config, spec.model)
        if name not in open_clip.list_models():
            raise ConfigError(f"--clip-model {name!r}: not an open_clip model name "
                              "(see open_clip.list_models(), or pass --clip-config FILE)")
        try:
            model = open_clip.create_model(name, pretrained=spec.checkpoint, device=spec.device,
                                           load_weights=spec.checkpoint is not None)
            tokenizer = open_clip.get_tokenizer(name)
        except (RuntimeError, KeyError, ValueError, OSError) as exc:
            raise ConfigError(f"--clip-checkpoint {spec.checkpoint}: cannot load CLIP model {name!r}: "
                              f"{str(exc).splitlines()[0]}") from exc
        model.eval()
        visual = model.visual
        size = visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        n_params = sum(p.numel() for p in model.parameters())
        return cls(model, tokenizer, name, image_size=size, mean=mean, std=std, n_params=n_params,
                   device=spec.device)

    # ------------------------------------------------------------------ embedding

    def _pixels(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``(n, 3, s, s)`` float32: each image squashed to the model's square input."""
        s = self.image_size
        out = np.empty((len(images), 3, s, s), dtype=np.float32)
        for i, im in enumerate(images):
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            a = np.asarray(rgb.resize((s, s), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0
            out[i] = (a.transpose(2, 0, 1) - self.mean) / self.std
        return out

    def image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Unit-norm image embeddings ``(n, d)``, one batched forward."""
        import torch

        x = torch.from_numpy(self._pixels(images)).to(self.device)
        with self._lock, torch.inference_mode():
            f = self.model.encode_image(x, normalize=True)
        return f.float().cpu().numpy()

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm text embeddings ``(n, d)``; each text is embedded once and kept."""
        import torch

        missing = [t for t in dict.fromkeys(texts) if t not in self._texts]
        if missing:
            tokens = self.tokenizer(list(missing)).to(self.device)
            with self._lock, torch.inference_mode():
                f = self.model.encode_text(tokens, normalize=True).float().cpu().numpy()
            for t, row in zip(missing, f):
                self._texts[t] = row
                while len(self._texts) > CACHE_ENTRIES:
                    self._texts.popitem(last=False)
        return np.stack([self._texts[t] for t in texts])

    # ------------------------------------------------------------------ scoring

    def _cached(self, key: tuple[Any, ...]) -> np.ndarray | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                self.cache_hits += 1
            else:
                self.cache_misses += 1
            return hit

    def _store(self, key: tuple[Any, ...], value: np.ndarray) -> None:
        with self._lock:
            self._cache[key] = value
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)

    def score_tiles(self, image: Image.Image, prompt: str, cols: int, rows: int,
                    image_key: str | None = None) -> TileScores:
        """Cosine of each of the ``cols x rows`` tiles to ``prompt``, batched, cached.

        ``image_key`` identifies the pixels (the loader's hash); without it the pixels
        are hashed here.
        """
        key = ("tiles", image_key or pixel_key(image), prompt, cols, rows)
        hit = self._cached(key)
        if hit is not None:
            return TileScores(hit, cols, rows, 0.0, True)
        t0 = time.perf_counter()
        crops = [image.crop(b) for b in tile_boxes(image.width, image.height, cols, rows)]
        sims = self.image_features(crops) @ self.text_features([prompt])[0]
        scores = sims.astype(np.float32).reshape(rows, cols)
        self._store(key, scores)
        return TileScores(scores, cols, rows, (time.perf_counter() - t0) * 1000.0, False)

    def classify(self, image: Image.Image, labels: Sequence[str], image_key: str | None = None,
                 template: str = "a photo of {}.") -> tuple[np.ndarray, float, bool]:
        """Zero-shot probabilities over ``labels`` (softmax of 100 x cosine), ms, cache hit."""
        key = ("labels", image_key or pixel_key(image), tuple(labels), template)
        hit = self._cached(key)
        if hit is not None:
            return hit, 0.0, True
        t0 = time.perf_counter()
        sims = self.image_features([image]) @ self.text_features([template.format(x) for x in labels]).T
        logits = 100.0 * sims[0]
        p = np.exp(logits - logits.max())
        probs = (p / p.sum()).astype(np.float32)
        self._store(key, probs)
        return probs, (time.perf_counter() - t0) * 1000.0, False

    def clip_score(self, image: Image.Image, text: str) -> float:
        """CLIPScore of ``text`` as a caption of ``image``: a reference-free *proxy* for quality."""
        cos = float(self.image_features([image])[0] @ self.text_features([text])[0])
        return CLIP_SCORE_WEIGHT * max(cos, 0.0)


def pixel_key(image: Image.Image) -> str:
    """A short hash of the pixels and size (for callers that have no loader hash)."""
    h = hashlib.blake2b(image.tobytes(), digest_size=12)
    h.update(f"{image.mode}:{image.width}x{image.height}".encode())
    return h.hexdigest()


def register_model_config(path: str | Path, name: str | None = None) -> str:
    """Register an open_clip model-config JSON; returns the model name to create.

    The file is either one model config (``embed_dim``, ``vision_cfg``, ``text_cfg``),
    registered under ``name`` or the file's stem, or ``{name: config, ...}``.
    """
    # open_clip has no public registration for a config dict; list_models() and
    # create_model() read this table.
    from open_clip.factory import _MODEL_CONFIGS

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--clip-config {path}: cannot read model config: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--clip-config {path}: expected a JSON object")
    if all(k in data for k in ("embed_dim", "vision_cfg", "text_cfg")):
        configs = {name or path.stem: data}
    else:
        configs = data
    for key, cfg in configs.items():
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ConfigError(f"--clip-config {path}: {key!r} is not an open_clip model config "
                              "(needs embed_dim, vision_cfg, text_cfg)")
        _MODEL_CONFIGS[key] = cfg
    if name is not None and name in configs:
        return name
    if len(configs) == 1:
        return next(iter(configs))
    if name is None:
        raise ConfigError(f"--clip-config {path} defines {sorted(configs)}: choose one with --clip-model")
    return name
