"""The load-time warm-up that seeds the TTFT cost model: only real measurements seed it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from models.registry import ModelSpec, load_model, model_id_for
from models.sampling import SamplingParams
from server.policy.budget import CostModel
from server.warmup import WarmupError, measure_cost_model, run_warmup_request
from tests.conftest import live_server


def test_a_failed_warm_up_request_raises_instead_of_measuring_zero(tiny_llm: Path) -> None:
    model = load_model(ModelSpec(id="tiny", path=str(tiny_llm), ctx_size=256, parallel=1))
    try:
        prompt = [model.engine.tokenize("Warm-up.")]
        # A grammar llama.cpp cannot compile makes the engine end the request with Failed.
        with pytest.raises(WarmupError, match="failed"):
            run_warmup_request(model, prompt, SamplingParams(temperature=0, grammar="root ::= ("))
        rec = run_warmup_request(model, prompt)  # the engine still serves
        assert rec.prefilled_tokens > 0 and rec.prefill_ms > 0
        seeded = measure_cost_model(model).snapshot()
        assert seeded.prefill_ms_per_token > 0
    finally:
        model.close()


def test_a_failed_warm_up_at_load_is_logged_and_leaves_the_defaults(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bench.tinymodels import tiny_vlm

    llm, mmproj = tiny_vlm(tmp_path / "m", "pixtral")
    caplog.set_level(logging.WARNING, logger="edgevlm.app")
    # 64 tokens of context cannot hold the warm-up's image: the warm-up fails at load.
    with live_server(tmp_path, model=str(llm), mmproj=str(mmproj), ctx_size=64) as srv:
        mid = model_id_for(llm)
        assert srv.app.state.registry.is_loaded(mid)
        assert mid not in srv.app.state.cost_models
        from server.images import cost_model_for

        assert cost_model_for(srv.app, mid).snapshot() == CostModel().snapshot()
    assert any("warm-up of" in r.getMessage() and r.exc_info for r in caplog.records)
