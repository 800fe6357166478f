"""libmtmd pipeline: prompt + images -> text tokens and image *embeddings* the engine can prefill.

llama-cpp-python's chat handlers encode and prefill images in one opaque call. The
middleware needs the projector output in between (to prune rows, to cache it, to time
the encoder), so this module drives ``llama_cpp.mtmd_cpp`` directly:

1. :meth:`VisionEncoder.tokenize` splits a prompt at its media markers with
   ``mtmd_tokenize`` into text chunks (token ids) and image chunks;
2. each image chunk (a tiling projector makes several of one image: overview and
   slices) is looked up in an :class:`EmbeddingCache` (keyed by the pixel hash and
   size of the image as encoded, the chunk's place in it, the projector file and token limits) or
   encoded with ``mtmd_encode_chunk``; the output buffer is *copied* (libmtmd
   overwrites it on the next encode);
3. the engine prefills text tokens and embedding rows itself.

Every check that guards llama.cpp against input it would ``GGML_ASSERT`` on (and so
abort the whole server) happens here, before the call: mmproj metadata types, image
sizes and aspect ratios, marker counts, embedding shapes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Hashable, Sequence, Union

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from models.images import LoadedImage, pixel_hash
from models.llama_lib import ensure_backend, on_own_thread

if TYPE_CHECKING:
    from models.reduce import ProjectorGrid

__all__ = [
    "Chunk",
    "EmbeddingCache",
    "ImageChunk",
    "Pixels",
    "ProjectorFacts",
    "TextChunk",
    "VisionConfig",
    "VisionEncoder",
    "VisionError",
    "check_image_size",
    "rgb_pixels",
    "read_projector_facts",
]

log = logging.getLogger("edgevlm.vision")

# Images with a side ratio beyond this are refused: dynamic-resolution preprocessors
# align each side up to the patch grid first, so a 1 x 100000 strip can turn into
# thousands of tokens despite the projector's max (Qwen2-VL's processor refuses > 200).
MAX_ASPECT_RATIO = 200.0
# Pixels handed to libmtmd per image (it copies them once more); images.py caps
# decoding at 40 MP, this is the last line of defence for callers that skip it.
MAX_ENCODER_PIXELS = 64_000_000

# Token-count limits clip.cpp hard-codes per dynamic projector (set_limit_image_tokens),
# used when the caller sets none. In LLM tokens *excluding* Pixtral's row breaks.
_DEFAULT_TOKEN_LIMITS: dict[str, tuple[int, int]] = {
    "pixtral": (8, 1024),
    "glm4v": (8, 4096),
    "lfm2": (64, 256),
    "qwen2vl_merger": (8, 4096),
    "qwen2.5vl_merger": (8, 4096),
    "qwen3vl_merger": (8, 4096),
}
# Tiling projectors whose overview chunk comes before the slices (the rest put it last).
_OVERVIEW_FIRST_PROJECTORS = frozenset({"resampler", "minicpmv4_6"})
_DYNAMIC_PROJECTORS = frozenset(
    {"pixtral", "lightonocr", "qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger", "glm4v", "lfm2", "phi4", "youtuvl"}
)

# The KV types clip.cpp reads with gguf_get_val_<type> — a mismatch is a GGML_ASSERT.
_U32_KEYS = (
    "clip.vision.embedding_length",
    "clip.vision.feed_forward_length",
    "clip.vision.block_count",
    "clip.vision.attention.head_count",
    "clip.vision.attention.head_count_kv",
    "clip.vision.attention.head_dim",
    "clip.vision.projection_dim",
    "clip.vision.image_size",
    "clip.vision.patch_size",
    "clip.vision.spatial_merge_size",
    "clip.vision.projector.scale_factor",
    "clip.vision.image_min_pixels",
    "clip.vision.image_max_pixels",
    "clip.vision.preproc_image_size",
    "clip.vision.preproc_min_tiles",
    "clip.vision.preproc_max_tiles",
    "clip.vision.window_size",
    "clip.minicpmv_query_num",
)
_F32_KEYS = ("clip.vision.attention.layer_norm_epsilon",)
_BOOL_KEYS = ("clip.has_vision_encoder", "clip.has_audio_encoder", "clip.use_gelu", "clip.use_silu")
_STR_KEYS = ("clip.projector_type", "clip.vision.projector_type")
_F32_ARRAY_KEYS = ("clip.vision.image_mean", "clip.vision.image_std")


class VisionError(RuntimeError):
    """The projector cannot be loaded or an image cannot be encoded; ``code`` is stable."""

    def __init__(self, message: str, *, code: str = "vision_error", status: int = 500):
        super().__init__(message)
        self.code = code
        self.status = status


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class TextChunk:
    """Token ids of one stretch of prompt text."""

    tokens: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True, eq=False)
class ImageChunk:
    """One image's projector output, ready to prefill as embedding rows.

    ``embeddings`` is ``(n_tokens, n_embd)`` float32, C-contiguous and **read-only**
    (it may be shared with the cache; pruning makes its own copy). ``n_pos`` is the
    number of LLM positions the image occupies (== ``n_tokens`` for 1-D RoPE models).
    ``image_hash`` identifies pixels + size and is also the libmtmd chunk id, so it can
    key KV-prefix reuse. ``width``/``height`` are the size handed to the encoder.
    A tiling projector makes several chunks of one image (overview and slices, maybe
    with text chunks such as slice separators between them): they share ``index`` and
    are told apart by ``part`` (0, 1, ... in prompt order).

    ``positions`` is set for M-RoPE projectors (Qwen2-VL family) only: an int32
    ``(4, n_tokens)`` array of positions *relative to the image's first position*
    ``n_past``, in llama.cpp's section order (temporal, row y, column x, extra) — what
    mtmd-helper's ``set_position_mrope_2d`` puts in a batch, minus ``n_past`` in the
    first three components (the extra component is absolute 0). The image then
    advances the sequence by ``n_pos = max(nx, ny)`` positions, not ``n_tokens``.
    """

    embeddings: np.ndarray
    n_tokens: int
    n_pos: int
    image_hash: str
    width: int
    height: int
    encode_ms: float
    cache_hit: bool
    index: int  # position of the image in the request's image list
    part: int = 0  # which of the image's chunks this is (tiling projectors: overview, slices, ...)
    non_causal: bool = False  # prefill this chunk with llama_set_causal_attn(ctx, False)
    positions: np.ndarray | None = None  # (4, n_tokens) int32 relative M-RoPE positions, or None
    # libmtmd's token grid (columns x rows); n_tokens may add separators (Pixtral row breaks)
    nx: int = 0
    ny: int = 0

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.nbytes)


Chunk = Union[TextChunk, ImageChunk]


@dataclass(frozen=True)
class ProjectorFacts:
    """What the resolution middleware must know about a vision projector.

    Dynamic projectors emit ``(w / align) * (h / align)`` tokens for an image aligned to
    ``align = patch_size * merge`` pixels, clamped to ``[min_tokens, max_tokens]``;
    ``row_break`` projectors (Pixtral) add one more token after every row but the last.
    Fixed projectors emit ``fixed_tokens`` for any image (resized to ``image_size``).

    ``tiling`` projectors (LLaVA-1.6 / llava-uhd with grid pinpoints, MiniCPM-V,
    Idefics3, Llama 4, LFM2, ...) have libmtmd cut an image larger than ``image_size``
    into an overview plus tiles, each its own image chunk of about ``tile_tokens``
    tokens; an image of at most ``image_size`` per side stays one chunk. Whether a
    projector tiles is *probed* (a large placeholder image comes back as several
    chunks) rather than read from ``projector_type``: libmtmd decides it per type
    *and* per file (``mlp`` tiles only when the mmproj lists grid pinpoints), and the
    probe stays right for types added to llama.cpp later.
    """

    projector_type: str
    patch_size: int
    merge: int
    image_size: int
    n_embd: int  # width of the embeddings (== the LLM's input embedding size)
    fixed_tokens: int | None = None
    min_tokens: int | None = None
    max_tokens: int | None = None
    row_break: bool = False
    uses_mrope: bool = False
    uses_non_causal: bool = False
    tiling: bool = False
    tile_tokens: int | None = None  # tokens of one image_size x image_size part (tiling projectors)
    # Where libmtmd puts a tiled image's overview among its chunks (slices follow or
    # precede it, row-major); only MiniCPM-V puts it first (mtmd.cpp ``ov_img_first``).
    overview_first: bool = False

    @property
    def overview_part(self) -> int:
        """Index, among a tiled image's ``n`` chunks, of the overview: 0, or -1 (the last)."""
        return 0 if self.overview_first else -1

    @property
    def align(self) -> int:
        return self.grid().align

    @property
    def is_fixed(self) -> bool:
        return self.grid().is_fixed

    def tokens_for(self, width: int, height: int) -> int:
        """LLM tokens for an image already aligned to the grid and inside the limits."""
        grid = self.grid()
        tokens = grid.tokens_for(width, height)
        if self.row_break and not grid.is_fixed:
            tokens += max(1, height // grid.align) - 1
        return tokens

    def grid(self) -> "ProjectorGrid":
        """The :class:`models.reduce.ProjectorGrid` the resize planner works with.

        Its token counts exclude Pixtral's row-break tokens (at most ``rows - 1`` more).
        """
        from models.reduce import ProjectorGrid

        return ProjectorGrid(
            patch_size=self.patch_size,
            merge=self.merge,
            min_tokens=self.min_tokens,
            max_tokens=self.max_tokens,
            fixed_tokens=self.fixed_tokens,
            image_size=self.image_size,
            max_aspect=MAX_ASPECT_RATIO,
        )


# --------------------------------------------------------------------------- mmproj metadata


@dataclass(frozen=True, eq=False)
class _MmprojMeta:
    projector_type: str
    patch_size: int
    image_size: int
    merge: int
    has_img_break: bool
    n_embd_out: int | None
    img_break: np.ndarray | None = None  # Pixtral's [IMG_BREAK] embedding, float32


def read_projector_facts(mmproj_path: str | os.PathLike[str]) -> _MmprojMeta:
    """Read and validate an mmproj GGUF's metadata *before* libmtmd sees it.

    Raises :class:`VisionError` for anything clip.cpp would assert on (a KV of the
    wrong type) or crash on (LLaVA projector without ``mm.0``/position embeddings,
    merged Pixtral without a patch merger).
    """
    import gguf

    path = Path(mmproj_path)
    if not path.is_file():
        raise VisionError(f"mmproj file not found: {path}", code="model_not_found")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct.error, ...
        raise VisionError(f"{path.name} is not a readable GGUF file ({exc})", code="invalid_mmproj") from None
    fields = reader.fields
    T = gguf.GGUFValueType

    def check(keys: Sequence[str], want: "gguf.GGUFValueType", sub: "gguf.GGUFValueType | None" = None) -> None:
        for key in keys:
            f = fields.get(key)
            if f is None:
                continue
            if f.types[0] != want or (sub is not None and f.types[-1] != sub):
                got = "/".join(t.name for t in f.types)
                exp = want.name + (f"/{sub.name}" if sub is not None else "")
                raise VisionError(
                    f"{path.name}: metadata {key} has type {got}, llama.cpp requires {exp}",
                    code="invalid_mmproj",
                )

    check(_U32_KEYS, T.UINT32)
    check(_F32_KEYS, T.FLOAT32)
    check(_BOOL_KEYS, T.BOOL)
    check(_STR_KEYS, T.STRING)
    check(_F32_ARRAY_KEYS, T.ARRAY, T.FLOAT32)

    def val(key: str, default=None):
        f = fields.get(key)
        if f is None:
            return default
        if f.types[0] == T.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
        return f.parts[f.data[0]].tolist()[0]

    if not val("clip.has_vision_encoder", False):
        raise VisionError(f"{path.name} has no vision encoder (clip.has_vision_encoder)", code="invalid_mmproj")
    proj = val("clip.projector_type") or val("clip.vision.projector_type") or ""
    if not proj:
        raise VisionError(f"{path.name}: clip.projector_type is missing", code="invalid_mmproj")
    tensors = {t.name: t for t in reader.tensors}
    if proj == "mlp" and "mm.3.weight" not in tensors:
        missing = [n for n in ("mm.0.weight", "mm.0.bias", "v.position_embd.weight") if n not in tensors]
        if missing:
            raise VisionError(
                f"{path.name}: LLaVA (mlp) projector lacks {', '.join(missing)} (llama.cpp would crash)",
                code="invalid_mmproj",
            )
    merge = int(val("clip.vision.spatial_merge_size", 0) or val("clip.vision.projector.scale_factor", 0) or 1)
    if proj == "pixtral" and merge > 1 and "mm.patch_merger.weight" not in tensors:
        raise VisionError(
            f"{path.name}: pixtral projector with spatial_merge_size={merge} lacks mm.patch_merger.weight",
            code="invalid_mmproj",
        )
    out = tensors.get("mm.2.weight")
    n_embd_out = int(out.shape[1]) if out is not None and len(out.shape) > 1 else None
    brk = tensors.get("v.token_embd.img_break")
    img_break = None
    if brk is not None and brk.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        img_break = np.array(brk.data, dtype=np.float32).reshape(-1)
    return _MmprojMeta(
        projector_type=proj,
        patch_size=int(val("clip.vision.patch_size", 0) or 0),
        image_size=int(val("clip.vision.image_size", 0) or 0),
        merge=merge,
        has_img_break="v.token_embd.img_break" in tensors,
        n_embd_out=n_embd_out,
        img_break=img_break,
    )


# --------------------------------------------------------------------------- cache


class EmbeddingCache:
    """Thread-safe LRU of projector outputs, bounded by bytes, with hit/miss counters."""

    def __init__(self, max_bytes: int = 256 << 20):
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: Hashable, arr: np.ndarray) -> np.ndarray:
        """Store ``arr`` (made read-only); returns it. Too-large entries are not kept."""
        arr.flags.writeable = False
        size = int(arr.nbytes)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= int(old.nbytes)
            if size > self.max_bytes:
                return arr
            self._items[key] = arr
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= int(dropped.nbytes)
                self.evictions += 1
        return arr

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }


