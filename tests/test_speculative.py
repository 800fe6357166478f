"""Speculative decoding (prompt lookup) inside continuous batching, on real GGUF models."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import llama_cpp
import numpy as np
import pytest
from scipy.stats import chi2_contingency

from models.engine import Engine, EngineConfig, Failed, Finished, GenerationRequest, TextDelta
from models.llama_lib import OneSequence
from models.engine.speculative import (EXPLORE_EVERY, EXPLORE_ROWS, FAIL_STREAK, NGRAM_SIZES, PAUSE_TOKENS,
                                       PRIOR_ROW_SHARE, RESYNC_AHEAD, RESYNC_TOKENS, NgramIndex, SpecState,
                                       StepCosts, plan_drafts)
from models.sampling import SamplingParams

WORK_ORDER = (
    "WORK ORDER 4471-B. Site: Line 3, press P-12. Fault: hydraulic pressure drops from 180 bar "
    "to 95 bar within two minutes of start-up; oil temperature 64 C; filter F-220 replaced on "
    "14 March. Parts: seal kit SK-7781 (2x), pressure sensor PS-310, hose H-55 1.2 m. "
    "Technician: M. Okafor. Priority: high. Sign-off required by the shift lead before restart."
)
COPY = f"Copy the following work order exactly, word for word.\n\n{WORK_ORDER}"


class Run:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.done = threading.Event()
        self.ended: Finished | Failed | None = None
        self.first = threading.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, TextDelta):
            self.parts.append(event.text)
            self.first.set()
        elif isinstance(event, (Finished, Failed)):
            self.ended = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def wait(self, timeout: float = 120) -> "Run":
        assert self.done.wait(timeout), "generation did not finish"
        assert isinstance(self.ended, Finished), self.ended
        return self


def chat(engine: Engine, text: str) -> list[int]:
    return engine.tokenize(engine.template.render([{"role": "user", "content": text}]))


def submit(engine: Engine, tokens: list[int], max_tokens: int, sampling: SamplingParams | None = None,
           **kw: object) -> tuple[Run, object]:
    run = Run()
    req = GenerationRequest([list(tokens)], sampling or SamplingParams(temperature=0), max_tokens,
                            **kw)  # type: ignore[arg-type]
    return run, engine.submit(req, run, max_queue=1 << 20)


def cells_agree(engine: Engine) -> None:
    """llama.cpp's own view of every sequence's cells matches the engine's books."""
    for slot in engine._slots:
        top = llama_cpp.llama_memory_seq_pos_max(engine.mem, slot.seq_id)
        if slot.parked is not None or not slot.history:
            continue
        assert top == slot.pos_at(len(slot.history)) - 1, (slot.seq_id, top, len(slot.history))


# llama.cpp's CPU kernels round a row's logits differently for a batch of many rows
# than for one ("we use different kernels for different batch sizes", its maintainers
# say), and in a KV pool shared by several sequences, where a sequence's cells lie
# changes the order attention is summed in. Where the model's two best tokens are that
# close, the token may differ: continuous batching alone does this (without
# speculation, 2 of the 4 prompts below differ between one stream and four). Measured
# here: margins up to 1.9 % of the top logit at such flips. A verification bug (a row
# sampled from the wrong context) shows as a change where the model was nowhere near
# a tie.
NEAR_TIE = 0.03  # of the top logit


def assert_same_or_near_tie(engine: Engine, prompt: list[int], want: list[int], got: list[int]) -> bool:
    """``got`` equals ``want``, or first differs where ``want``'s own logits were a near-tie.

    Returns whether they were identical.
    """
    n = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    if n is None:
        assert len(got) == len(want) or min(len(got), len(want)) > 0
        return len(got) == len(want)
    with OneSequence(engine.model, n_ctx=engine.n_ctx, n_batch=engine.n_ctx, n_threads=engine.n_threads,
                     flash_attn=engine.attention.flash) as seq:
        assert seq.decode(prompt + want[:n], 0, lambda i: i == len(prompt) + n - 1) == 0
        row = seq.logits(len(prompt) + n - 1)
        margin = abs(float(row[want[n]]) - float(row[got[n]]))
        top = float(np.sort(row)[-1])
    assert margin < NEAR_TIE * abs(top), (f"speculation changed token {n} where the model was not near a tie: "
                               f"{want[n]} vs {got[n]}, logit margin {margin:.3f} (top {top:.2f})")
    return False


