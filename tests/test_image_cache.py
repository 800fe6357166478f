"""The image-embedding cache: sized by the operator, counted in model memory, shown in /metrics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from models.registry import ConfigError, build_registry, model_id_for
from bench.tinymodels import tiny_vlm
from server.settings import Settings
from tests.conftest import LiveServer, live_server
from tests.test_vision_api import image_message, png_uri


@pytest.fixture(scope="module")
def vlm_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), "pixtral")


def ask_about(srv: LiveServer, model: str, seed: int) -> dict[str, Any]:
    body = {"model": model, "max_tokens": 1, "messages": [image_message(png_uri(384, 384, seed=seed))]}
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["timings"]["images"][0]


def cache_metrics(srv: LiveServer, model: str) -> dict[str, float]:
    text = httpx.get(srv.base_url + "/metrics").text
    return {s.name.removeprefix("edgevlm_image_cache_"): s.value for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name.startswith("edgevlm_image_cache_") and s.labels.get("gen_ai_request_model") == model}


@pytest.mark.parametrize("runners", ["on", "off"])
def test_cache_size_from_the_flag_bounds_it_and_metrics_show_it(vlm_files, tmp_path: Path, runners: str) -> None:
    llm, mmproj = vlm_files
    model = model_id_for(llm)
    with live_server(tmp_path, model=str(llm), mmproj=str(mmproj), ctx_size=4096, image_cache_mb=1,
                     runners=runners) as srv:
        assert ask_about(srv, model, seed=0)["cache_hit"] is False  # loads the model (its warm-up encodes too)
        before = cache_metrics(srv, model)
        assert ask_about(srv, model, seed=0)["cache_hit"] is True
        m = cache_metrics(srv, model)
        assert m["max_bytes"] == 2**20
        assert m["hits_total"] - before["hits_total"] == 1 and m["misses_total"] == before["misses_total"]
        assert m["entries"] >= 1 and m["bytes"] > 0
        for seed in range(1, 12):  # distinct images: more than 1 MiB of embeddings in all
            assert ask_about(srv, model, seed=seed)["cache_hit"] is False
        m = cache_metrics(srv, model)
        assert m["misses_total"] - before["misses_total"] == 11
        assert m["evictions_total"] >= 1 and 0 < m["bytes"] <= 2**20
        assert ask_about(srv, model, seed=0)["cache_hit"] is False  # the oldest was evicted

        # What the cache holds now counts in the model's memory (--max-model-memory-mb): in
        # process, the engine's figure plus the cache; a runner's resident memory holds both.
        [lm] = srv.app.state.registry.loaded()
        if runners == "off":
            assert lm.memory_bytes == lm.engine.memory_bytes + cache_metrics(srv, model)["bytes"]
        else:
            rss = psutil.Process(lm.runner.pid).memory_info().rss
            assert lm.runner.pid != os.getpid() and abs(lm.memory_bytes - rss) < 16 * 2**20


def test_per_model_size_in_the_toml_wins_over_the_flag(vlm_files, tmp_path: Path) -> None:
    llm, mmproj = vlm_files
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "off"\npath = "{llm}"\nmmproj = "{mmproj}"\nimage_cache_mb = 0\n\n'
                      f'[[models]]\nid = "two"\npath = "{llm}"\nmmproj = "{mmproj}"\nimage_cache_mb = 2\n\n'
                      f'[[models]]\nid = "flag"\npath = "{llm}"\nmmproj = "{mmproj}"\n')
    with live_server(tmp_path, config=str(config), model="flag", ctx_size=4096, image_cache_mb=3,
                     max_loaded_models=3) as srv:
        for model in ("off", "two", "flag"):
            ask_about(srv, model, seed=0)
            ask_about(srv, model, seed=0)
        off, two, flag = (cache_metrics(srv, m) for m in ("off", "two", "flag"))
    assert off["max_bytes"] == 0 and off["entries"] == off["bytes"] == off["hits_total"] == 0
    assert off["misses_total"] >= 2
    assert two["max_bytes"] == 2 * 2**20 and two["hits_total"] >= 1 and two["entries"] >= 1
    assert flag["max_bytes"] == 3 * 2**20 and flag["hits_total"] >= 1


def test_size_from_the_environment_and_bad_values(vlm_files, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    llm, mmproj = vlm_files
    monkeypatch.setenv("EDGEVLM_IMAGE_CACHE_MB", "7")
    assert Settings().image_cache_mb == 7
    monkeypatch.setenv("EDGEVLM_IMAGE_CACHE_MB", "-1")
    with pytest.raises(ValueError):
        Settings()
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "bad"\npath = "{llm}"\nmmproj = "{mmproj}"\nimage_cache_mb = -5\n')
    with pytest.raises(ConfigError, match="image_cache_mb"):
        build_registry(config=str(config))
