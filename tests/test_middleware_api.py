"""The accuracy-for-speed middleware through the API: budgets, profiles, pruning, TTFT."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from models.registry import model_id_for
from bench.tinymodels import tiny_vlm
from tests.conftest import LiveServer, live_server
from tests.test_vision_api import image_message, png_uri


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    llm, mmproj = tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), "pixtral")
    with live_server(tmp_path_factory.mktemp("mw-server"), model=str(llm), mmproj=str(mmproj),
                     ctx_size=4096) as srv:
        srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        yield srv


def chat(srv: LiveServer, *, detail: str = "auto", seed: int = 0, size: int = 384,
         headers: dict[str, str] | None = None, **edgevlm: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": srv.model_id, "max_tokens": 2, "temperature": 0,
                            "messages": [image_message(png_uri(size, size, seed=seed), "Describe.", detail)]}
    if edgevlm:
        body["edgevlm"] = edgevlm
    with srv.client() as c:
        r = c.post("/v1/chat/completions", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    return r.json()["timings"]


def image(t: dict[str, Any]) -> dict[str, Any]:
    return t["images"][0]


def test_max_image_tokens_from_the_request(vlm: LiveServer) -> None:
    im = image(chat(vlm, max_image_tokens=50))
    assert im["budget_source"] == "request" and im["budget_tokens"] == 50
    assert im["tokens_before"] <= 50 + 8  # grid tokens <= budget, plus Pixtral row breaks


def test_detail_low_and_high(vlm: LiveServer) -> None:
    low, high = image(chat(vlm, detail="low")), image(chat(vlm, detail="high"))
    assert low["budget_source"] == high["budget_source"] == "detail"
    assert low["budget_tokens"] == 64 and low["tokens_before"] < high["tokens_before"]
    # the request's max_image_tokens beats detail
    assert image(chat(vlm, detail="high", max_image_tokens=30))["budget_tokens"] == 30


def test_profile_fast_costs_fewer_tokens_than_quality(vlm: LiveServer) -> None:
    quality = chat(vlm, profile="quality", seed=1)
    fast = chat(vlm, profile="fast", seed=1)
    assert quality["middleware"]["profile"] == "quality" and fast["middleware"]["profile"] == "fast"
    assert image(fast)["budget_source"] == "profile"
    assert image(fast)["tokens_after"] * 4 <= image(quality)["tokens_after"]
    assert image(fast)["prune_method"] == "diverse"
    assert image(quality)["prune_method"] == "none"


def test_prune_keep_half_halves_tokens(vlm: LiveServer) -> None:
    full = image(chat(vlm, seed=2))
    half = image(chat(vlm, seed=2, prune={"method": "diverse", "keep": 0.5}))
    assert half["tokens_before"] == full["tokens_before"]
    assert half["tokens_after"] == round(full["tokens_before"] * 0.5)
    assert half["cache_hit"] is True  # pruning is applied after the (cached) encoder output
    for method in ("uniform", "merge"):
        assert image(chat(vlm, seed=2, prune={"method": method, "keep": 0.25}))["tokens_after"] == \
            round(full["tokens_before"] * 0.25)


@pytest.mark.parametrize("edgevlm", [
    {"profile": "turbo"},
    {"max_image_tokens": 0},
    {"max_image_tokens": "many"},
    {"prune": {"method": "diverse", "keep": 1.5}},
    {"prune": {"method": "random"}},
    {"ttft_budget_ms": -5},
    {"unknown_knob": 1},
])
def test_bad_extension_values_are_400(vlm: LiveServer, edgevlm: dict[str, Any]) -> None:
    body = {"model": vlm.model_id, "max_tokens": 2, "messages": [image_message(png_uri(32, 32))],
            "edgevlm": edgevlm}
    with vlm.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("edgevlm")


def test_bad_ttft_header_is_400(vlm: LiveServer) -> None:
    body = {"model": vlm.model_id, "max_tokens": 2, "messages": [image_message(png_uri(32, 32))]}
    with vlm.client() as c:
        r = c.post("/v1/chat/completions", json=body, headers={"X-EdgeVLM-TTFT-Budget-Ms": "soon"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "X-EdgeVLM-TTFT-Budget-Ms"


def test_ttft_budget_lowers_resolution_and_predicts_within_budget(tmp_path: Path) -> None:
    llm, mmproj = tiny_vlm(tmp_path / "m", "pixtral")
    with live_server(tmp_path, model=str(llm), mmproj=str(mmproj), ctx_size=4096) as srv:
        srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        # A budget the warm-up-measured cost model says fits ~200 image tokens, not the
        # 576 a 384 px image would get at full resolution.
        rates = srv.app.state.cost_models[srv.model_id].snapshot()
        budget = round(rates.predict_ttft_ms(40, [200]), 3)
        assert budget < rates.predict_ttft_ms(40, [576])
        t = chat(srv, ttft_budget_ms=budget)
        mw = t["middleware"]
        assert mw["budget_ttft_ms"] == budget and mw["ttft_achievable"] is True
        assert 0 < mw["predicted_ttft_ms"] <= budget
        assert image(t)["budget_source"] == "ttft_budget" and image(t)["budget_tokens"] < 576
        # A budget from the header. The cost model has learned from the first request
        # meanwhile, so the budget is derived again from what it now predicts.
        budget = round(srv.app.state.cost_models[srv.model_id].snapshot().predict_ttft_ms(40, [200]), 3)
        h = chat(srv, seed=3, headers={"X-EdgeVLM-TTFT-Budget-Ms": str(budget)})
        assert h["middleware"]["budget_ttft_source"] == "header"
        assert h["middleware"]["budget_ttft_ms"] == budget
        assert h["middleware"]["predicted_ttft_ms"] <= budget
        # an explicit request budget is final: the TTFT budget does not override it
        assert image(chat(srv, seed=4, ttft_budget_ms=budget, max_image_tokens=500))["budget_source"] == "request"


def test_cost_model_is_seeded_by_a_warm_up_at_load(vlm: LiveServer) -> None:
    from server.policy.budget import CostModel

    cm = vlm.app.state.cost_models[vlm.model_id]
    default = CostModel().snapshot()
    seeded = cm.snapshot()
    # Measured rates, not the generic start-up guesses.
    assert seeded.encode_ms_per_token != default.encode_ms_per_token
    assert seeded.prefill_ms_per_token != default.prefill_ms_per_token
    assert seeded.encode_ms_per_token > 0 and seeded.prefill_ms_per_token > 0


@pytest.mark.parametrize("choice", [{"detail": "high"}, {"max_image_tokens": 256}, {"detail": "low"}],
                         ids=["detail-high", "max-image-tokens", "detail-low"])
def test_ttft_budget_never_overrides_an_explicit_image_choice(vlm: LiveServer, choice: dict[str, Any]) -> None:
    free = chat(vlm, seed=40, **choice)
    # A budget no plan can meet: without the explicit choice it would go to the floor and prune.
    tight = chat(vlm, seed=40, ttft_budget_ms=1, **choice)
    done, planned = image(tight), tight["middleware"]
    assert done["budget_source"] in ("detail", "request")
    assert done["budget_tokens"] == image(free)["budget_tokens"]
    assert done["tokens_before"] == done["tokens_after"] == image(free)["tokens_before"]
    assert done["prune_method"] == "none" and planned["prune_method"] == "none"
    # What the response (and span) says was planned is what was done.
    assert planned["ttft_plan_keep"] == planned["ttft_plan_tokens"]
    assert done["tokens_before"] - 32 <= planned["ttft_plan_tokens"][0] <= done["tokens_before"]
    assert "floor" not in planned["ttft_plan_reason"] and planned["ttft_achievable"] is False
    # The same budget without an explicit choice does lower and prune (the control).
    budgeted = image(chat(vlm, seed=40, ttft_budget_ms=1))
    assert budgeted["tokens_after"] < done["tokens_after"]


def test_loading_on_first_use_is_not_learned_as_request_cost(tmp_path: Path, tiny_llm: Path) -> None:
    from server.policy.budget import DEFAULT_OVERHEAD_MS, DEFAULT_REQUEST_MS

    llm, mmproj = tiny_vlm(tmp_path / "m", "pixtral")
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "text"\npath = "{tiny_llm}"\n\n'
                      f'[[models]]\nid = "vlm"\npath = "{llm}"\nmmproj = "{mmproj}"\nctx_size = 4096\n')
    with live_server(tmp_path, config=str(config)) as srv:
        srv.model_id = "vlm"  # type: ignore[attr-defined]
        assert not srv.app.state.registry.is_loaded("vlm")
        first = chat(srv, seed=50)  # loads the model (and its warm-up) on the way
        assert first["load_ms"] > 0 and first["ttft_ms"] > first["load_ms"]
        est = srv.app.state.cost_models["vlm"].snapshot()
        # Only its measured encode and prefill rates were learned: the fixed costs keep
        # their start-up values instead of taking in the load.
        assert (est.overhead_ms, est.request_ms) == (DEFAULT_OVERHEAD_MS, DEFAULT_REQUEST_MS)
        assert est.prefill_ms_per_token <= (first["prefill_ms"] + 0.001) / first["prompt_prefilled_tokens"]
        second = chat(srv, seed=51)
        assert "load_ms" not in second  # loaded now: nothing to wait for, and this one is learned
        learned = srv.app.state.cost_models["vlm"].snapshot().overhead_ms
        overhead = second["ttft_ms"] - second["queue_ms"] - second["encode_ms"] - second["prefill_ms"]
        assert learned == pytest.approx(max(0.0, overhead), abs=0.01)
