"""M-RoPE (Qwen2-VL family): a tiny qwen2vl text model + qwen2vl_merger projector end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import llama_cpp
import numpy as np
import openai
import pytest
from PIL import Image

from models.engine import Engine, EngineConfig
from models.reduce import positions_mrope, prune
from models.registry import model_id_for
from bench.tinymodels import tiny_vlm
from models.vision import ImageChunk, TextChunk, VisionEncoder
from tests.conftest import LiveServer, live_server
from tests.test_vision_api import check_second_turn_reuses_the_image_prefix, image_message, images_of, png_uri


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    # attn_std=0.3: attention strong enough that wrong positions change greedy outputs
    return tiny_vlm(tmp_path_factory.mktemp("tiny-qwen2vl"), "qwen2vl", llm={"attn_std": 0.3})


@pytest.fixture(scope="module")
def engine(qwen_files) -> Iterator[Engine]:
    llm, mmproj = qwen_files
    eng = Engine(EngineConfig(model_id="tiny-qwen2vl", path=str(llm), n_ctx=1024, n_parallel=2,
                              n_batch=64, mmproj_path=str(mmproj)))
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(scope="module")
def encoder(engine: Engine, qwen_files) -> Iterator[VisionEncoder]:
    enc = VisionEncoder(str(qwen_files[1]), engine.model, n_threads=2)
    try:
        yield enc
    finally:
        enc.close()


@pytest.fixture(scope="module")
def srv(qwen_files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    llm, mmproj = qwen_files
    with live_server(tmp_path_factory.mktemp("qwen-server"), model=str(llm), mmproj=str(mmproj),
                     ctx_size=2048, parallel=2) as server:
        server.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        yield server


@pytest.fixture
def client(srv: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_tiny_qwen2vl_is_an_mrope_model(engine: Engine, encoder: VisionEncoder) -> None:
    assert llama_cpp.llama_model_rope_type(engine.model) == llama_cpp.LLAMA_ROPE_TYPE_MROPE
    assert engine.mrope
    assert encoder.uses_mrope and not encoder.uses_non_causal
    assert encoder.projector.projector_type == "qwen2vl_merger"
    assert encoder.projector.align == 16


def test_image_chunk_positions_are_the_t_y_x_grid(encoder: VisionEncoder) -> None:
    chunks = encoder.tokenize(f"look {encoder.media_marker} now", [_image(80, 48)])
    img = next(c for c in chunks if isinstance(c, ImageChunk))
    nx, ny = 80 // 16, 48 // 16
    assert img.n_tokens == nx * ny and img.n_pos == max(nx, ny)
    pos = img.positions
    assert pos is not None and pos.dtype == np.int32 and pos.shape == (4, nx * ny)
    i = np.arange(nx * ny)
    assert (pos[0] == 0).all() and (pos[3] == 0).all()
    assert (pos[1] == i // nx).all() and (pos[2] == i % nx).all()
    # from the embedding cache: the same positions
    again = next(c for c in encoder.tokenize(encoder.media_marker, [_image(80, 48)]) if isinstance(c, ImageChunk))
    assert again.cache_hit and np.array_equal(again.positions, pos)
    # pruning keeps the original positions of the kept rows
    res = prune(img.embeddings, 0.5, "uniform")
    kept = positions_mrope(pos, res.indices)
    assert np.array_equal(kept, pos[:, res.indices])


def _generate(engine: Engine, segments: list[Any], max_tokens: int = 8) -> tuple[str, Any]:
    import threading

    from models.engine import Failed, Finished, GenerationRequest, TextDelta
    from models.sampling import SamplingParams
    from telemetry.record import RequestRecord

    done = threading.Event()
    parts: list[str] = []
    errors: list[Exception] = []

    def sink(ev: Any) -> None:
        if isinstance(ev, TextDelta):
            parts.append(ev.text)
        elif isinstance(ev, Failed):
            errors.append(ev.error)
            done.set()
        elif isinstance(ev, Finished):
            ended.append(ev)
            done.set()

    ended: list[Finished] = []
    req = GenerationRequest(segments=segments, sampling=SamplingParams(temperature=0.0), max_tokens=max_tokens,
                            ignore_eos=True)
    engine.submit(req, sink, max_queue=8)
    assert done.wait(120)
    rec = RequestRecord(operation="chat", model=engine.info)
    if ended:
        ended[0].figures.fill(rec)
    if errors:
        raise errors[0]
    return "".join(parts), rec


def _segments(encoder: VisionEncoder, engine: Engine, prompt: str, images: list[Image.Image],
              keep: float | None = None) -> list[Any]:
    from models.engine import ImageSegment

    segs: list[Any] = []
    for c in encoder.tokenize(prompt, images):
        if isinstance(c, TextChunk):
            segs.append(list(c.tokens))
            continue
        emb, pos = c.embeddings, c.positions
        if keep is not None:
            res = prune(emb, keep, "uniform")
            emb, pos = res.embeddings, positions_mrope(pos, res.indices)
        segs.append(ImageSegment(embeddings=emb, key=f"{c.image_hash}:{keep}", positions=pos, n_pos=c.n_pos))
    return segs


def _reference(engine: Engine, encoder: VisionEncoder, prompt: str, images: list[Image.Image],
               max_tokens: int = 8) -> list[int]:
    """Greedy tokens from llama.cpp's own mtmd_helper_eval_chunks on a fresh context."""
    import ctypes

    from llama_cpp import mtmd_cpp as mtmd

    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = 1024
    cparams.n_batch = 64
    cparams.n_ubatch = 64
    cparams.n_threads = cparams.n_threads_batch = 2
    ctx = llama_cpp.llama_init_from_model(engine.model, cparams)
    arrays = [np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8)) for im in images]
    chunks = encoder._run_tokenize(prompt.encode(), arrays, [(a.shape[1], a.shape[0]) for a in arrays],
                                   [None] * len(arrays), True)
    try:
        new_past = llama_cpp.llama_pos(0)
        rc = mtmd.mtmd_helper_eval_chunks(encoder._ctx, ctx, chunks, 0, 0, 64, True, ctypes.byref(new_past))
        assert rc == 0
        n_past = new_past.value
        vocab = engine.vocab
        out: list[int] = []
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        for _ in range(max_tokens):
            logits = llama_cpp.llama_get_logits_ith(ctx, -1)
            row = np.ctypeslib.as_array(logits, shape=(llama_cpp.llama_vocab_n_tokens(vocab),))
            tok = int(np.argmax(row))
            out.append(tok)
            batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = tok, n_past, 1, True
            batch.seq_id[0][0] = 0
            batch.n_tokens = 1
            assert llama_cpp.llama_decode(ctx, batch) == 0
            n_past += 1
        llama_cpp.llama_batch_free(batch)
        return out
    finally:
        mtmd.mtmd_input_chunks_free(chunks)
        llama_cpp.llama_free(ctx)


