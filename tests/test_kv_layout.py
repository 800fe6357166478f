"""The per-slot KV layout: each slot its own stream of n_ctx / n_parallel cells."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import llama_cpp
import openai
import pytest
from openai import OpenAI

from models.engine import Engine, EngineConfig, EngineError, PromptTooLong
from tests.test_batching import PROMPTS, Run, chat, submit
from tests.test_cli import assert_one_line_error, edgevlm
from tests.test_speculative import WORK_ORDER, alone, assert_same_or_near_tie, cells_agree
from tests.test_speculative import chat as tokens_of
from tests.test_speculative import submit as submit_tokens

MODEL = "smollm2-135m-instruct-q4_1"


@pytest.fixture(scope="module")
def per_slot(tiny_llm: Path) -> Iterator[Engine]:
    eng = Engine(EngineConfig("tiny-per-slot", str(tiny_llm), n_ctx=2048, n_parallel=4, kv_layout="per-slot"))
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def shared(tiny_llm: Path) -> Iterator[Engine]:
    eng = Engine(EngineConfig("tiny-shared", str(tiny_llm), n_ctx=2048, n_parallel=4))
    yield eng
    eng.close()


def cells_match_books(engine: Engine) -> None:
    """Each sequence's cells in llama.cpp end where its slot's history says."""
    for slot in engine._slots:
        assert llama_cpp.llama_memory_seq_pos_max(engine.mem, slot.seq_id) == len(slot.history) - 1, slot


def long_prompt(engine: Engine, n_tokens: int) -> str:
    words = " ".join(f"part{i}" for i in range(n_tokens))
    text = chat(engine, f"List these: {words}")
    while len(engine.tokenize(text)) > n_tokens:
        words = words.rsplit(" ", 1)[0]
        text = chat(engine, f"List these: {words}")
    return text


def test_each_request_gets_its_slots_share_and_batches_like_the_pool(per_slot: Engine, shared: Engine) -> None:
    assert per_slot.per_slot and per_slot.n_ctx == 512 and per_slot.info.kv_layout == "per-slot"
    assert not shared.per_slot and shared.n_ctx == 2048 and shared.info.kv_layout == "shared"
    prompts = [chat(shared, p) for p in PROMPTS]
    want = [submit(shared, p, 48).wait().text for p in prompts]
    runs = [submit(per_slot, p, 48) for p in prompts]
    assert [r.wait().text for r in runs] == want
    assert len({r.record.slot for r in runs}) == 4
    assert all(r.record.batch_size_mean and r.record.batch_size_mean > 1.5 for r in runs)
    cells_match_books(per_slot)


def test_a_prompt_longer_than_a_slots_share_is_refused(per_slot: Engine, shared: Engine) -> None:
    prompt = long_prompt(shared, 700)
    assert 512 < len(shared.tokenize(prompt)) < 2048
    with pytest.raises(PromptTooLong) as err:
        submit(per_slot, prompt)
    assert err.value.status == 400 and "512" in str(err.value)
    assert submit(shared, prompt, 4).wait().finish == "length"  # the pool takes it


def test_generation_ends_at_the_end_of_its_slot(per_slot: Engine) -> None:
    prompt = long_prompt(per_slot, 480)
    n_prompt = len(per_slot.tokenize(prompt))
    run = submit(per_slot, prompt, 200).wait()
    assert run.finish == "length"
    assert n_prompt + run.record.output_tokens <= 512
    assert run.record.output_tokens >= 512 - n_prompt - 2
    cells_match_books(per_slot)


def test_a_prefix_another_slot_holds_is_copied_into_a_new_stream(per_slot: Engine, shared: Engine) -> None:
    system = "You are a maintenance assistant. " + " ".join(f"Rule {i}: check item {i}." for i in range(30))
    first = shared.template.render([{"role": "system", "content": system}, {"role": "user", "content": "Hi."}])
    second = shared.template.render([{"role": "system", "content": system},
                                     {"role": "user", "content": "Which rule is first?"}])
    want = submit(shared, second, 24).wait().text
    holder = submit(per_slot, first, 400)  # keeps its slot busy: the next one takes another
    while holder.first_delta_at is None:  # its prompt is in its stream
        assert not holder.done.wait(0.01), holder.finish
    run = submit(per_slot, second, 24).wait()
    holder.wait()
    assert run.text == want
    assert run.record.slot != holder.record.slot
    assert run.record.cached_tokens > 100  # the system prompt, copied from the other stream
    cells_match_books(per_slot)


def test_an_unknown_layout_is_refused(tiny_llm: Path) -> None:
    with pytest.raises(EngineError) as err:
        Engine(EngineConfig("bad", str(tiny_llm), kv_layout="paged"))
    assert err.value.code == "invalid_config" and "per-slot" in str(err.value)


def test_per_slot_through_the_api(make_server) -> None:
    srv = make_server(parallel=2, ctx_size=1024, kv_layout="per-slot")
    with srv.client() as c:
        row = c.get("/health").json()["models"][MODEL]
    assert (row["kv_layout"], row["ctx_per_request"], row["slots"]) == ("per-slot", 512, 2)
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    ok = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                                        max_tokens=8, temperature=0)
    assert ok.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, max_tokens=8, messages=[
            {"role": "user", "content": " ".join(f"part{i}" for i in range(600))}])
    assert "512" in str(err.value)


def test_a_bad_layout_flag_is_one_line() -> None:
    r = edgevlm("serve", "--kv-layout", "paged")
    assert_one_line_error(r, "kv")


def test_the_layout_benchmark_times_both_layouts_side_by_side(tiny_llm: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from bench import kv_layout

    out = tmp_path / "kv.json"
    assert kv_layout.main(["--model", str(tiny_llm), "--threads", "1", "--streams", "2", "--cells", "16,40",
                           "--rounds", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "shared / per-slot" in printed and "\n16 " in printed and "\n40 " in printed
    figures = json.loads(out.read_text())["figures"]
    for cells in ("16", "40"):
        for layout in ("shared", "per-slot"):
            steps = figures[cells][layout]
            assert len(steps) == 2 * kv_layout.BLOCK and all(ms > 0 for ms in steps)


def test_per_slot_rows_go_in_rising_sequence_order(per_slot: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # llama.cpp splits a per-slot batch into ubatches of sequences whose ids rise by one
    # in batch order, each a full pass over the weights: rows must follow the seq ids,
    # not the order the requests came in.
    prompts = [chat(per_slot, f"{p} Answer briefly, please.") for p in PROMPTS]
    slots = [submit(per_slot, p, 4).wait().record.slot for p in prompts]  # each prompt cached in a slot
    decoded: list[list[int]] = []
    real = llama_cpp.llama_decode

    def recording(ctx: object, batch: llama_cpp.llama_batch) -> int:
        decoded.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    order = sorted(range(len(prompts)), key=lambda i: -slots[i])  # highest cached slot first
    runs = [submit(per_slot, prompts[i], 24) for i in order]
    assert [r.wait().record.slot for r in runs] == [slots[i] for i in order]  # each went back to its cache
    # steps where all four decode (with a prompt chunk beside them a step takes two passes anyway)
    together = [seqs for seqs in decoded if len(set(seqs)) == len(prompts) == len(seqs)]
    assert together, "the four requests never decoded in one batch"
    for seqs in together:
        firsts = list(dict.fromkeys(seqs))
        assert firsts == sorted(firsts), seqs
    cells_match_books(per_slot)


@pytest.mark.usefixtures("rows_cost_nothing")
def test_per_slot_streams_verify_drafts_and_match_without_speculation(default_gguf: Path) -> None:
    # Per slot each stream's drafted cells live in its own KV stream and are rolled back
    # there; four streams drafting at once must give what each gives alone without drafts.
    off = Engine(EngineConfig("smol-slot-off", str(default_gguf), n_ctx=4096, n_parallel=4, kv_layout="per-slot"))
    on = Engine(EngineConfig("smol-slot-ngram", str(default_gguf), n_ctx=4096, n_parallel=4,
                             kv_layout="per-slot", speculative="ngram"))
    try:
        asks = ["Copy the following work order exactly, word for word.",
                "Repeat this work order exactly as written.",
                "Write out this work order again, unchanged.",
                "Reproduce the work order below verbatim."]
        prompts = [tokens_of(off, f"{ask}\n\n{WORK_ORDER}") for ask in asks]
        want = alone(off, prompts, 64)
        runs = [submit_tokens(on, p, 64) for p in prompts]
        for run, _ in runs:
            run.wait()
        for p, a, (_, job) in zip(prompts, want, runs):
            assert_same_or_near_tie(on, p, a, job.sampled)
        assert sum(run.ended.figures.accepted_tokens for run, _ in runs) > 0
        assert len({run.ended.figures.slot for run, _ in runs}) == 4
        cells_agree(on)
    finally:
        off.close()
        on.close()