# --------------------------------------------------------------------------- logging


@llama_cpp.llama_log_callback
def _mtmd_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # clip/mtmd print every preprocessing step at INFO; keep warnings and errors.
    if level in (3, 4) and text:
        msg = text.decode("utf-8", errors="replace").rstrip()
        if msg:
            log.log(logging.WARNING if level == 3 else logging.ERROR, msg)


_log_lock = threading.Lock()
_log_installed = False


def _install_mtmd_log() -> None:
    global _log_installed
    with _log_lock:
        if not _log_installed:
            mtmd.mtmd_log_set(_mtmd_log, ctypes.c_void_p(0))
            mtmd.mtmd_helper_log_set(_mtmd_log, ctypes.c_void_p(0))
            _log_installed = True


# --------------------------------------------------------------------------- encoder


@dataclass(frozen=True, eq=False)
class Pixels:
    """An image already turned into encoder input: RGB pixels and their ``pixel_hash``."""

    rgb: np.ndarray  # (H, W, 3) uint8
    sha256: str


ImageInput = Union[Image.Image, LoadedImage, Pixels]


@dataclass(frozen=True)
class VisionConfig:
    """How a model's projector is loaded: the same for an in-process model and a runner."""

    mmproj_path: str
    image_min_tokens: int | None = None
    image_max_tokens: int | None = None
    cache_bytes: int = 256 << 20

    def load(self, model: llama_cpp.llama_model_p, n_threads: int) -> "VisionEncoder":
        """The encoder next to a loaded text ``model`` (which must outlive it)."""
        return VisionEncoder(self.mmproj_path, model, n_threads=n_threads,
                             image_min_tokens=self.image_min_tokens, image_max_tokens=self.image_max_tokens,
                             cache_bytes=self.cache_bytes)


