"""libmtmd pipeline on tiny generated VLMs: chunks, token counts, embeddings, cache, prefill."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import threading
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
from PIL import Image

from bench.tinymodels import tiny_vlm, write_tiny_mmproj
from models import cpu_paths
from models.images import ImageLimits, load_image
from models.llama_lib import ensure_backend
from models.vision import (
    EmbeddingCache,
    ImageChunk,
    TextChunk,
    VisionEncoder,
    VisionError,
    read_projector_facts,
)

N_EMBD = 64  # tiny LLM width


def decode_embeddings(
    ctx: llama_cpp.llama_context_p,
    embeddings: np.ndarray,
    n_past: int,
    seq_id: int = 0,
    n_batch: int | None = None,
    *,
    logits_last: bool = False,
) -> int:
    """Prefill embedding rows at positions ``n_past, n_past+1, ...``; returns the new ``n_past``.

    A minimal reference prefill (the engine owns the real one), for checking embeddings. Rows go in batches of
    ``n_batch`` (default: the context's n_batch). For non-causal projectors the caller
    must wrap this in ``llama_set_causal_attn(ctx, False)`` and keep an image within one
    ubatch. Raises ``ValueError`` on a shape that llama.cpp would reject and
    ``VisionError`` when ``llama_decode`` fails.
    """
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] < 1:
        raise ValueError(f"embeddings must be (n_tokens, n_embd), got {emb.shape}")
    model = llama_cpp.llama_get_model(ctx)
    n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
    if emb.shape[1] != n_embd:
        raise ValueError(f"embeddings are {emb.shape[1]} wide, the model takes {n_embd}")
    if n_past < 0:
        raise ValueError("n_past must be >= 0")
    n_ctx = int(llama_cpp.llama_n_ctx(ctx))
    if n_past + emb.shape[0] > n_ctx:
        raise ValueError(f"{emb.shape[0]} rows at position {n_past} exceed the context ({n_ctx})")
    ctx_batch = int(llama_cpp.llama_n_batch(ctx))
    step = min(n_batch or ctx_batch, ctx_batch)
    if step < 1:
        raise ValueError("n_batch must be >= 1")

    batch = llama_cpp.llama_batch_init(step, n_embd, 1)
    try:
        total = emb.shape[0]
        for start in range(0, total, step):
            rows = emb[start : start + step]
            n = rows.shape[0]
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
            for j in range(n):
                batch.pos[j] = n_past + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = seq_id
                batch.logits[j] = bool(logits_last and start + j == total - 1)
            batch.n_tokens = n
            rc = llama_cpp.llama_decode(ctx, batch)
            if rc != 0:
                raise VisionError(f"llama_decode of image embeddings failed ({rc})", code="decode_error")
            n_past += n
    finally:
        llama_cpp.llama_batch_free(batch)
    return n_past


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tinyvlm")


@pytest.fixture(scope="module")
def text_model(model_dir: Path):
    ensure_backend()
    llm_path, _ = tiny_vlm(model_dir, "pixtral")
    model = cpu_paths.load_model(str(llm_path), ())  # plain CPU path: safe on every CPU
    assert model
    yield model
    llama_cpp.llama_model_free(model)


@pytest.fixture(scope="module")
def pixtral(model_dir: Path, text_model):
    _, mmproj = tiny_vlm(model_dir, "pixtral")
    with VisionEncoder(str(mmproj), text_model, n_threads=2) as enc:
        yield enc


@pytest.fixture(scope="module")
def mlp(model_dir: Path, text_model):
    _, mmproj = tiny_vlm(model_dir, "mlp")
    with VisionEncoder(str(mmproj), text_model, n_threads=2) as enc:
        yield enc


def image_chunks(chunks) -> list[ImageChunk]:
    return [c for c in chunks if isinstance(c, ImageChunk)]


def test_projector_facts(pixtral: VisionEncoder, mlp: VisionEncoder) -> None:
    p = pixtral.projector
    assert (p.projector_type, p.patch_size, p.merge, p.align) == ("pixtral", 8, 2, 16)
    assert not p.is_fixed and (p.min_tokens, p.max_tokens) == (8, 1024) and p.row_break
    m = mlp.projector
    assert (m.projector_type, m.fixed_tokens, m.image_size) == ("mlp", 64, 64)
    assert not (pixtral.uses_mrope or pixtral.uses_non_causal)
    assert pixtral.media_marker == "<__media__>"
    grid = p.grid()
    assert grid.align == 16 and grid.max_tokens == 1024


def test_pixtral_token_count_grows_with_resolution(pixtral: VisionEncoder) -> None:
    marker = pixtral.media_marker
    small = image_chunks(pixtral.tokenize(f"look {marker} now", [noise(64, 64)]))[0]
    large = image_chunks(pixtral.tokenize(f"look {marker} now", [noise(256, 256)]))[0]
    # 64 px -> 4x4 grid + 3 row breaks; 256 px -> 16x16 + 15
    assert (small.n_tokens, large.n_tokens) == (19, 271)
    assert small.n_tokens == pixtral.count_tokens(64, 64) == pixtral.projector.tokens_for(64, 64)
    assert large.n_pos == large.n_tokens
    assert large.embeddings.shape == (271, N_EMBD) and large.embeddings.dtype == np.float32
    assert np.isfinite(large.embeddings).all() and large.embeddings.std() > 0
    assert not large.embeddings.flags.writeable
    assert (large.width, large.height) == (256, 256)


def test_pixtral_respects_token_limits(model_dir: Path, text_model) -> None:
    _, mmproj = tiny_vlm(model_dir, "pixtral")
    with VisionEncoder(str(mmproj), text_model, n_threads=1, image_max_tokens=16, image_min_tokens=4, warmup=False) as enc:
        assert enc.projector.max_tokens == 16
        n = enc.count_tokens(512, 512)
        assert n <= 16 + 3  # 4x4 grid + row breaks
        chunk = image_chunks(enc.tokenize(enc.media_marker, [noise(512, 512)]))[0]
        assert chunk.n_tokens == n


def test_mlp_token_count_is_fixed(mlp: VisionEncoder) -> None:
    counts = {image_chunks(mlp.tokenize(f"{mlp.media_marker}?", [noise(w, h)]))[0].n_tokens for w, h in ((64, 64), (300, 200), (17, 90))}
    assert counts == {64}
    assert mlp.count_tokens(1000, 10) == 64


def test_chunks_in_prompt_order(pixtral: VisionEncoder) -> None:
    m = pixtral.media_marker
    chunks = pixtral.tokenize(f"<|im_start|>user\n{m} and {m} differ?<|im_end|>", [noise(32, 32, 1), noise(48, 32, 2)])
    kinds = [type(c).__name__ for c in chunks]
    assert kinds[0] == "TextChunk" and kinds.count("ImageChunk") == 2
    imgs = image_chunks(chunks)
    assert [c.index for c in imgs] == [0, 1]
    text = [c for c in chunks if isinstance(c, TextChunk)]
    assert text[0].tokens[0] == 1  # <|im_start|> parsed as a special token


def test_embedding_cache_hits_and_misses(model_dir: Path, text_model) -> None:
    _, mmproj = tiny_vlm(model_dir, "pixtral")
    with VisionEncoder(str(mmproj), text_model, n_threads=2, warmup=False) as enc:
        m = enc.media_marker
        img = noise(128, 96, 7)
        first = image_chunks(enc.tokenize(m, [img]))[0]
        assert not first.cache_hit and first.encode_ms > 0
        # Same pixels, new PIL object and a LoadedImage: both hit, nothing is encoded.
        again = image_chunks(enc.tokenize(f"again {m}", [img.copy()]))[0]
        assert again.cache_hit and again.encode_ms == 0.0
        assert again.image_hash == first.image_hash
        np.testing.assert_array_equal(again.embeddings, first.embeddings)
        # Different resolution of the same picture: a miss.
        smaller = image_chunks(enc.tokenize(m, [img.resize((64, 48))]))[0]
        assert not smaller.cache_hit and smaller.image_hash != first.image_hash
        assert enc.cache.stats()["hits"] == 1 and enc.cache.stats()["misses"] == 2


def test_loaded_image_reuses_its_hash(pixtral: VisionEncoder) -> None:
    import base64
    import io

    buf = io.BytesIO()
    noise(40, 40, 3).save(buf, "PNG")
    loaded = load_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), 0, ImageLimits())
    chunk = image_chunks(pixtral.tokenize(pixtral.media_marker, [loaded]))[0]
    assert chunk.image_hash == loaded.sha256


def test_cache_is_bounded_lru() -> None:
    cache = EmbeddingCache(max_bytes=3 * 400)
    for i in range(4):
        cache.put(i, np.zeros((10, 10), np.float32))  # 400 bytes each
    assert len(cache) == 3 and cache.get(0) is None and cache.get(3) is not None
    assert cache.stats()["evictions"] == 1
    cache.put("huge", np.zeros((100, 100), np.float32))
    assert cache.get("huge") is None and cache.nbytes <= cache.max_bytes


def test_decode_image_embeddings_into_context(pixtral: VisionEncoder, text_model) -> None:
    m = pixtral.media_marker
    chunks = pixtral.tokenize(f"<|im_start|>user\n{m}describe<|im_end|>", [noise(96, 64, 5)])
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_ubatch = 512, 32, 32
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(text_model, cparams)
    assert ctx
    try:
        n_past = 0
        for chunk in chunks:
            if isinstance(chunk, TextChunk):
                arr = (llama_cpp.llama_token * chunk.n_tokens)(*chunk.tokens)
                batch = llama_cpp.llama_batch_get_one(arr, chunk.n_tokens)
                assert llama_cpp.llama_decode(ctx, batch) == 0
                n_past += chunk.n_tokens
            else:
                # 6x4 grid + 3 row breaks = 27 rows, prefilled in batches of 10
                assert chunk.n_tokens == 27
                n_past = decode_embeddings(ctx, chunk.embeddings, n_past, 0, 10)
        assert n_past == sum(c.n_pos for c in chunks)
        with pytest.raises(ValueError):
            decode_embeddings(ctx, np.zeros((2, N_EMBD + 1), np.float32), n_past)
        with pytest.raises(ValueError):
            decode_embeddings(ctx, np.zeros((600, N_EMBD), np.float32), n_past)
    finally:
        llama_cpp.llama_free(ctx)


def test_bad_calls_raise_before_llama_cpp(pixtral: VisionEncoder) -> None:
    m = pixtral.media_marker
    with pytest.raises(ValueError, match="marker"):
        pixtral.tokenize(f"{m} {m}", [noise(32, 32)])
    with pytest.raises(ValueError, match="aspect"):
        pixtral.tokenize(m, [noise(1000, 2)])
    with pytest.raises(ValueError):
        pixtral.tokenize(m, ["not an image"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        pixtral.tokenize("a\x00b", [])
    # non-RGB input is converted, not rejected
    grey = noise(32, 32).convert("L")
    assert image_chunks(pixtral.tokenize(m, [grey]))[0].n_tokens == pixtral.count_tokens(32, 32)


def test_wrong_mmproj_is_refused(tmp_path: Path, text_model) -> None:
    narrow = write_tiny_mmproj(tmp_path / "narrow.gguf", "mlp", n_embd_text=32)
    with pytest.raises(VisionError) as info:
        VisionEncoder(str(narrow), text_model, n_threads=1)
    assert info.value.code == "mmproj_mismatch"

    # A KV of the wrong GGUF type would GGML_ASSERT (abort) inside clip.cpp.
    bad = tmp_path / "bad.gguf"
    w = gguf.GGUFWriter(str(bad), "clip")
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_int32("clip.vision.image_size", 64)
    w.add_tensor("mm.2.weight", np.zeros((64, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(VisionError, match="image_size"):
        read_projector_facts(bad)
    with pytest.raises(VisionError):
        VisionEncoder(str(bad), text_model, n_threads=1)
    with pytest.raises(VisionError):
        VisionEncoder(str(tmp_path / "missing.gguf"), text_model, n_threads=1)


def test_concurrent_tokenize_is_consistent(model_dir: Path, text_model) -> None:
    _, mmproj = tiny_vlm(model_dir, "mlp")
    with VisionEncoder(str(mmproj), text_model, n_threads=1, cache_bytes=0, warmup=False) as enc:
        img = noise(64, 64, 9)
        expected = image_chunks(enc.tokenize(enc.media_marker, [img]))[0].embeddings
        results: list[np.ndarray] = []
        errors: list[BaseException] = []

        def work() -> None:
            try:
                for _ in range(3):
                    results.append(image_chunks(enc.tokenize(enc.media_marker, [img]))[0].embeddings)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(results) == 12
        for r in results:
            np.testing.assert_array_equal(r, expected)


def test_closed_encoder_refuses_work(model_dir: Path, text_model) -> None:
    _, mmproj = tiny_vlm(model_dir, "mlp")
    enc = VisionEncoder(str(mmproj), text_model, n_threads=1, warmup=False)
    enc.close()
    enc.close()
    with pytest.raises(VisionError):
        enc.tokenize(enc.media_marker, [noise(8, 8)])


def test_encode_is_fast_on_cpu(model_dir: Path, text_model) -> None:
    _, mmproj = tiny_vlm(model_dir, "pixtral")
    with VisionEncoder(str(mmproj), text_model, n_threads=2) as enc:
        chunk = image_chunks(enc.tokenize(enc.media_marker, [noise(256, 256, 11)]))[0]
        assert chunk.encode_ms < 1000, chunk.encode_ms


def test_pixtral_row_breaks_are_the_img_break_embedding(pixtral: VisionEncoder) -> None:
    # llama.cpp builds break rows as 0 * (uninitialised memory) + img_break, which is NaN
    # when that memory holds NaN bits; the encoder repairs them (see _repair_row_breaks).
    img_break = read_projector_facts(pixtral.mmproj_path).img_break
    chunk = image_chunks(pixtral.tokenize(pixtral.media_marker, [noise(64, 64, 4)]))[0]
    for row in (4, 9, 14):  # 4 columns + 1 break per row, none after the last row
        np.testing.assert_array_equal(chunk.embeddings[row], img_break)


def test_repair_row_breaks_fills_only_break_rows() -> None:
    from models.vision import _repair_row_breaks

    brk = np.arange(4, dtype=np.float32)
    emb = np.random.default_rng(0).standard_normal((11, 4)).astype(np.float32)  # 3 cols x 3 rows + 2 breaks
    emb[3] = brk
    emb[7] = np.nan
    _repair_row_breaks(emb, brk, 1.0)
    np.testing.assert_array_equal(emb[7], brk)
    other = np.random.default_rng(1).standard_normal((11, 4)).astype(np.float32)
    other[5] = np.nan  # not a break position: left for the caller to reject
    _repair_row_breaks(other, brk, 1.0)  # a 5x2 grid would fit, but not a square image
    assert np.isnan(other[5]).all()


_THREADS_AFTER_ENCODE = r"""
import os, sys, time
import numpy as np
from PIL import Image
from models import cpu_paths
from models.llama_lib import ensure_backend
from models.vision import ImageChunk, VisionEncoder

def threads():
    return len(os.listdir("/proc/self/task"))

ensure_backend()
model = cpu_paths.load_model(sys.argv[1], ())
before = threads()
with VisionEncoder(sys.argv[2], model, n_threads=2) as enc:  # warms up: a graph computed
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")
    chunks = enc.tokenize(f"look {enc.media_marker}", [img])
    assert any(isinstance(c, ImageChunk) and c.embeddings.size for c in chunks)
    # an ended thread and its team's workers leave /proc a moment after the join
    deadline = time.monotonic() + 5
    while threads() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    print(before, threads())
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_projector_warmup_and_encodes_leave_no_compute_threads_behind(model_dir: Path) -> None:
    # An OpenMP build gives each thread that computes a graph its own thread team for as
    # long as that thread lives; a second team beside the engine worker's made libgomp
    # stop spinning between operations and slowed every text decode by about a third.
    # Warm-up and encodes run on threads that end with them, so their teams go too.
    llm_path, mmproj = tiny_vlm(model_dir, "mlp")
    out = subprocess.run([sys.executable, "-c", _THREADS_AFTER_ENCODE, str(llm_path), str(mmproj)],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = map(int, out.stdout.split()[-2:])
    assert after == before, f"{after - before} thread(s) outlived the projector's warm-up and encode"