def test_engine_matches_llama_cpp_mtmd_helper(engine: Engine, encoder: VisionEncoder) -> None:
    """Greedy output of the engine's own M-RoPE prefill equals libmtmd's reference prefill."""
    prompt = f"describe {encoder.media_marker} and then {encoder.media_marker} briefly"
    images = [_image(96, 48, seed=1), _image(32, 80, seed=2)]
    ref = _reference(engine, encoder, prompt, images)
    text, rec = _generate(engine, _segments(encoder, engine, prompt, images))
    assert text == engine.detokenize(ref)
    # a second run of the same request reuses the whole prefix except the last item
    text2, rec2 = _generate(engine, _segments(encoder, engine, prompt, images))
    assert text2 == text
    assert rec2.cached_tokens == rec2.input_tokens - 1


def test_engine_output_depends_on_mrope_positions(engine: Engine, encoder: VisionEncoder) -> None:
    """Guards the test above: 1-D positions or a wrong n_pos give a different output here."""
    from models.engine import ImageSegment

    prompt = f"describe {encoder.media_marker} and then {encoder.media_marker} briefly"
    images = [_image(96, 48, seed=1), _image(32, 80, seed=2)]
    segs = _segments(encoder, engine, prompt, images)
    good, _ = _generate(engine, segs)
    flat = [ImageSegment(s.embeddings, s.key + ":1d") if isinstance(s, ImageSegment) else s for s in segs]
    assert _generate(engine, flat)[0] != good