def reference_drafter(prompts: list[list[int]], answers: list[list[int]]):
    """A drafter that proposes each prompt's reference answer: three tokens right, then a
    wrong one, so every verification step accepts some and rolls one back."""

    def draft(self: NgramIndex, k: int) -> list[int]:
        for p, want in zip(prompts, answers):
            if self.tokens[:len(p)] == p:
                done = len(self.tokens) - len(p)
                return (want[done:done + 3] + [want[0]])[:k]
        return []

    return draft


@pytest.fixture(scope="module")
def smol(default_gguf: Path) -> Iterator[tuple[Engine, Engine]]:
    """The default model twice: without and with speculation, 4 slots each."""
    off = Engine(EngineConfig("smol-off", str(default_gguf), n_ctx=4096, n_parallel=4))
    on = Engine(EngineConfig("smol-ngram", str(default_gguf), n_ctx=4096, n_parallel=4, speculative="ngram"))
    yield off, on
    off.close()
    on.close()


# ----------------------------------------------------------------- pure parts
LONG, SHORT = NGRAM_SIZES[0], NGRAM_SIZES[-1]


def test_ngram_index_proposes_what_followed_the_longest_recent_match() -> None:
    line = list(range(100, 100 + LONG + 8))  # a line of a document
    idx = NgramIndex([1, 2, *line, 3, 4, *line[:SHORT]])  # ... and its start copied again
    assert idx.draft(5) == line[SHORT:SHORT + 5]
    idx.extend(line[SHORT:SHORT + 2])
    assert idx.draft(len(line)) == [*line[SHORT + 2:], 3, 4, *line[:SHORT + 2]][:len(line)]
    assert idx.draft(0) == []
    # a repeat shorter than the shortest n-gram proposes nothing
    few = list(range(7, 7 + SHORT - 1))
    assert NgramIndex([*few, 1, *few]).draft(4) == []
    # never matches the tail against itself
    assert NgramIndex(line).draft(4) == []
    # the longer match wins over a more recent shorter one
    a = list(range(200, 200 + LONG))
    idx = NgramIndex([*a, 7, *a[LONG - SHORT:], 9, *a])
    assert idx.draft(1) == [7]


def test_ngram_index_picks_a_copy_up_again_after_the_model_strays_from_it() -> None:
    doc = list(range(100, 100 + SHORT + 60))  # a document being copied out
    m = RESYNC_TOKENS

    def copying() -> NgramIndex:
        idx = NgramIndex([1, 2, *doc, 3, *doc[:SHORT]])
        assert idx.draft(5) == doc[SHORT:SHORT + 5]  # a long match: the copy's place is known
        idx.extend([*doc[SHORT:SHORT + 2], 999])  # two tokens kept, then a changed one
        assert idx.draft(5) == []  # the tail holds the changed token: it occurs nowhere
        return idx

    idx = copying()
    idx.extend(doc[SHORT + 3:SHORT + 3 + m])  # the copy goes on
    assert idx.draft(3) == doc[SHORT + 3 + m:SHORT + 6 + m]  # found again after m tokens, not SHORT
    idx.extend(doc[SHORT + 3 + m:SHORT + 4 + m])
    assert idx.draft(2) == doc[SHORT + 4 + m:SHORT + 6 + m]
    # the same short match far from where the copy had got to proposes nothing
    idx = copying()
    far = SHORT + 3 + RESYNC_AHEAD + 8
    idx.extend(doc[far:far + m])
    assert idx.draft(3) == []
    # nor does a short match when no long one ever said where a copy was
    assert NgramIndex([1, 2, *doc, 3, *doc[SHORT + 3:SHORT + 3 + m]]).draft(3) == []


