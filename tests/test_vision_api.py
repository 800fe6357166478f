"""Images through the OpenAI API: a tiny random-weight VLM behind a real server."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from models.registry import model_id_for
from bench.tinymodels import tiny_vlm
from tests.conftest import LiveServer, live_server


def png_uri(width: int, height: int, seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(width, height, seed)).decode()


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def image_message(url: str, text: str = "What is in this image?", detail: str = "auto") -> dict[str, Any]:
    return {"role": "user", "content": [{"type": "text", "text": text},
                                        {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}


@pytest.fixture(scope="module")
def vlm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("tiny-vlm")
    llm, pixtral = tiny_vlm(d, "pixtral")
    _, mlp = tiny_vlm(d, "mlp")
    return llm, pixtral, mlp


@pytest.fixture(scope="module")
def vlm(vlm_files, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    llm, pixtral, _ = vlm_files
    allowed = tmp_path_factory.mktemp("allowed")
    with live_server(tmp_path_factory.mktemp("vlm-server"), model=str(llm), mmproj=str(pixtral),
                     ctx_size=4096, max_images=2, allow_file_dirs=[str(allowed)]) as srv:
        srv.allowed_dir = allowed  # type: ignore[attr-defined]
        srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        yield srv


@pytest.fixture
def client(vlm: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=vlm.base_url + "/v1", api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, model: str, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                          extra_body=extra or None)


def images_of(resp: Any) -> list[dict[str, Any]]:
    return resp.model_extra["timings"]["images"]


def test_chat_with_an_image_counts_image_tokens(vlm: LiveServer, client: openai.OpenAI) -> None:
    text_only = client.chat.completions.create(
        model=vlm.model_id, messages=[{"role": "user", "content": "What is in this image?"}], max_tokens=4)
    resp = ask(client, vlm.model_id, [image_message(png_uri(96, 64, seed=1))])
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens >= 1
    im = images_of(resp)[0]
    assert im["tokens_after"] > 0 and im["source_width"] == 96 and im["source_height"] == 64
    assert resp.usage.prompt_tokens >= text_only.usage.prompt_tokens + im["tokens_after"] - 2


def test_image_size_changes_token_count(vlm: LiveServer, client: openai.OpenAI) -> None:
    small = images_of(ask(client, vlm.model_id, [image_message(png_uri(64, 64, seed=2))]))[0]
    large = images_of(ask(client, vlm.model_id, [image_message(png_uri(192, 160, seed=2))]))[0]
    assert large["tokens_before"] > small["tokens_before"]


def test_identical_image_hits_the_embedding_cache(vlm: LiveServer, client: openai.OpenAI) -> None:
    url = png_uri(160, 128, seed=3)
    first = images_of(ask(client, vlm.model_id, [image_message(url)]))[0]
    again = images_of(ask(client, vlm.model_id, [image_message(url, "Describe it.")]))[0]
    assert first["cache_hit"] is False and first["encode_ms"] > 0
    assert again["cache_hit"] is True and again["encode_ms"] < 0.5
    # a different resolution of the same picture is a different encoder input: a miss
    smaller = images_of(ask(client, vlm.model_id, [image_message(url)], edgevlm={"max_image_tokens": 20}))[0]
    assert smaller["cache_hit"] is False
    assert (smaller["encoded_width"], smaller["encoded_height"]) != (first["encoded_width"], first["encoded_height"])


def check_second_turn_reuses_the_image_prefix(client: openai.OpenAI, model_id: str) -> None:
    """A follow-up about the same photo: no encode, only the new text prefilled."""
    turn1 = [image_message(png_uri(128, 96, seed=4))]
    r1 = ask(client, model_id, turn1)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content or "ok"},
                     {"role": "user", "content": "And the colours?"}]
    r2 = ask(client, model_id, turn2)
    im = images_of(r2)[0]
    t = r2.model_extra["timings"]
    assert im["cache_hit"] is True
    assert t["prompt_cached_tokens"] >= r1.usage.prompt_tokens - 1  # text + image rows of turn 1
    assert t["prompt_prefilled_tokens"] == r2.usage.prompt_tokens - t["prompt_cached_tokens"]
    assert t["prompt_prefilled_tokens"] < im["tokens_after"]


def test_second_turn_reuses_the_image_prefix(vlm: LiveServer, client: openai.OpenAI) -> None:
    check_second_turn_reuses_the_image_prefix(client, vlm.model_id)


def _truncated_png() -> bytes:
    return png_bytes(64, 64, seed=5)[:200]


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "TIFF")
    return buf.getvalue()


def _bomb_png() -> bytes:
    """A tiny PNG whose header claims 20000 x 20000 pixels (400 MP)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b"")