def test_server_pruning_keeps_original_positions(encoder: VisionEncoder) -> None:
    from server.images import _encode_and_prune
    from server.policy.pruning import PruneDecision

    chunks, pruned = _encode_and_prune(encoder, f"x {encoder.media_marker}", [_image(128, 64, seed=5)],
                                       [PruneDecision("uniform", 0.5, "request")])
    img = next(c for c in chunks if isinstance(c, ImageChunk))
    emb, method, _, pos = pruned[img.index, img.part]
    assert method == "uniform" and emb.shape[0] == 16
    idx = prune(img.embeddings, 0.5, "uniform").indices
    assert np.array_equal(pos, img.positions[:, idx])
    assert (pos[1:3] != np.stack([np.arange(16) // 8, np.arange(16) % 8])).any()  # not renumbered


def test_engine_prefix_reuse_after_an_image_matches_cold(engine: Engine, encoder: VisionEncoder) -> None:
    prompt = f"a {encoder.media_marker} b"
    images = [_image(64, 64, seed=3)]
    base = _segments(encoder, engine, prompt, images)
    _generate(engine, base)
    follow = base + [engine.tokenize(" and more words here", add_special=False)]
    warm_text, warm = _generate(engine, follow)
    assert warm.cached_tokens >= sum(len(s) if isinstance(s, list) else s.n_tokens for s in base) - 1
    ref = _reference(engine, encoder, prompt + " and more words here", images)
    assert warm_text == engine.detokenize(ref)


def test_chat_with_an_image(srv: LiveServer, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(model=srv.model_id, messages=[image_message(png_uri(96, 64, seed=1))],
                                          max_tokens=4, temperature=0)
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens >= 1
    im = images_of(resp)[0]
    assert im["tokens_before"] == (96 // 16) * (64 // 16) == im["tokens_after"]


def test_pruned_request_keeps_original_positions(srv: LiveServer, client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=srv.model_id, messages=[image_message(png_uri(128, 64, seed=2))], max_tokens=4, temperature=0,
        extra_body={"edgevlm": {"prune": {"method": "uniform", "keep": 0.5}}})
    im = images_of(resp)[0]
    assert im["prune_method"] == "uniform"
    assert im["tokens_before"] == 32 and im["tokens_after"] == 16
    assert resp.usage.completion_tokens >= 1


def test_second_turn_reuses_the_image_prefix(srv: LiveServer, client: openai.OpenAI) -> None:
    check_second_turn_reuses_the_image_prefix(client, srv.model_id)


def test_parked_image_cache_restores_with_its_mrope_positions(engine: Engine, encoder: VisionEncoder) -> None:
    from models.engine import PARK_MIN_PREFILL

    prompt = f"a {encoder.media_marker} b"
    images = [_image(64, 64, seed=3)]
    base = _segments(encoder, engine, prompt, images)
    _, first = _generate(engine, base)
    # an unrelated long prompt takes the other slot and parks this one in host RAM
    _, other = _generate(engine, [engine.tokenize("river " * (PARK_MIN_PREFILL + 20))], max_tokens=2)
    assert other.slot != first.slot
    follow = base + [engine.tokenize(" and more words here", add_special=False)]
    warm_text, warm = _generate(engine, follow)
    assert warm.restored_tokens > 0
    assert warm.cached_tokens >= sum(len(s) if isinstance(s, list) else s.n_tokens for s in base) - 1
    ref = _reference(engine, encoder, prompt + " and more words here", images)
    assert warm_text == engine.detokenize(ref)


def test_a_photo_cached_in_another_slot_is_shared_with_its_mrope_positions(
        qwen_files, engine: Engine, encoder: VisionEncoder) -> None:
    llm, mmproj = qwen_files
    eng = Engine(EngineConfig(model_id="tiny-qwen2vl", path=str(llm), n_ctx=1024, n_parallel=2,
                              n_batch=64, mmproj_path=str(mmproj)))
    images = [_image(64, 48, seed=4)]
    try:
        _, first = _generate(eng, _segments(encoder, eng, f"look {encoder.media_marker} what is wrong here", images))
        # a second operator asks about the same photo: an empty slot takes the photo's rows
        # (and the positions M-RoPE gave them) from the first operator's cache
        prompt = f"look {encoder.media_marker} is the guard on"
        segs = _segments(encoder, eng, prompt, images)
        text, second = _generate(eng, segs)
        n_image = next(s.n_tokens for s in segs if not isinstance(s, list))
        assert second.slot != first.slot
        assert second.shared_tokens == second.cached_tokens >= n_image + 1
        assert second.prefilled_tokens == second.input_tokens - second.shared_tokens
        assert text == eng.detokenize(_reference(eng, encoder, prompt, images))
    finally:
        eng.close()


def test_a_photo_asked_about_again_after_other_conversations_comes_back_from_ram(
        qwen_files, encoder: VisionEncoder) -> None:
    llm, mmproj = qwen_files
    eng = Engine(EngineConfig(model_id="tiny-qwen2vl", path=str(llm), n_ctx=1024, n_parallel=2,
                              n_batch=64, mmproj_path=str(mmproj)))
    images = [_image(64, 48, seed=5)]
    prompt = f"look at {encoder.media_marker} and check " + "the guard and the belt " * 6
    try:
        base = _segments(encoder, eng, prompt, images)
        _, first = _generate(eng, base)
        for i in range(3):  # both slots go to other conversations meanwhile
            _generate(eng, [eng.tokenize(f"shift {i} " + "log the stop " * 12)], max_tokens=4)
        follow = base + [eng.tokenize(" is it safe", add_special=False)]
        text, warm = _generate(eng, follow)
        n_base = sum(len(s) if isinstance(s, list) else s.n_tokens for s in base)
        assert warm.restored_tokens > 0
        assert warm.cached_tokens >= n_base - 1  # the photo's rows and their M-RoPE positions came back
        assert text == eng.detokenize(_reference(eng, encoder, prompt + " is it safe", images))
    finally:
        eng.close()