def test_ngram_index_skips_image_rows() -> None:
    img = [("img", i) for i in range(3)]
    text = list(range(100, 100 + SHORT))
    idx = NgramIndex([*text, *img, *text])
    assert idx.draft(4) == []  # what followed the text was an image: nothing to propose
    idx = NgramIndex([*text, 42, *img, *text])
    assert idx.draft(4) == [42]  # the draft stops where the image began


def test_a_sequence_whose_drafts_keep_failing_pauses_and_backs_off() -> None:
    spec = SpecState(NgramIndex())
    start = spec.acceptance
    for n in range(FAIL_STREAK):
        spec.record(4, 0, n_generated=10 + n)
    assert spec.acceptance < start
    assert spec.paused_until == 10 + FAIL_STREAK - 1 + PAUSE_TOKENS
    for n in range(FAIL_STREAK):
        spec.record(4, 0, n_generated=100 + n)
    assert spec.paused_until == 100 + FAIL_STREAK - 1 + 2 * PAUSE_TOKENS  # the pause doubled
    spec.record(4, 4, n_generated=200)
    assert spec.acceptance > 0.4 and spec.fail_streak == 0
    assert (spec.drafted, spec.accepted) == (2 * FAIL_STREAK * 4 + 4, 4)


def costs(seqs: int, ms_of_rows) -> StepCosts:
    c = StepCosts()
    for rows in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
        c.record(seqs, rows, ms_of_rows(rows))
    return c


def test_plan_drafts_follows_measured_cost_and_acceptance() -> None:
    flat = costs(1, lambda rows: 10.0)  # memory-bound: rows are free
    assert plan_drafts([(0.9, 16)], 1, 1, flat, 64) == [16]
    assert plan_drafts([(0.9, 16)], 1, 1, flat, 5) == [4]  # never past the free rows
    linear = costs(4, lambda rows: 10.0 * rows)  # compute-bound: every row costs a step
    assert plan_drafts([(0.9, 16)] * 4, 4, 4, linear, 64) == [0, 0, 0, 0]
    # ... unless exploring, which measures what a few more rows cost now
    assert 0 < sum(plan_drafts([(0.9, 16)] * 4, 4, 4, linear, 64, explore=True)) <= EXPLORE_ROWS
    # in between, sequences with better acceptance keep more of their drafts
    mid = costs(2, lambda rows: 10.0 + 2.0 * rows)
    ks = plan_drafts([(0.95, 16), (0.2, 16)], 2, 2, mid, 64)
    assert ks[0] > ks[1] >= 0 and ks[0] >= 4
    # costs are per number of sequences: one stream's are not four streams'
    assert linear.cost(1, 8) is None and flat.cost(1, 5) == 10.0


def test_unmeasured_row_counts_cost_what_the_measured_ones_say() -> None:
    c = StepCosts()
    assert c.cost(1, 1) is None and c.frontier(1) is None
    c.record(1, 1, 13.0)
    # one count measured: each further row is assumed to cost a share of it ...
    assert c.cost(1, 2) == pytest.approx(13.0 * (1 + PRIOR_ROW_SHARE))
    # ... and a plan may go one row bucket further, not to 64 rows at once
    assert c.frontier(1) == 2
    assert plan_drafts([(0.95, 64)], 1, 1, c, 64) == [1]
    c.record(1, 2, 26.0)  # compute-bound: the second row cost a whole step
    assert c.frontier(1) == 3
    assert c.cost(1, 16) == pytest.approx(26.0 + 13.0 * 14)  # the measured slope, carried on
    assert plan_drafts([(0.95, 64)], 1, 1, c, 64) == [0]
    c.record(1, 8, 40.0)
    assert c.cost(1, 4) == pytest.approx(26.0 + (40.0 - 26.0) * 2 / 6)  # between two measured counts
    assert c.cost(4, 8) is None  # another batch shape has its own measurements


