"""Prompt-aware zoom on a tiling projector: overview + relevant tiles as separate image parts.

A tiling projector (here LLaVA-1.6 style: ``mlp`` with grid pinpoints) has libmtmd
encode an image as an overview plus fixed-size tiles. Zoom then sends the overview
and the tiles CLIP found relevant as the image parts; every other projector gets the
crop to the relevant tiles' bounding box (tests/test_clip_api.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import llama_cpp
import numpy as np
import openai
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from PIL import Image

from bench.tinymodels import tiny_vlm
from models import cpu_paths
from models.llama_lib import ensure_backend
from models.reduce import relevance_for_tokens
from models.vision import ImageChunk, VisionEncoder
from server.images import _token_grid
from server.policy.pruning import PruneDecision
from server.policy.zoom import decide_zoom, zoom_parts
from tests.conftest import LiveServer, live_server
from tests.test_vision_api import image_message, png_uri

# 64 px tiles of 64 tokens (8 px patches); grids up to 3 x 3 tiles.
PINPOINTS = [128, 128, 192, 128, 128, 192, 192, 192]
TILING = {"grid_pinpoints": PINPOINTS}


def stub_scores() -> np.ndarray:
    """What a scorer would return for a 4 x 3 grid: tiles 11, 6 and 1 stand out, in that order."""
    scores = np.zeros((3, 4))
    scores[2, 3], scores[1, 2], scores[0, 1] = 0.9, 0.8, 0.7
    return scores


def test_tiling_projector_gets_overview_plus_best_tiles_in_reading_order() -> None:
    z = decide_zoom(stub_scores(), 400, 300, share=3 / 12)
    assert z.tiles == (1, 6, 11) and z.ranked == (11, 6, 1)
    # 192 tokens at 64 per part: the overview and the two best tiles, sent in reading order
    parts = zoom_parts(z, tiling=True, budget_tokens=192, part_tokens=64)
    assert parts.mode == "tiles" and parts.tiles == (6, 11)
    assert parts.boxes == ((0, 0, 400, 300), (200, 100, 300, 200), (300, 200, 400, 300))
    # a larger budget sends every chosen tile, never more
    assert zoom_parts(z, tiling=True, budget_tokens=1024, part_tokens=64).tiles == (1, 6, 11)
    # below two parts only the overview goes
    low = zoom_parts(z, tiling=True, budget_tokens=100, part_tokens=64)
    assert low.boxes == ((0, 0, 400, 300),) and low.tiles == ()
    # an image no larger than one projector tile is already at full resolution in the overview
    small = zoom_parts(z, tiling=True, budget_tokens=1024, part_tokens=64, part_px=400)
    assert small.boxes == ((0, 0, 400, 300),) and "fits one 400 px" in small.reason


def test_other_projectors_get_the_crop_to_the_relevant_tiles() -> None:
    z = decide_zoom(stub_scores(), 400, 300, share=3 / 12)
    parts = zoom_parts(z, tiling=False, budget_tokens=192, part_tokens=None)
    assert parts.mode == "crop" and parts.tiles == (1, 6, 11)
    assert parts.boxes == ((100, 0, 400, 300),)  # bounding box of columns 1..3, rows 0..2
    with pytest.raises(ValueError, match="tokens per part"):
        zoom_parts(z, tiling=True, budget_tokens=192, part_tokens=None)


@pytest.mark.parametrize("keep, sizes, want", [
    (0.25, [64, 64, 64], [16, 16, 16]),
    (0.5, [64, 32], [32, 16]),
    (7, [64, 64, 64], [3, 2, 2]),  # exactly 7 rows; the remainder goes to the earlier part
    (2, [64, 64, 64], [1, 1, 1]),  # every part keeps a row
    (1.0, [64, 64], [64, 64]),
])
def test_one_images_kept_rows_are_shared_exactly_over_its_parts(keep: float | int, sizes: list[int],
                                                                  want: list[int]) -> None:
    d = PruneDecision("diverse", keep)
    got = d.keep_for_parts(sizes)
    assert got == want
    assert sum(got) == max(d.keep_for(sum(sizes)), len(sizes))
    assert d.keep_for_parts([64]) == [d.keep_for(64)]  # a whole image is pruned as before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-vlms")


@pytest.fixture(scope="module")
def text_model(model_dir: Path) -> Iterator[Any]:
    ensure_backend()
    llm, _ = tiny_vlm(model_dir, "mlp", mmproj=TILING)
    model = cpu_paths.load_model(str(llm), ())
    assert model
    yield model
    llama_cpp.llama_model_free(model)


def test_tiling_is_probed_from_what_libmtmd_does(model_dir: Path, text_model: Any) -> None:
    facts = {}
    for name, kind, extra in (("tiling", "mlp", TILING), ("fixed", "mlp", None), ("pixtral", "pixtral", None)):
        _, path = tiny_vlm(model_dir, kind, mmproj=extra)  # type: ignore[arg-type]
        with VisionEncoder(str(path), text_model, n_threads=1, warmup=False) as enc:
            facts[name] = enc.projector
    assert facts["tiling"].tiling and facts["tiling"].tile_tokens == 64
    assert facts["tiling"].projector_type == facts["fixed"].projector_type == "mlp"
    assert not facts["fixed"].tiling and facts["fixed"].tile_tokens is None
    assert not facts["pixtral"].tiling


def test_relevance_maps_onto_the_encoded_grid_not_libmtmds_flat_count(model_dir: Path, text_model: Any) -> None:
    """libmtmd reports nx = n_tokens, ny = 1 for non-M-RoPE projectors: no 2-D grid to map onto."""
    _, path = tiny_vlm(model_dir, "pixtral")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    with VisionEncoder(str(path), text_model, n_threads=1, warmup=False) as enc:
        chunk = next(c for c in enc.tokenize(enc.media_marker, [img]) if isinstance(c, ImageChunk))
        align = enc.projector.align
    assert (chunk.nx, chunk.ny, chunk.n_tokens) == (27, 1, 27)  # 6 x 4 cells + 3 row breaks
    nx, ny = _token_grid(chunk, align, square=False)
    assert (nx, ny) == (6, 4)
    rel = relevance_for_tokens(np.array([[0.0, 0.0], [1.0, 1.0]]), nx, ny, chunk.n_tokens)  # bottom half
    assert rel[:14].max() == 0.0 and rel[14:].min() == 1.0  # rows 2 and 3 (7 tokens each, less the last break)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiling_server(tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[tuple[LiveServer, Any, InMemorySpanExporter]]:
    pytest.importorskip("open_clip", reason="needs the clip extra (make test installs it)")
    from bench.tinyclip import TINY_CLIP_NAME, tiny_clip
    from models.registry import model_id_for
    from server import __version__
    from telemetry import Telemetry, TelemetrySettings

    llm, mmproj = tiny_vlm(tmp_path_factory.mktemp("tiny-tiling-vlm"), "mlp", mmproj=TILING)
    config, checkpoint = tiny_clip(tmp_path_factory.mktemp("tiny-clip"))
    exporter = InMemorySpanExporter()
    tel = Telemetry(TelemetrySettings(traces_path=None, energy=False), service_version=__version__,
                    span_exporter_override=exporter)
    with live_server(tmp_path_factory.mktemp("tiling-server"), telemetry=tel, model=str(llm),
                     mmproj=str(mmproj), ctx_size=4096, clip_model=TINY_CLIP_NAME,
                     clip_checkpoint=str(checkpoint), clip_config=str(config)) as srv:
        srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        yield srv, tel, exporter


def ask(srv: LiveServer, edgevlm: dict[str, Any], text: str) -> Any:
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model=srv.model_id, max_tokens=2, temperature=0,  # type: ignore[attr-defined]
        messages=[image_message(png_uri(896, 672, seed=11), text)], extra_body={"edgevlm": edgevlm})


def last_span(tel: Any, exporter: InMemorySpanExporter) -> dict[str, Any]:
    from tests.test_clip_api import last_span as span  # needs open_clip, as the server does

    return span(tel, exporter)


def test_zoom_sends_overview_and_tiles_as_image_parts(tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = tiling_server
    raw = ask(srv, {"resolution": "zoom", "max_image_tokens": 192}, "Read the serial plate.")
    reply = raw.parse()
    assert reply.choices[0].finish_reason in ("stop", "length")
    image = raw.http_response.json()["timings"]["middleware"]["images"]["0"]
    assert image["zoom_mode"] == "tiles" and image["zoom_parts"] == 3  # overview + 2 of 3 chosen tiles
    assert len(image["zoom_sent"]) == 2 and image["zoom_sent"] == sorted(image["zoom_sent"])
    assert set(image["zoom_sent"]) <= set(image["zoom_tiles"])
    assert image["zoom_part_tokens"] == [64, 64, 64] and image["zoom_part_kept"] == [64, 64, 64]
    a = last_span(tel, exporter)
    assert a["edgevlm.zoom.mode"] == ("tiles",) and a["edgevlm.zoom.parts"] == (3,)
    assert a["edgevlm.zoom.grid"] == ("4x3",) and a["edgevlm.zoom.tiles"] == (2,)
    assert a["edgevlm.image.count"] == 1  # one request image, whatever it was sent as
    assert a["edgevlm.image.tokens_before"] == 192 == a["edgevlm.image.tokens_after"]
    assert a["edgevlm.clip.ms"] > 0


def test_relevant_pruning_keeps_exactly_k_rows_over_the_parts(tiling_server) -> None:  # type: ignore[no-untyped-def]
    srv, tel, exporter = tiling_server
    raw = ask(srv, {"resolution": "zoom", "max_image_tokens": 256, "prune": {"method": "relevant", "keep": 50}},
              "Where is the pressure gauge?")
    assert raw.parse().choices[0].message is not None
    image = raw.http_response.json()["timings"]["middleware"]["images"]["0"]
    assert image["zoom_mode"] == "tiles" and image["zoom_parts"] == 4  # overview + the 3 chosen tiles
    assert image["zoom_part_tokens"] == [64] * 4 and image["zoom_part_kept"] == [13, 13, 12, 12]
    a = last_span(tel, exporter)
    assert a["edgevlm.prune.method"] == "relevant"
    assert a["edgevlm.image.tokens_before"] == 256 and a["edgevlm.image.tokens_after"] == 50
    assert a["edgevlm.clip.ms"] > 0


def test_relevant_pruning_of_a_tiled_image_scores_its_overview_only(
        tiling_server) -> None:  # type: ignore[no-untyped-def]
    """Plain resize: libmtmd tiles the image and does not say where each slice sits."""
    srv, tel, exporter = tiling_server
    raw = ask(srv, {"resolution": "resize", "prune": {"method": "relevant", "keep": 50}}, "Where is the gauge?")
    assert raw.parse().choices[0].message is not None
    timings = raw.http_response.json()["timings"]
    im, image = timings["images"][0], timings["middleware"]["images"]["0"]
    assert im["tokens_before"] == 640 and im["tokens_after"] == 50 and im["prune_method"] == "relevant"
    assert image["relevance_parts"].startswith("overview only")
    a = last_span(tel, exporter)
    assert a["edgevlm.image.tokens_after"] == 50 and a["edgevlm.clip.ms"] > 0
