"""Speculative decoding with a draft model (``--speculative draft``), on real GGUF models.

The tiny random model (``tiny_llm``) shares the default model's tokenizer, so it can draft
for it: it is almost never right, which shows the output stays the target's and that a
useless drafter stops. The default model drafting for itself is always right at
temperature 0, which shows the proposals are real and verified in the same step.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import llama_cpp
import pytest
from openai import OpenAI

from bench.tinymodels import write_tiny_llm
from models.engine import Engine, EngineConfig, EngineError
from models.engine.draft import VOCAB_SAMPLE_EVERY
from models.engine.speculative import StepCosts, plan_drafts
from models.registry import load_config
from tests.test_cli import assert_one_line_error, edgevlm
from tests.test_speculative import (COPY, WORK_ORDER, alone, assert_same_or_near_tie, cancel_mid_draft,
                                    cells_agree, chat, concurrent_match_alone, costs, submit)
from tests.test_speculative_api import without_and_with_drafts

PROMPTS = (COPY, f"{WORK_ORDER}\n\nWhich parts are listed? Quote them.", "Name three colours.",
           "Why is the sky blue?")


def draft_cells_agree(engine: Engine) -> None:
    """The draft context's own cells match its books, and each sequence holds a prefix of
    what its target slot holds (never cells the target slot no longer has)."""
    drafter = engine._drafter
    assert drafter is not None
    for slot in engine._slots:
        hist = drafter.histories[slot.seq_id]
        assert llama_cpp.llama_memory_seq_pos_max(drafter.mem, slot.seq_id) == len(hist) - 1, slot.seq_id
        target = [] if slot.parked is not None else slot.history
        assert target[:len(hist)] == hist, (slot.seq_id, len(hist), len(target))


def draft_engine(model_id: str, target: Path, draft: Path, parallel: int, n_ctx: int = 2048) -> Engine:
    return Engine(EngineConfig(model_id, str(target), n_ctx=n_ctx, n_parallel=parallel, speculative="draft",
                               draft_path=str(draft)))


@pytest.fixture(scope="module")
def off(default_gguf: Path) -> Iterator[Engine]:
    eng = Engine(EngineConfig("smol-off", str(default_gguf), n_ctx=2048, n_parallel=1))
    yield eng
    eng.close()


# ----------------------------------------------------------------- planning
def test_a_draft_model_as_slow_as_a_step_is_not_worth_drafting() -> None:
    flat = costs(1, lambda rows: 10.0)  # extra verification rows are free
    assert plan_drafts([(0.9, 16)], 1, 1, flat, 64) == [16]
    # a draft token that costs a whole step never pays, however well it agrees
    assert plan_drafts([(0.99, 16)], 1, 1, flat, 64, draft_ms=10.0) == [0]
    # a cheap one still drafts, but fewer tokens than a free one
    assert 0 < plan_drafts([(0.9, 16)], 1, 1, flat, 64, draft_ms=1.0)[0] < 16
    # exploring measures what rows cost now: it drafts whatever the draft's cost
    assert plan_drafts([(0.9, 16)], 1, 1, flat, 64, draft_ms=10.0, explore=True)[0] > 0


# ----------------------------------------------------------------- the engine
def test_tiny_draft_model_keeps_one_stream_token_for_token_identical(default_gguf: Path, tiny_llm: Path,
                                                                      off: Engine) -> None:
    on = draft_engine("smol-draft1", default_gguf, tiny_llm, 1)
    try:
        prompts = [chat(off, t) for t in PROMPTS]
        want = alone(off, prompts, 96)
        figs = []
        for p, w in zip(prompts, want):
            run, job = submit(on, p, 96)
            run.wait()
            # verification rows sum in another order than one-token steps: the open
            # questions may part at a near-tie; the copy has none this early
            same = assert_same_or_near_tie(on, p, w, job.sampled)
            assert same or p != prompts[0]
            figs.append(run.ended.figures)
            cells_agree(on)
            draft_cells_agree(on)
        drafted = sum(f.drafted_tokens for f in figs)
        assert drafted > 0  # it drafted (a random model), was rejected ...
        assert sum(f.accepted_tokens for f in figs) < drafted / 2
        # ... and paused: far fewer drafts than steps
        assert drafted < sum(f.output_tokens for f in figs)
    finally:
        on.close()


@pytest.mark.usefixtures("rows_cost_nothing")
def test_tiny_draft_model_with_four_concurrent_streams(default_gguf: Path, tiny_llm: Path, off: Engine) -> None:
    on = draft_engine("smol-draft4", default_gguf, tiny_llm, 4)
    try:
        runs = concurrent_match_alone(off, on, [chat(off, t) for t in PROMPTS], 64)
        assert sum(r.ended.figures.drafted_tokens for r in runs) > 0
        draft_cells_agree(on)
    finally:
        on.close()


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_the_model_drafting_for_itself_is_accepted_and_changes_nothing(default_gguf: Path, flash_attn: str,
                                                                       monkeypatch) -> None:
    """At temperature 0 a model's greedy proposals are its own next tokens: nearly all are
    accepted. Drafting costs as much as a step here, so the planner would (rightly) stop:
    exploring every step keeps it drafting up to 8 tokens.

    Not all: the draft proposes from one-token steps, the target verifies in batched rows,
    which sum in another order, so at a near-tie they part. With either attention kernel
    the copy's 56 drafted tokens were all accepted; on the open question flash attention
    accepted 56 of 56 and the plain kernel 54 of 66 (two partings, each wasting the rest
    of an 8-token draft)."""
    monkeypatch.setattr(StepCosts, "explore", lambda self: True)
    ref = Engine(EngineConfig("smol-ref", str(default_gguf), n_ctx=2048, n_parallel=1, flash_attn=flash_attn))
    on = Engine(EngineConfig("smol-self", str(default_gguf), n_ctx=2048, n_parallel=1, speculative="draft",
                             draft_path=str(default_gguf), flash_attn=flash_attn))
    try:
        for text, least in ((COPY, 0.95), ("Why is the sky blue?", 0.75)):
            p = chat(ref, text)
            (want,) = alone(ref, [p], 64)
            run, job = submit(on, p, 64)
            run.wait()
            fig = run.ended.figures
            assert fig.drafted_tokens > 20, fig
            assert fig.accepted_tokens / fig.drafted_tokens > least, fig
            assert_same_or_near_tie(on, p, want, job.sampled)
            if text == COPY:
                assert job.sampled == want
            cells_agree(on)
            draft_cells_agree(on)
    finally:
        on.close()
        ref.close()


def test_a_draft_model_with_another_vocabulary_is_refused(default_gguf: Path, tmp_path: Path) -> None:
    a = VOCAB_SAMPLE_EVERY * 100  # a sampled id, its text swapped with its neighbour's
    other = write_tiny_llm(tmp_path / "other-vocab.gguf", swap_tokens=((a, a + 1),))
    with pytest.raises(EngineError) as err:
        draft_engine("smol-bad", default_gguf, other, 1)
    msg = str(err.value)
    assert err.value.code == "invalid_config"
    assert "\n" not in msg and str(other) in msg and str(default_gguf) in msg and f"token {a}" in msg


def test_cancelling_mid_draft_and_parking_keep_both_contexts_cells_in_step(default_gguf: Path,
                                                                           monkeypatch) -> None:
    monkeypatch.setattr(StepCosts, "explore", lambda self: True)  # draft every step
    on = draft_engine("smol-cancel", default_gguf, default_gguf, 2, n_ctx=4096)
    try:
        run = cancel_mid_draft(on)
        draft_cells_agree(on)
        first = run.ended.figures.slot
        assert on._drafter.histories[first], "the finished slot's draft cells stay for its next turn"
        # a long new prompt parks the idle slot's KV: its draft cells go too
        long_prompt = chat(on, (WORK_ORDER + "\n") * 6 + "Say which press is affected.")
        run2, job2 = submit(on, long_prompt, 8)
        run2.wait()
        assert run2.ended.figures.slot != first
        assert on._slots[first].parked is not None and on._drafter.histories[first] == []
        cells_agree(on)
        draft_cells_agree(on)
    finally:
        on.close()


# ----------------------------------------------------------------- configuration
def test_speculative_draft_without_a_draft_model_is_one_line() -> None:
    assert_one_line_error(edgevlm("serve", "--speculative", "draft"), "draft model")


def test_a_draft_model_with_ngram_is_one_line(tiny_llm: Path) -> None:
    assert_one_line_error(edgevlm("serve", "--speculative", "ngram", "--draft-model", str(tiny_llm)),
                          "speculative draft", "ngram")


def test_toml_draft_model_is_relative_to_the_config_and_implies_draft(tmp_path: Path, tiny_llm: Path) -> None:
    (tmp_path / "models").mkdir()
    draft = tmp_path / "models" / "draft.gguf"
    shutil.copyfile(tiny_llm, draft)
    cfg = tmp_path / "models.toml"
    cfg.write_text(f'[[models]]\nid = "big"\npath = "{tiny_llm}"\ndraft_model = "models/draft.gguf"\n'
                   f'[[models]]\nid = "plain"\npath = "{tiny_llm}"\nspeculative = "off"\n')
    big, plain = load_config(cfg, {"speculative": "ngram"})
    assert big.speculative == "draft" and big.engine_config().draft_path == str(draft)
    # a model that picks another mode itself does not inherit a default draft model
    (plain,) = load_config(cfg, {"speculative": "draft", "draft_model": str(draft)})[1:]
    assert plain.speculative == "off" and plain.draft_model is None


def test_draft_model_reaches_the_runner_through_the_api(make_server, default_gguf: Path) -> None:
    """Runners on (the default): the draft model is loaded in the model's runner process."""
    srv = make_server(parallel=1, ctx_size=2048, speculative="draft", draft_model=str(default_gguf))
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    _, fast = without_and_with_drafts(client, 48)
    timings = fast.model_extra["timings"]
    # its first draft is planned before its cost was measured; the model agrees with itself
    assert timings["drafted_tokens"] > 0 and timings["accepted_tokens"] > 0
