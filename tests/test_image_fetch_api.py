"""http(s) image URLs over the wire: private addresses need the operator's say-so (SSRF)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.registry import model_id_for
from bench.tinymodels import tiny_vlm
from tests.test_api_errors import assert_error
from tests.test_images import image_server  # noqa: F401  (fixture)
from tests.test_vision_api import image_message


@pytest.fixture(scope="module")
def vlm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    llm, mmproj = tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), "pixtral")
    return str(llm), str(mmproj)


def ask(srv: Any, model: str, url: str) -> Any:
    with srv.client() as c:
        return c.post("/v1/chat/completions", json={"model": model, "max_tokens": 2,
                                                    "messages": [image_message(url)]})


def test_listed_host_serves_images_and_redirects_are_checked(make_server, vlm_files, image_server) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    llm, mmproj = vlm_files
    srv = make_server(model=llm, mmproj=mmproj, ctx_size=2048, allow_http_images=True,
                      allow_image_hosts=["127.0.0.1"])
    model = model_id_for(Path(llm))
    ok = ask(srv, model, f"{image_server}/ok.png")
    assert ok.status_code == 200, ok.text
    assert ok.json()["timings"]["images"][0]["source_width"] == 32
    for to in ("http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/cat.png"):
        err = assert_error(ask(srv, model, f"{image_server}/redirect?to={to}"), 400, code="image_host_refused")
        assert to.split("/")[2] in err["message"] and "--allow-image-host" in err["message"]


def test_loopback_is_refused_unless_listed(make_server, vlm_files, image_server) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    llm, mmproj = vlm_files
    srv = make_server(model=llm, mmproj=mmproj, ctx_size=2048, allow_http_images=True)
    err = assert_error(ask(srv, model_id_for(Path(llm)), f"{image_server}/ok.png"), 400, code="image_host_refused")
    assert "127.0.0.1" in err["message"] and "loopback" in err["message"]