def _data(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


BAD_IMAGES = {
    "corrupt": (_data(b"this is not an image at all"), None),
    "truncated": (_data(_truncated_png()), None),
    "tiff": (_data(_tiff(), "image/tiff"), "unsupported_image_format"),
    "svg": (_data(b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', "image/svg+xml"),
            "unsupported_image_format"),
    "zero_bytes": ("data:image/png;base64,", "empty_image"),
    "bomb": (_data(_bomb_png()), "image_too_large"),
    "file_outside_allow_list": ("file:///etc/hostname", "unsupported_image_source"),
    "http_refused": ("http://127.0.0.1:9/cat.png", "unsupported_image_source"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_are_400_naming_problem_and_index(vlm: LiveServer, case: str) -> None:
    url, code = BAD_IMAGES[case]
    good = {"type": "image_url", "image_url": {"url": png_uri(32, 32)}}
    bad = {"type": "image_url", "image_url": {"url": url}}
    body = {"model": vlm.model_id, "max_tokens": 2,
            "messages": [{"role": "user", "content": [good, {"type": "text", "text": "hi"}, bad]}]}
    with vlm.client() as c:
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == "messages"
        assert "image 1" in err["message"]
        if code:
            assert err["code"] == code
        # the server keeps serving
        ok = c.post("/v1/chat/completions", json={"model": vlm.model_id, "max_tokens": 2,
                                                   "messages": [image_message(png_uri(32, 32))]})
        assert ok.status_code == 200


def test_too_many_images_is_400(vlm: LiveServer) -> None:
    parts = [{"type": "image_url", "image_url": {"url": png_uri(32, 32, seed=i)}} for i in range(3)]
    with vlm.client() as c:
        r = c.post("/v1/chat/completions", json={"model": vlm.model_id, "max_tokens": 2,
                                                  "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "too_many_images" and "3" in r.json()["error"]["message"]


def test_file_url_inside_allow_list_is_read(vlm: LiveServer, client: openai.OpenAI) -> None:
    path = vlm.allowed_dir / "ok.png"  # type: ignore[attr-defined]
    path.write_bytes(png_bytes(48, 48, seed=6))
    im = images_of(ask(client, vlm.model_id, [image_message(path.as_uri())]))[0]
    assert im["source_width"] == 48


def test_mlp_fixed_projector(vlm_files, tmp_path: Path) -> None:
    llm, _, mlp = vlm_files
    with live_server(tmp_path, model=str(llm), mmproj=str(mlp), ctx_size=2048) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
        a = images_of(ask(client, model_id_for(llm), [image_message(png_uri(64, 64, seed=7))]))[0]
        b = images_of(ask(client, model_id_for(llm), [image_message(png_uri(200, 120, seed=7))]))[0]
        assert a["tokens_before"] == b["tokens_before"] == 64  # fixed: size does not matter
        assert "fixed projector" in b["resize_note"]
        pruned = images_of(ask(client, model_id_for(llm), [image_message(png_uri(64, 64, seed=8))],
                               edgevlm={"prune": {"method": "uniform", "keep": 0.5}}))[0]
        assert pruned["tokens_after"] == 32


def test_bad_images_do_not_grow_memory(vlm: LiveServer) -> None:
    import psutil

    bodies = [{"model": vlm.model_id, "max_tokens": 1,
               "messages": [image_message(_data(raw))]} for raw in (_bomb_png(), _truncated_png())]
    proc = psutil.Process()  # the live server runs in this process
    with vlm.client() as c:
        for body in bodies * 3:  # warm up allocator pools
            assert c.post("/v1/chat/completions", json=body).status_code == 400
        before = proc.memory_info().rss
        for body in bodies * 25:
            assert c.post("/v1/chat/completions", json=body).status_code == 400
        after = proc.memory_info().rss
    # A decoded 20000 x 20000 bomb alone would be 1.2 GB; a per-request leak of even
    # 1 MB would show as 50 MB here.
    assert after - before < 32 * 2**20, (before, after)


def test_literal_media_marker_in_text_is_harmless(vlm: LiveServer, client: openai.OpenAI) -> None:
    marker = "<__media__>"
    resp = ask(client, vlm.model_id, [image_message(png_uri(64, 64, seed=9), f"What is {marker} this {marker}?")])
    assert resp.choices[0].message.content is not None
    assert len(images_of(resp)) == 1


def test_long_chat_truncation_counts_image_tokens(vlm_files, tmp_path) -> None:  # type: ignore[no-untyped-def]
    llm, pixtral, _ = vlm_files
    with live_server(tmp_path, model=str(llm), mmproj=str(pixtral), ctx_size=1024) as srv:
        history: list[dict[str, Any]] = []
        for i in range(3):  # each old turn carries a ~600-token image
            history.append(image_message(png_uri(384, 384, seed=20 + i), f"Turn {i}: what is this?"))
            history.append({"role": "assistant", "content": "A picture."})
        history.append(image_message(png_uri(64, 64, seed=30), "And this one?"))
        body = {"model": model_id_for(llm), "messages": history, "max_tokens": 2, "temperature": 0,
                "edgevlm": {"truncate": True}}
        with srv.client() as c:
            r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        t = r.json()["timings"]
        assert t["dropped_tokens"] > 0
        assert len(t["images"]) < 4  # images of dropped turns went with them
        assert r.json()["usage"]["prompt_tokens"] < 1024


def test_image_for_a_text_only_model_is_refused_before_loading_it(vlm_files, tiny_llm: Path,
                                                                   tmp_path: Path) -> None:
    llm, pixtral, _ = vlm_files
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "vlm"\npath = "{llm}"\nmmproj = "{pixtral}"\n\n'
                      f'[[models]]\nid = "text"\npath = "{tiny_llm}"\n')
    with live_server(tmp_path, config=str(config)) as srv:
        registry = srv.app.state.registry
        with srv.client() as c:
            r = c.post("/v1/chat/completions", json={"model": "text", "max_tokens": 2,
                                                     "messages": [image_message(png_uri(32, 32))]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_multimodal"
            assert not registry.is_loaded("text")  # refused from its spec: nothing was loaded
            ok = c.post("/v1/chat/completions", json={"model": "text", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
            assert ok.status_code == 200 and registry.is_loaded("text")


def test_elongated_strip_within_the_limit_is_read_and_errors_name_the_sent_size(
        vlm: LiveServer, client: openai.OpenAI) -> None:
    from models.vision import MAX_ASPECT_RATIO

    # 200:1, the documented limit: aligning 20 px down to the grid must not push it over.
    im = images_of(ask(client, vlm.model_id, [image_message(png_uri(4000, 20, seed=60))]))[0]
    assert (im["source_width"], im["source_height"]) == (4000, 20)
    assert im["encoded_width"] <= MAX_ASPECT_RATIO * im["encoded_height"] and im["tokens_after"] > 0
    with vlm.client() as c:
        r = c.post("/v1/chat/completions", json={"model": vlm.model_id, "max_tokens": 2,
                                                  "messages": [image_message(png_uri(4000, 10, seed=61))]})
    assert r.status_code == 400
    assert "image 0 is 4000x10" in r.json()["error"]["message"]  # as sent, not as resized