def test_drafts_grow_one_row_bucket_at_a_time_while_rows_stay_cheap() -> None:
    c = StepCosts()
    c.record(1, 1, 10.0)
    sizes = []
    for _ in range(8):
        k = plan_drafts([(0.95, 64)], 1, 1, c, 64)[0]
        sizes.append(k)
        c.record(1, 1 + k, 10.0 + 0.1 * k)  # memory-bound: rows nearly free
    assert sizes == [1, 2, 3, 5, 7, 11, 15, 23]  # each plan ends at the frontier


def test_step_costs_explore_now_and_then() -> None:
    c = StepCosts()
    assert sum(c.explore() for _ in range(10 * EXPLORE_EVERY)) == 10


# ----------------------------------------------------------------- the engine
@pytest.mark.usefixtures("rows_cost_nothing")
@pytest.mark.parametrize("text", [COPY, f"{WORK_ORDER}\n\nWhich parts are listed? Quote them.",
                                  "Name three colours.", "Why is the sky blue?"])
def test_one_stream_is_token_for_token_identical_with_speculation(default_gguf: Path, text: str) -> None:
    """One slot each: the same cells, so only long verification batches' rounding may flip a near-tie."""
    off = Engine(EngineConfig("smol-off1", str(default_gguf), n_ctx=2048, n_parallel=1))
    on = Engine(EngineConfig("smol-on1", str(default_gguf), n_ctx=2048, n_parallel=1, speculative="ngram"))
    try:
        tokens = chat(off, text)
        (a, ja), (b, jb) = submit(off, tokens, 128), submit(on, tokens, 128)
        a.wait(), b.wait()
        assert_same_or_near_tie(on, tokens, ja.sampled, jb.sampled)
        assert a.ended.figures.drafted_tokens == 0
        if text == COPY:
            fig = b.ended.figures
            assert fig.drafted_tokens > 20 and fig.accepted_tokens > 10, fig
        cells_agree(on)
    finally:
        off.close()
        on.close()


