"""Error messages point at what the client (or the operator) has to change."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterator

import pytest

from models.registry import model_id_for
from bench.tinymodels import tiny_vlm
from server.cli import _serve_parser, _settings_from
from tests.conftest import LiveServer, chat_body, live_server
from tests.test_api_errors import assert_error
from tests.test_vision_api import image_message, png_uri


def serve_flags(*argv: str) -> dict[str, Any]:
    """Settings exactly as ``edgevlm serve ARGV`` would build them."""
    parser = argparse.ArgumentParser()
    _serve_parser(parser.add_subparsers())
    return _settings_from(parser.parse_args(["serve", *argv])).model_dump()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A tiny VLM served with no file:// directory allowed and a 16-token image cap."""
    llm, mmproj = tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), "pixtral")
    settings = serve_flags("--model", str(llm), "--mmproj", str(mmproj), "--image-max-tokens", "16",
                           "--ctx-size", "2048")
    settings["traces"] = str(tmp_path_factory.mktemp("traces") / "t.jsonl")
    settings["energy"] = False
    with live_server(tmp_path_factory.mktemp("vlm"), **settings) as srv:
        srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        yield srv


def test_bad_detail_names_the_field_and_its_values(server) -> None:  # type: ignore[no-untyped-def]
    body = chat_body("hi")
    body["messages"] = [image_message(png_uri(8, 8), detail="ultra")]
    with server.client() as c:
        err = assert_error(c.post("/v1/chat/completions", json=body), 400,
                           param="messages.0.content.1.image_url.detail")
    assert "'auto', 'low' or 'high'" in err["message"]


def test_body_without_json_content_type_says_so(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        raw = json.dumps(chat_body("hi")).encode()
        for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):  # curl -d
            err = assert_error(c.post("/v1/chat/completions", content=raw, headers=headers), 400,
                               code="invalid_content_type")
            assert "Content-Type: application/json" in err["message"]
        err = assert_error(c.post("/v1/chat/completions", json=[1, 2]), 400)
        assert "must be a JSON object" in err["message"]


def test_prune_without_method_uses_the_default_method(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        ok = c.post("/v1/chat/completions", json=chat_body("hi", max_tokens=2, edgevlm={"prune": {"keep": 0.5}}))
        assert ok.status_code == 200, ok.text
        bad = c.post("/v1/chat/completions", json=chat_body("hi", edgevlm={"prune": {"keep": 0}}))
        err = assert_error(bad, 400, param="edgevlm.prune.keep")
        assert err["message"] == "Invalid value for 'edgevlm.prune.keep': keep count must be >= 1"


def test_file_url_without_allowed_dir_names_the_flag(vlm: LiveServer, tmp_path: Path) -> None:
    with vlm.client() as c:
        for url, hint in ((f"file://{tmp_path}/cat.png", "--allow-file-dir"),
                          (f"{tmp_path}/cat.png", "file://"), (f"{tmp_path}/cat.png", "data:")):
            body = {"model": vlm.model_id, "max_tokens": 2,  # type: ignore[attr-defined]
                    "messages": [image_message(url)]}
            err = assert_error(c.post("/v1/chat/completions", json=body), 400, code="unsupported_image_source")
            assert hint in err["message"], err["message"]
        bare = {"model": vlm.model_id, "messages": [image_message(f"{tmp_path}/cat.png")]}  # type: ignore[attr-defined]
        assert "bare file path" in c.post("/v1/chat/completions", json=bare).json()["error"]["message"]


def test_image_max_tokens_flag_caps_the_model(vlm: LiveServer) -> None:
    body = {"model": vlm.model_id, "max_tokens": 2,  # type: ignore[attr-defined]
            "messages": [image_message(png_uri(256, 256), detail="high")]}
    with vlm.client() as c:
        resp = c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.text
    image = resp.json()["timings"]["images"][0]
    # Without the flag the model's cap is 1024 and this image is encoded whole (271 tokens).
    assert image["budget_tokens"] == 16, image
    assert (image["encoded_width"], image["encoded_height"]) == (64, 64), image
    assert image["tokens_before"] < 32, image  # 16 patches plus pixtral's row breaks


def test_image_token_flags_need_model(tmp_path: Path) -> None:
    from models.registry import ConfigError
    from server.app import registry_from
    from server.settings import Settings

    with pytest.raises(ConfigError, match="--image-min-tokens apply to --model"):
        registry_from(Settings(image_min_tokens=64))


def test_unknown_fields_are_ignored_but_unhonoured_known_ones_refused(server) -> None:  # type: ignore[no-untyped-def]
    with server.client() as c:
        newer = chat_body("hi", max_tokens=2, store=True, metadata={"app": "x"}, service_tier="auto")
        assert c.post("/v1/chat/completions", json=newer).status_code == 200
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", n=2)), 400, param="n")
        assert_error(c.post("/v1/chat/completions", json=chat_body("hi", edgevlm={"profle": "fast"})), 400,
                     param="edgevlm.profle")