class VisionEncoder:
    """An mmproj loaded next to a text model: tokenizes prompts with images into chunks.

    ``model`` must outlive the encoder (libmtmd keeps a pointer to it for tokenizing).
    ``tokenize`` may be called from several threads; encodes are serialized on one lock
    (one libmtmd context has one output buffer).
    """

    def __init__(
        self,
        mmproj_path: str,
        model: llama_cpp.llama_model_p,
        *,
        n_threads: int,
        use_gpu: bool = False,
        image_min_tokens: int | None = None,
        image_max_tokens: int | None = None,
        cache_bytes: int = 256 << 20,
        cache: EmbeddingCache | None = None,
        warmup: bool = True,
        flash_attn: bool | None = None,
    ):
        if not model:
            raise VisionError("a loaded text model is required", code="invalid_model")
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        for name, v in (("image_min_tokens", image_min_tokens), ("image_max_tokens", image_max_tokens)):
            if v is not None and not (1 <= v <= 1 << 20):
                raise ValueError(f"{name} must be between 1 and 1048576, got {v}")
        if image_min_tokens and image_max_tokens and image_min_tokens > image_max_tokens:
            raise ValueError("image_min_tokens must not exceed image_max_tokens")

        ensure_backend()
        _install_mtmd_log()
        path = Path(mmproj_path).resolve()
        meta = read_projector_facts(path)
        self.mmproj_path = str(path)
        self._model = model
        self._img_break = meta.img_break if meta.projector_type == "pixtral" else None
        self._n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
        if meta.n_embd_out is not None and meta.n_embd_out != self._n_embd:
            raise VisionError(
                f"mmproj {path.name} outputs {meta.n_embd_out}-wide embeddings but the text model "
                f"takes {self._n_embd}: wrong mmproj for this model",
                code="mmproj_mismatch",
            )

        params = mtmd.mtmd_context_params_default()
        params.use_gpu = bool(use_gpu)
        params.n_threads = int(n_threads)
        params.print_timings = False
        params.warmup = bool(warmup)
        params.image_min_tokens = int(image_min_tokens) if image_min_tokens else -1
        params.image_max_tokens = int(image_max_tokens) if image_max_tokens else -1
        if flash_attn is not None:
            params.flash_attn_type = 1 if flash_attn else 0  # LLAMA_FLASH_ATTN_TYPE_ENABLED / DISABLED
        self._marker_bytes = mtmd.mtmd_default_marker()
        self.media_marker: str = self._marker_bytes.decode("utf-8")
        params.media_marker = self._marker_bytes

        # The warm-up encode computes a graph: off this (long-lived) thread, see on_own_thread.
        ctx = on_own_thread(lambda: mtmd.mtmd_init_from_file(self.mmproj_path.encode(), model, params))
        if not ctx:
            raise VisionError(
                f"llama.cpp could not load mmproj {path.name} (see the log for the reason)",
                code="invalid_mmproj",
            )
        self._ctx = ctx
        self._lock = threading.RLock()
        self._closed = False
        try:
            if not mtmd.mtmd_support_vision(ctx):
                raise VisionError(f"{path.name} has no vision encoder", code="invalid_mmproj")
            self.uses_mrope: bool = bool(mtmd.mtmd_decode_use_mrope(ctx))
            self.uses_non_causal: bool = bool(mtmd.mtmd_decode_use_non_causal(ctx, None))
            self.projector: ProjectorFacts = self._probe_facts(meta, image_min_tokens, image_max_tokens)
        except BaseException:
            self.close()
            raise

        self.cache = cache if cache is not None else EmbeddingCache(cache_bytes)
        st = path.stat()
        # Everything besides the pixels that changes the projector output.
        self._cache_ns = (self.mmproj_path, st.st_size, st.st_mtime_ns, image_min_tokens, image_max_tokens)

    # ------------------------------------------------------------------ facts

    def _probe_facts(self, meta: _MmprojMeta, min_tok: int | None, max_tok: int | None) -> ProjectorFacts:
        proj = meta.projector_type
        small = self.count_tokens(meta.patch_size * 2 or 32, meta.patch_size * 2 or 32)
        big_parts = self._image_chunk_tokens(max(meta.image_size, 64) * 2 + 8, max(meta.image_size, 64) + 24)
        big = sum(big_parts)
        tiling = len(big_parts) > 1 and meta.image_size > 0
        fixed = small if small == big and proj not in _DYNAMIC_PROJECTORS else None
        lo, hi = _DEFAULT_TOKEN_LIMITS.get(proj, (None, None))
        if tiling and not fixed and not (max_tok or hi):
            hi = self._tiling_max_tokens(meta.image_size)
        return ProjectorFacts(
            projector_type=proj,
            patch_size=meta.patch_size,
            merge=meta.merge,
            image_size=meta.image_size,
            n_embd=self._n_embd,
            fixed_tokens=fixed,
            min_tokens=None if fixed else (min_tok or lo),
            max_tokens=None if fixed else (max_tok or hi),
            row_break=meta.has_img_break and proj == "pixtral",
            uses_mrope=self.uses_mrope,
            uses_non_causal=self.uses_non_causal,
            tiling=tiling,
            tile_tokens=self.count_tokens(meta.image_size, meta.image_size) if tiling else None,
            overview_first=proj in _OVERVIEW_FIRST_PROJECTORS,
        )

    def _tiling_max_tokens(self, tile_px: int) -> int:
        """The most tokens libmtmd makes of one image on this tiling projector (probed).

        The slice count grows with the size up to a cap (the largest grid pinpoint,
        MiniCPM-V's 9 slices, Idefics3's longest-edge resize), so a large image of a
        few aspect ratios reaches it. Profiles budget a fraction of this number: a
        made-up maximum above it would leave ``fast`` at the full slice count.
        """
        side = max(8 * tile_px, 2048)
        while side * side > MAX_ENCODER_PIXELS:
            side //= 2
        return max(self.count_tokens(w, h) for w, h in ((side, side), (side, side // 2), (side // 2, side),
                                                        (side, side // 4), (side // 4, side)))

    @property
    def n_embd(self) -> int:
        return self._n_embd

    # ------------------------------------------------------------------ public API

    def count_tokens(self, width: int, height: int) -> int:
        """LLM tokens an image of this size would cost, without encoding it (placeholder bitmap)."""
        return sum(self._image_chunk_tokens(width, height))

    def _image_chunk_tokens(self, width: int, height: int) -> list[int]:
        """Tokens of each image chunk libmtmd makes of one image of this size (several when it tiles)."""
        check_image_size(width, height, 0)
        chunks = self._run_tokenize(self._marker_bytes, [None], [(width, height)], [None], add_special=False)
        try:
            out: list[int] = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    out.append(int(mtmd.mtmd_input_chunk_get_n_tokens(chunk)))
            return out
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def tokenize(
        self,
        prompt: str,
        images: Sequence[ImageInput],
        *,
        add_special: bool = True,
        parse_special: bool = True,
    ) -> list[Chunk]:
        """Split ``prompt`` (one :attr:`media_marker` per image) into text and encoded image chunks.

        Image chunks come from the cache when the same pixels at the same size were
        encoded before (``cache_hit=True``, ``encode_ms=0``); on a tiling projector one
        image yields several (see :class:`ImageChunk` ``part``), each cached on its own.
        Raises ``ValueError`` for a marker/image count mismatch or an unusable image,
        :class:`VisionError` when libmtmd fails.
        """
        if "\x00" in prompt:
            raise ValueError("prompt contains a NUL character")
        n_markers = prompt.count(self.media_marker)
        if n_markers != len(images):
            raise ValueError(
                f"prompt has {n_markers} media marker(s) {self.media_marker!r} but {len(images)} image(s) were given"
            )
        arrays: list[np.ndarray] = []
        sizes: list[tuple[int, int]] = []
        hashes: list[str] = []
        for i, item in enumerate(images):
            arr, h = _rgb_pixels(item, i)
            arrays.append(arr)
            sizes.append((arr.shape[1], arr.shape[0]))
            hashes.append(h)

        owners = self._chunk_owners(sizes)
        chunks = self._run_tokenize(prompt.encode("utf-8"), arrays, sizes, hashes, add_special, parse_special)
        try:
            out: list[Chunk] = []
            parts = [0] * len(arrays)
            seen = 0
            for ci in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, ci)
                kind = mtmd.mtmd_input_chunk_get_type(chunk)
                if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t(0)
                    ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                    out.append(TextChunk([int(ptr[j]) for j in range(n.value)] if n.value else []))
                elif kind == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    if seen >= len(owners):
                        raise VisionError(f"libmtmd returned more image chunks than the {len(owners)} expected "
                                          f"for {len(arrays)} image(s)", code="vision_error")
                    i = owners[seen]
                    out.append(self._image_chunk(chunk, i, sizes[i], hashes[i], parts[i]))
                    parts[i] += 1
                    seen += 1
                else:
                    raise VisionError("libmtmd returned an audio chunk for an image prompt", code="vision_error")
            if seen != len(owners):
                raise VisionError(f"libmtmd returned {seen} image chunks, {len(owners)} expected "
                                  f"for {len(arrays)} image(s)", code="vision_error")
            return out
        finally:
            mtmd.mtmd_input_chunks_free(chunks)

    def _chunk_owners(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """The request image each of libmtmd's image chunks will belong to, in prompt order.

        One chunk per image, except on a tiling projector: there libmtmd cuts an image
        larger than its tile into an overview and slices, and how many depends only on
        the size, so a placeholder of the same size says how many chunks each image gets
        (identical images in one prompt share a chunk id, so ids cannot tell them apart).
        """
        if not self.projector.tiling:
            return list(range(len(sizes)))
        return [i for i, (w, h) in enumerate(sizes) for _ in self._image_chunk_tokens(w, h)]

    def close(self) -> None:
        """Free the libmtmd context (idempotent). The text model is not touched."""
        with self._lock:
            if not self._closed:
                self._closed = True
                mtmd.mtmd_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> "VisionEncoder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------ internals

    def _ctx_or_raise(self):
        if self._closed or not self._ctx:
            raise VisionError("vision encoder is closed", code="model_unloaded", status=503)
        return self._ctx

    def _run_tokenize(
        self,
        text: bytes,
        arrays: Sequence[np.ndarray | None],
        sizes: Sequence[tuple[int, int]],
        ids: Sequence[str | None],
        add_special: bool,
        parse_special: bool = True,
    ):
        """mtmd_tokenize into a fresh chunk list (caller frees it); bitmaps freed here."""
        bitmaps = []
        chunks = None
        try:
            for arr, (w, h), ident in zip(arrays, sizes, ids):
                data = None if arr is None else arr.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
                bm = mtmd.mtmd_bitmap_init(w, h, data)  # copies the pixels; None -> placeholder
                if not bm:
                    raise VisionError("libmtmd could not allocate an image bitmap", code="vision_error")
                bitmaps.append(bm)
                if ident:
                    mtmd.mtmd_bitmap_set_id(bm, ident.encode())
            chunks = mtmd.mtmd_input_chunks_init()
            if not chunks:
                raise VisionError("libmtmd could not allocate input chunks", code="vision_error")
            inp = mtmd.mtmd_input_text(text, len(text), bool(add_special), bool(parse_special))
            arr_t = (mtmd.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
            with self._lock:
                ctx = self._ctx_or_raise()
                rc = mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), arr_t, len(bitmaps))
            if rc != 0:
                reason = {1: "media marker count does not match the images", 2: "image preprocessing failed"}
                raise VisionError(f"mtmd_tokenize failed ({rc}: {reason.get(rc, 'unknown error')})", code="vision_error")
            result, chunks = chunks, None
            return result
        finally:
            if chunks:
                mtmd.mtmd_input_chunks_free(chunks)
            for bm in bitmaps:
                mtmd.mtmd_bitmap_free(bm)

    def _image_chunk(self, chunk, index: int, size: tuple[int, int], image_hash: str, part: int = 0) -> ImageChunk:
        n_tokens = int(mtmd.mtmd_input_chunk_get_n_tokens(chunk))
        n_pos = int(mtmd.mtmd_input_chunk_get_n_pos(chunk))
        if n_tokens < 1:
            raise VisionError(f"image {index} produced no tokens", code="vision_error")
        positions = _mrope_positions(chunk, n_tokens, index) if self.uses_mrope else None
        image_tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
        nx = int(mtmd.mtmd_image_tokens_get_nx(image_tokens)) if image_tokens else 0
        ny = int(mtmd.mtmd_image_tokens_get_ny(image_tokens)) if image_tokens else 0
        # Every chunk of a tiled image has the same pixels, size and (often) token count.
        key = (image_hash, size, part, n_tokens, self._cache_ns)
        cached = self.cache.get(key)

        def result(embeddings: np.ndarray, encode_ms: float, cache_hit: bool) -> ImageChunk:
            return ImageChunk(
                embeddings=embeddings, n_tokens=n_tokens, n_pos=n_pos, image_hash=image_hash,
                width=size[0], height=size[1], encode_ms=encode_ms, cache_hit=cache_hit,
                index=index, part=part, non_causal=self.uses_non_causal, positions=positions, nx=nx, ny=ny,
            )

        if cached is not None:
            return result(cached, 0.0, True)
        with self._lock:
            ctx = self._ctx_or_raise()
            t0 = time.perf_counter()
            rc = on_own_thread(lambda: mtmd.mtmd_encode_chunk(ctx, chunk))
            encode_ms = (time.perf_counter() - t0) * 1000.0
            if rc != 0:
                raise VisionError(f"encoding image {index} failed (mtmd_encode_chunk returned {rc})", code="vision_error")
            ptr = mtmd.mtmd_get_output_embd(ctx)
            if not ptr:
                raise VisionError(f"encoding image {index} produced no output", code="vision_error")
            # Copy now: the buffer belongs to the context and the next encode overwrites it.
            emb = np.ctypeslib.as_array(ptr, shape=(n_tokens * self._n_embd,)).copy()
        emb = emb.reshape(n_tokens, self._n_embd)
        if self._img_break is not None:
            _repair_row_breaks(emb, self._img_break, size[0] / size[1])
        finite = np.isfinite(emb).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise VisionError(
                f"encoding image {index} produced non-finite values in {bad.size} of {n_tokens} rows "
                f"(first: {bad[:8].tolist()})",
                code="vision_error",
            )
        return result(self.cache.put(key, emb), encode_ms, False)


def _mrope_positions(chunk, n_tokens: int, index: int) -> np.ndarray:
    """``(4, n_tokens)`` int32 M-RoPE positions of an image chunk relative to its ``n_past``.

    Asks libmtmd itself (``mtmd_helper_image_get_decoder_pos`` with ``pos_0 = 0``, the
    call mtmd-helper makes before ``set_position_mrope_2d``), so the layout always
    matches llama.cpp's; rows are (t, y, x, z) as the batch's sections are ordered.
    """
    tokens = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
    if not tokens:
        raise VisionError(f"image {index}: libmtmd returned no image tokens", code="vision_error")
    if int(mtmd.mtmd_image_tokens_get_n_tokens(tokens)) != n_tokens:
        raise VisionError(f"image {index}: inconsistent image token count", code="vision_error")
    out = (mtmd.mtmd_decoder_pos * n_tokens)()
    mtmd.mtmd_helper_image_get_decoder_pos(tokens, 0, out)
    raw = np.ctypeslib.as_array(ctypes.cast(out, ctypes.POINTER(ctypes.c_uint32)), shape=(n_tokens, 4))
    t, x, y, z = (raw[:, k].astype(np.int32) for k in range(4))  # struct order: t, x, y, z
    pos = np.ascontiguousarray(np.stack([t, y, x, z]))
    pos.flags.writeable = False
    return pos


def _repair_row_breaks(emb: np.ndarray, img_break: np.ndarray, aspect: float) -> None:
    """Work around llama.cpp's Pixtral graph filling [IMG_BREAK] rows from uninitialised memory.

    ``clip_graph_pixtral`` builds each break row as ``0 * (uninitialised tensor) +
    img_break``; when the compute buffer holds NaN/Inf bits the row comes out NaN
    (seen intermittently on CPU). A correct break row equals ``img_break`` exactly and
    break rows sit at ``k * (cols + 1) - 1``. Among the grids ``cols x rows`` with
    ``rows * (cols + 1) - 1 == n`` that put every non-finite row on a break position and
    whose finite break rows equal ``img_break``, the one closest to the image's aspect
    ratio (``aspect = width / height``, within 2x) is taken and its break rows are
    overwritten in place. Anything else is left for the caller to reject.
    """
    bad = ~np.isfinite(emb).all(axis=1)
    if not bad.any() or img_break.shape[0] != emb.shape[1] or aspect <= 0:
        return
    n = emb.shape[0]
    bad_idx = np.flatnonzero(bad)
    best: tuple[float, np.ndarray] | None = None
    for period in range(2, n + 2):  # period = cols + 1; n + 1 = rows * period
        if (n + 1) % period:
            continue
        idx = np.arange(period - 1, n, period)
        if idx.size == 0 or not np.isin(bad_idx, idx).all():
            continue
        ok = ~bad[idx]
        if not np.array_equal(emb[idx[ok]], np.broadcast_to(img_break, (int(ok.sum()), emb.shape[1]))):
            continue
        cols, rows = period - 1, (n + 1) // period
        err = abs(np.log((cols / rows) / aspect))
        if err <= np.log(2.0) and (best is None or err < best[0]):
            best = (err, idx)
    if best is not None:
        emb[best[1]] = img_break


def check_image_size(width: int, height: int, index: int) -> None:
    """``ValueError`` naming image ``index`` and its size when the encoder cannot take it."""
    if width < 1 or height < 1:
        raise ValueError(f"image {index} has no pixels ({width}x{height})")
    if width * height > MAX_ENCODER_PIXELS:
        raise ValueError(f"image {index} is {width}x{height}, more than {MAX_ENCODER_PIXELS} pixels")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise ValueError(f"image {index} is {width}x{height}: aspect ratio above {MAX_ASPECT_RATIO:g}:1")


def rgb_pixels(item: ImageInput, index: int) -> Pixels:
    """An image as the encoder takes it: (H, W, 3) uint8 C-contiguous pixels and their hash.

    A runner client sends images in this form (the array crosses through shared memory),
    so the runner keys its embedding cache on the same hash as an in-process encoder.
    """
    if isinstance(item, Pixels):
        return item
    arr, h = _rgb_pixels(item, index)
    return Pixels(arr, h)


def _rgb_pixels(item: ImageInput, index: int) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 C-contiguous pixels and their pixel hash."""
    if isinstance(item, Pixels):
        arr = item.rgb
        if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"image {index} is not (height, width, 3) uint8 RGB pixels")
        check_image_size(arr.shape[1], arr.shape[0], index)
        return np.ascontiguousarray(arr), item.sha256
    if isinstance(item, LoadedImage):
        img, known = item.image, item.sha256
    elif isinstance(item, Image.Image):
        img, known = item, None
    else:
        raise ValueError(f"image {index} is a {type(item).__name__}, expected a PIL image")
    check_image_size(img.width, img.height, index)
    if img.mode != "RGB":
        img, known = img.convert("RGB"), None
    arr = np.ascontiguousarray(np.asarray(img, dtype=np.uint8))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image {index} did not convert to RGB pixels")
    return arr, known or pixel_hash(img)