def alone(engine: Engine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy tokens, run one at a time."""
    out = []
    for p in prompts:
        run, job = submit(engine, p, max_tokens)
        run.wait()
        out.append(job.sampled)
    return out


def concurrent_match_alone(off: Engine, on: Engine, prompts: list[list[int]], max_tokens: int) -> list[Run]:
    """All prompts at once on ``on`` give what each gives alone on ``off`` (up to near-ties);
    the first prompt, a copy without near-ties, must be identical."""
    want = alone(off, prompts, max_tokens)
    runs = [submit(on, p, max_tokens) for p in prompts]
    for run, _ in runs:
        run.wait()
    same = [assert_same_or_near_tie(on, p, a, job.sampled) for p, a, (_, job) in zip(prompts, want, runs)]
    assert same[0], "the copy prompt has no near-tie: it must be identical"
    cells_agree(on)
    return [run for run, _ in runs]


@pytest.mark.usefixtures("rows_cost_nothing")
def test_four_concurrent_streams_match_one_stream_without_speculation(smol) -> None:
    off, on = smol
    prompts = [chat(off, COPY), chat(off, "Fill a JSON object with the fields site, press, parts and "
                                        f"technician from this work order.\n\n{WORK_ORDER}"),
               chat(off, f"{WORK_ORDER}\n\nWhich parts are listed? Quote them."),
               chat(off, "Name three colours.")]
    runs = concurrent_match_alone(off, on, prompts, 96)
    assert sum(r.ended.figures.accepted_tokens for r in runs) > 0


def test_free_form_single_stream_matches_without_speculation(smol) -> None:
    off, on = smol
    for text in ("Name three colours.", "Why is the sky blue?", "Write a haiku about a lathe."):
        p = chat(off, text)
        a, ja = submit(off, p, 64)
        b, jb = submit(on, p, 64)
        a.wait(), b.wait()
        assert_same_or_near_tie(on, p, ja.sampled, jb.sampled)


@pytest.mark.usefixtures("rows_cost_nothing")
def test_rejected_drafts_are_rolled_back_in_llama_cpp(smol, monkeypatch) -> None:
    """A drafter that is right for three tokens and then wrong: every step rolls one back."""
    _, on = smol
    prompt = chat(on, f"{WORK_ORDER}\n\nSummarise this in your own words.")
    # the reference from the same engine, so the second run reuses the same prompt cells
    ref, ref_job = submit(on, prompt, 60, speculative=False)
    ref.wait()
    want = ref_job.sampled
    monkeypatch.setattr(NgramIndex, "draft", reference_drafter([prompt], [want]))
    run, job = submit(on, prompt, 60)
    run.wait()
    fig = run.ended.figures
    assert_same_or_near_tie(on, prompt, want, job.sampled)
    assert fig.accepted_tokens > 0 and fig.drafted_tokens > fig.accepted_tokens, fig
    cells_agree(on)
    # the engine's books hold exactly prompt + output (the last token is never decoded)
    slot = on._slots[fig.slot]
    assert len(slot.history) == fig.input_tokens + fig.output_tokens - 1


def test_per_request_opt_out_drafts_nothing(smol) -> None:
    _, on = smol
    run = submit(on, chat(on, COPY), 64, speculative=False)[0].wait()
    assert run.ended.figures.drafted_tokens == 0


@pytest.mark.usefixtures("rows_cost_nothing")
def test_stop_string_cuts_a_draft(smol) -> None:
    off, on = smol
    tokens = chat(off, COPY)
    a = submit(off, tokens, 200, stop=("PS-310",))[0].wait()
    b = submit(on, tokens, 200, stop=("PS-310",))[0].wait()
    assert "seal kit" in a.text.lower() and "PS-310" not in a.text
    assert b.text == a.text and b.ended.reason == "stop"
    assert b.ended.figures.accepted_tokens > 0
    cells_agree(on)


@pytest.mark.usefixtures("rows_cost_nothing")
def test_grammar_constrained_output_is_identical_and_drafts_cannot_break_it(smol, monkeypatch) -> None:
    off, on = smol
    grammar = 'root ::= "{\\"part\\": \\"" [A-Z0-9-]+ "\\"}"'
    sampling = SamplingParams(temperature=0, grammar=grammar)
    tokens = chat(off, f"{WORK_ORDER}\n\nGive the pressure sensor's part number as JSON.")
    a = submit(off, tokens, 40, sampling)[0].wait()
    b = submit(on, tokens, 40, sampling)[0].wait()
    assert b.text == a.text and a.text.startswith('{"part": "')
    # a drafter proposing text the grammar forbids: every draft is cut at its first token
    bad = on.tokenize(" hello world, this is not allowed", add_special=False)
    monkeypatch.setattr(NgramIndex, "draft", lambda self, k: bad[:k])
    c = submit(on, tokens, 40, sampling)[0].wait()
    assert c.text == a.text
    assert c.ended.figures.drafted_tokens > 0 and c.ended.figures.accepted_tokens == 0
    cells_agree(on)


def cancel_mid_draft(engine: Engine) -> Run:
    """Cancel a long copy once it has drafted; the slot is free and the cells agree."""
    run, job = submit(engine, chat(engine, COPY + "\n\nThen copy it again, twice."), 400)
    for _ in range(3000):  # until drafting is under way
        if job.figures.drafted_tokens or run.done.is_set():
            break
        threading.Event().wait(0.01)
    job.cancel()
    assert run.done.wait(60)
    assert isinstance(run.ended, Finished) and run.ended.reason == "cancelled"
    assert run.ended.figures.drafted_tokens > 0
    for _ in range(100):
        if engine.active == 0:
            break
        threading.Event().wait(0.02)
    assert engine.active == 0 and all(s.job is None for s in engine._slots)
    cells_agree(engine)
    return run


@pytest.mark.usefixtures("rows_cost_nothing")
def test_cancelling_mid_draft_frees_the_slot(smol) -> None:
    _, on = smol
    cancel_mid_draft(on)
    assert submit(on, chat(on, "Say hi."), 8)[0].wait().ended.reason in ("stop", "length")


# ----------------------------------------------------------------- tiny models
@pytest.mark.usefixtures("rows_cost_nothing")
def test_tiny_model_greedy_identical_with_speculation(tiny_llm: Path, monkeypatch) -> None:
    """A random model never repeats itself, so the drafter proposes its reference output,
    three tokens right and one wrong, for one stream and for four at once."""
    texts = ("one two three one two three", "a b c d e f g", "red green red green red", "x")
    for parallel in (1, 4):
        off = Engine(EngineConfig("tiny-off", str(tiny_llm), n_ctx=2048, n_parallel=parallel))
        on = Engine(EngineConfig("tiny-on", str(tiny_llm), n_ctx=2048, n_parallel=parallel, speculative="ngram"))
        try:
            prompts = [on.tokenize(t) for t in texts]
            alone = []
            for p in prompts:
                run, job = submit(off, p, 48, ignore_eos=True)
                run.wait()
                alone.append(job.sampled)

            with monkeypatch.context() as m:
                m.setattr(NgramIndex, "draft", reference_drafter(prompts, alone))
                if parallel == 1:  # one stream, same cells: identical
                    runs = []
                    for p, want in zip(prompts, alone):
                        run, job = submit(on, p, 48, ignore_eos=True)
                        run.wait()
                        assert job.sampled == want
                        runs.append((run, job))
                else:
                    runs = [submit(on, p, 48, ignore_eos=True) for p in prompts]
                    for (run, job), p, want in zip(runs, prompts, alone):
                        run.wait()
                        assert_same_or_near_tie(on, p, want, job.sampled)
            figs = [r.ended.figures for r, _ in runs]
            assert sum(f.accepted_tokens for f in figs) > 0
            assert sum(f.drafted_tokens for f in figs) > sum(f.accepted_tokens for f in figs)
            cells_agree(on)
        finally:
            off.close()
            on.close()


def test_sampled_tokens_keep_the_target_distribution(tiny_llm: Path, monkeypatch) -> None:
    """Chi-square: (t1, t2, t3) sampled with drafts verified vs sampled without, other seeds.

    The drafter always proposes the greedy continuation, so most steps verify a draft
    that is accepted only sometimes: accepting it whenever it is merely plausible, or
    sampling a drafted row from the wrong context, would shift these frequencies.
    """
    off = Engine(EngineConfig("tiny-off", str(tiny_llm), n_ctx=1024, n_parallel=4))
    on = Engine(EngineConfig("tiny-on", str(tiny_llm), n_ctx=1024, n_parallel=4, speculative="ngram"))
    try:
        prompt = on.tokenize("the valve")
        greedy, greedy_job = submit(off, prompt, 4, ignore_eos=True)
        greedy.wait()
        g = greedy_job.sampled
        monkeypatch.setattr(NgramIndex, "draft", lambda self, k: g[1:1 + k])
        # verify a draft every step: a draft's row costs about a whole step on this tiny
        # model, so the planner would (rightly) skip most of them
        monkeypatch.setattr(StepCosts, "explore", lambda self: True)

        figs = []

        def draws(engine: Engine, seeds: range) -> list[str]:
            out = []
            for batch in range(seeds.start, seeds.stop, 4):
                runs = [submit(engine, prompt, 3, SamplingParams(temperature=1.0, top_k=3, seed=s),
                               ignore_eos=True)[0] for s in range(batch, min(batch + 4, seeds.stop))]
                out += [r.wait().text for r in runs]
                figs.extend(r.ended.figures for r in runs)
            return out

        n = 360
        with_spec = draws(on, range(0, n))
        without = draws(off, range(10_000, 10_000 + n))
        drafted, accepted = sum(f.drafted_tokens for f in figs), sum(f.accepted_tokens for f in figs)
        assert drafted > accepted > 0, (drafted, accepted, g)  # drafts were verified, some accepted, some not
        labels = sorted(set(with_spec) | set(without))
        counts = np.array([[with_spec.count(x) for x in labels], [without.count(x) for x in labels]])
        # pool rare outcomes so every expected count is large enough for the test
        keep = counts.sum(axis=0) >= 10
        table = np.column_stack([counts[:, keep], counts[:, ~keep].sum(axis=1)]) if (~keep).any() else counts[:, keep]
        table = table[:, table.sum(axis=0) > 0]
        assert table.shape[1] >= 3, "the tiny model's outputs are too concentrated to test"
        p = chi2_contingency(table).pvalue
        assert p > 0.001, (p, table)
    finally:
        off.close()
        on.close()


# ----------------------------------------------------------------- with images and preemption
@pytest.mark.usefixtures("rows_cost_nothing")
def test_drafts_after_an_image_keep_m_rope_positions(tmp_path: Path, monkeypatch) -> None:
    """Qwen2-VL family: rows after an image sit at M-RoPE-shifted positions; drafts too."""
    from bench.tinymodels import tiny_vlm
    from models.vision import VisionEncoder
    from tests.test_mrope import _image, _segments

    llm, mmproj = tiny_vlm(tmp_path, "qwen2vl", llm={"attn_std": 0.3})
    cfg = dict(path=str(llm), n_ctx=1024, n_parallel=1, n_batch=64, mmproj_path=str(mmproj))
    off = Engine(EngineConfig(model_id="q-off", **cfg))
    on = Engine(EngineConfig(model_id="q-on", speculative="ngram", **cfg))
    encoder = VisionEncoder(str(mmproj), off.model, n_threads=2)
    try:
        segments = _segments(encoder, off, f"look {encoder.media_marker} what is wrong here",
                             [_image(96, 64, seed=3)])
        run, job = Run(), None
        req = GenerationRequest(segments, SamplingParams(temperature=0), 24, ignore_eos=True)
        job = off.submit(req, run, max_queue=1)
        run.wait()
        want = job.sampled
        n_prompt = job.n_prompt

        def draft(self: NgramIndex, k: int) -> list[int]:  # the reference, 3 right then 1 wrong
            done = len(self.tokens) - n_prompt
            return (want[done:done + 3] + [want[0]])[:k]

        monkeypatch.setattr(NgramIndex, "draft", draft)
        run2 = Run()
        job2 = on.submit(GenerationRequest(segments, SamplingParams(temperature=0), 24, ignore_eos=True),
                         run2, max_queue=1)
        run2.wait()
        assert job2.sampled == want
        fig = run2.ended.figures
        assert fig.drafted_tokens > fig.accepted_tokens > 0
        slot = on._slots[0]
        assert slot.shift != 0  # the image advanced positions by its grid, not its rows
        cells_agree(on)
    finally:
        encoder.close()
        off.close()
        on.close()


@pytest.mark.usefixtures("rows_cost_nothing")
def test_a_preempted_request_resumes_and_keeps_drafting(tiny_llm: Path, monkeypatch) -> None:
    """Two long generations outgrow a small pool: the younger is preempted, resumes, and
    its tokens after the cut are what the model continues with."""
    ref = Engine(EngineConfig("ref", str(tiny_llm), n_ctx=2048, n_parallel=1))
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=1024, n_parallel=2, speculative="ngram"))
    try:
        prompts = [eng.tokenize(eng.template.render([{"role": "user", "content": t}])) for t in ("first", "second")]
        refs = []
        for p in prompts:
            run, job = submit(ref, p, 600, ignore_eos=True)
            run.wait(180)
            refs.append(job.sampled)

        monkeypatch.setattr(NgramIndex, "draft", reference_drafter(prompts, refs))
        a, ja = submit(eng, prompts[0], 600, ignore_eos=True)
        assert a.first.wait(60)
        b, jb = submit(eng, prompts[1], 600, ignore_eos=True)
        a.wait(180), b.wait(180)
        assert jb.preemptions >= 1 and len(jb.sampled) == 600
        assert b.ended.figures.accepted_tokens > 0 and a.ended.figures.accepted_tokens > 0
        for want, job in ((refs[0], ja), (refs[1], jb)):
            assert_same_or_near_tie(ref, prompts[refs.index(want)], want, job.sampled)
        cells_agree(eng)
    finally:
        ref.close()
        eng.close()
