"""CLIP-guided zoom, relevant pruning and routing through the API: tiny VLM + tiny CLIP.

Both models have random weights: answers are noise, the checks are the mechanics
(requests answered, tiles chosen, rows kept, CLIP's cost in the span).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

pytest.importorskip("open_clip", reason="needs the clip extra (make test installs it)")

from bench.tinyclip import TINY_CLIP_NAME, tiny_clip  # noqa: E402
from bench.tinymodels import tiny_vlm  # noqa: E402
from models.registry import model_id_for  # noqa: E402
from server import __version__  # noqa: E402
from telemetry import Telemetry, TelemetrySettings  # noqa: E402
from tests.conftest import LiveServer, live_server  # noqa: E402
from tests.test_vision_api import image_message, png_uri  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    llm, mmproj = tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), "pixtral")
    config, checkpoint = tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    return {"llm": llm, "mmproj": mmproj, "clip_config": config, "clip_checkpoint": checkpoint}


@pytest.fixture(scope="module")
def clip_server(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[LiveServer, Telemetry, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    tel = Telemetry(TelemetrySettings(traces_path=None, energy=False), service_version=__version__,
                    span_exporter_override=exporter)
    with live_server(tmp_path_factory.mktemp("clip-server"), telemetry=tel, model=str(files["llm"]),
                     mmproj=str(files["mmproj"]), ctx_size=4096, clip_model=TINY_CLIP_NAME,
                     clip_checkpoint=str(files["clip_checkpoint"]), clip_config=str(files["clip_config"])) as srv:
        srv.model_id = model_id_for(files["llm"])  # type: ignore[attr-defined]
        yield srv, tel, exporter


@pytest.fixture(scope="module")
def plain_server(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """No CLIP, but profiles that prefer zoom."""
    with live_server(tmp_path_factory.mktemp("plain-server"), model=str(files["llm"]),
                     mmproj=str(files["mmproj"]), ctx_size=4096, resolution_mode="zoom") as srv:
        srv.model_id = model_id_for(files["llm"])  # type: ignore[attr-defined]
        yield srv


def ask(srv: LiveServer, edgevlm: dict[str, Any], size: tuple[int, int] = (896, 672),
        text: str = "What does the gauge read?") -> Any:
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.create(
        model=srv.model_id, max_tokens=2, temperature=0,  # type: ignore[attr-defined]
        messages=[image_message(png_uri(*size, seed=7), text)], extra_body={"edgevlm": edgevlm})


def last_span(tel: Telemetry, exporter: InMemorySpanExporter) -> dict[str, Any]:
    tel.force_flush()
    spans = [s for s in exporter.get_finished_spans() if s.name.startswith("chat ")]
    return dict(spans[-1].attributes)


def test_relevant_pruning_end_to_end(clip_server) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = clip_server
    reply = ask(srv, {"prune": {"method": "relevant", "keep": 0.25}})
    assert reply.choices[0].finish_reason in ("stop", "length")
    a = last_span(tel, exporter)
    assert a["edgevlm.prune.method"] == "relevant"
    before, after = a["edgevlm.image.tokens_before"], a["edgevlm.image.tokens_after"]
    assert after == round(before * 0.25) and after < before
    assert a["edgevlm.clip.ms"] > 0  # first look at this image and prompt


def test_zoom_end_to_end(clip_server) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = clip_server
    reply = ask(srv, {"resolution": "zoom", "max_image_tokens": 64}, text="Read the serial plate.")
    assert reply.choices[0].message is not None
    a = last_span(tel, exporter)
    assert a["edgevlm.zoom.grid"] == ("4x3",) and a["edgevlm.zoom.tiles"] == (3,)  # ceil(12 / 4)
    assert a["edgevlm.clip.ms"] > 0 and a["edgevlm.middleware.resolution_mode"] == "zoom"
    # Pixtral does not tile: the image is cropped to the chosen tiles, one image part
    assert a["edgevlm.zoom.mode"] == ("crop",) and a["edgevlm.zoom.parts"] == (1,)
    # the crop of 3 tiles is encoded, not the whole 896x672 image
    w, h = (int(v) for v in a["edgevlm.image.resize.to"][0].split("x"))
    assert a["edgevlm.image.tokens_before"] > 0 and (w < 896 or h < 672)
    # same image + prompt again: CLIP's scores come from its cache
    ask(srv, {"resolution": "zoom", "max_image_tokens": 64}, text="Read the serial plate.")
    assert last_span(tel, exporter)["edgevlm.clip.ms"] == 0.0


def test_auto_detail_is_routed_by_clip_label(clip_server) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = clip_server
    ask(srv, {"profile": "balanced"}, text="Describe the scene.")
    a = last_span(tel, exporter)
    assert a["edgevlm.clip.label"][0] in {
        "a document or a page of text", "a computer screen or a display", "a label, a sign or a gauge",
        "a photo of a scene", "a photo of an object", "a plain empty surface"}


@pytest.mark.parametrize("edgevlm, param", [
    ({"resolution": "zoom"}, "edgevlm.resolution"),
    ({"prune": {"method": "relevant", "keep": 0.5}}, "edgevlm.prune"),
])
def test_clip_features_without_clip_are_a_400(plain_server: LiveServer, edgevlm: dict[str, Any],
                                              param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(plain_server, edgevlm)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["code"] == "clip_not_configured" and body["param"] == param
    assert "CLIP is not configured" in body["message"]


def test_profile_that_prefers_zoom_falls_back_to_resize(plain_server: LiveServer) -> None:
    with plain_server.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": plain_server.model_id, "max_tokens": 2,  # type: ignore[attr-defined]
            "messages": [image_message(png_uri(448, 448, seed=1), "Describe.")]})
    assert r.status_code == 200, r.text
    mw = r.json()["timings"]["middleware"]
    assert mw["resolution_mode"] == "resize" and "CLIP is not configured" in mw["zoom_fallback"]
