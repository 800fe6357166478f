"""Continuous batching and KV-prefix reuse in the engine, on a real tiny GGUF."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import re
import threading
import time
import types
from pathlib import Path
from typing import Iterator

import llama_cpp
import pytest

import models.engine.worker as worker_module
import models.llama_lib as llama_lib
from models.engine import (KV_WINDOW_PAD, PARK_MIN_PREFILL, Engine, EngineConfig, Failed, Finished,
                           GenerationRequest, Job, PromptTooLong, TextDelta)
from models.engine.slots import Slot, common_prefix, pool_cells
from models.sampling import SamplingParams
from telemetry.record import RequestRecord


class Run:
    """Collects one job's events; ``wait`` fills ``record`` from the final one, as the server does."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.done = threading.Event()
        self.finish: str | None = None
        self.error: Exception | None = None
        self.first_delta_at: float | None = None
        self.record: RequestRecord | None = None
        self.job: Job | None = None
        self.done_at: float | None = None
        self.ended: Finished | Failed | None = None

    def __call__(self, event: object) -> None:
        if isinstance(event, TextDelta):
            if self.first_delta_at is None:
                self.first_delta_at = time.monotonic()
            self.parts.append(event.text)
        elif isinstance(event, Finished):
            self.finish = event.reason
            self.done_at = time.monotonic()
            self.ended = event
            self.done.set()
        elif isinstance(event, Failed):
            self.error = event.error
            self.ended = event
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def wait(self, timeout: float = 60) -> "Run":
        assert self.done.wait(timeout), "generation did not finish"
        if self.record is not None and self.ended is not None:
            self.ended.figures.fill(self.record)
        return self


def submit(engine: Engine, prompt: str, max_tokens: int = 24, *, max_queue: int = 16, **kw: object) -> Run:
    run = Run()
    run.record = RequestRecord(operation="chat", model=engine.info)
    req = GenerationRequest([engine.tokenize(prompt)], SamplingParams(temperature=0), max_tokens,
                            ignore_eos=True, **kw)  # type: ignore[arg-type]
    run.job = engine.submit(req, run, max_queue=max_queue)
    return run


@pytest.fixture
def engine(tiny_llm: Path) -> Iterator[Engine]:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=4))
    yield eng
    eng.close()


def chat(engine: Engine, text: str) -> str:
    return engine.template.render([{"role": "user", "content": text}])


PROMPTS = ["Name a colour.", "Tell me about cats.", "What is 2+2?", "Write a short poem."]


def test_batched_greedy_outputs_equal_sequential(engine: Engine) -> None:
    prompts = [chat(engine, p) for p in PROMPTS]
    sequential = [submit(engine, p).wait().text for p in prompts]
    runs = [submit(engine, p) for p in prompts]
    batched = [r.wait().text for r in runs]
    assert batched == sequential
    assert all(r.record.batch_size_mean and r.record.batch_size_mean > 1.5 for r in runs)
    assert len({r.record.slot for r in runs}) == 4


def test_argmax_greedy_picks_what_llama_cpp_greedy_sampler_picks(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    chains: list[SamplingParams] = []
    build = worker_module.build_sampler
    monkeypatch.setattr(worker_module, "build_sampler",
                        lambda params, vocab, banned=(): chains.append(params) or build(params, vocab, banned))
    prompts = [chat(engine, p) for p in PROMPTS]
    fast = [submit(engine, p, max_tokens=64) for p in prompts]
    fast_texts = [r.wait().text for r in fast]
    assert chains == []  # plain greedy ran without a llama.cpp sampler chain
    monkeypatch.setattr(SamplingParams, "plain_greedy", property(lambda self: False))
    chained = [submit(engine, p, max_tokens=64) for p in prompts]
    assert [r.wait().text for r in chained] == fast_texts
    assert len(chains) == len(prompts)
    assert all(r.finish == "length" for r in fast + chained)


def test_greedy_rows_stay_exact_beside_sampled_requests_in_one_step(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    # Greedy tokens come from one argmax over the step's logits rows while sampled
    # requests read their own row through a sampler chain: rows must not get mixed up.
    monkeypatch.setattr(worker_module, "ARRIVAL_WAIT_S", 30.0)  # only the arrivals end the wait
    greedy_prompts = [chat(engine, p) for p in PROMPTS[:2]]
    alone = [submit(engine, p, max_tokens=32).wait().text for p in greedy_prompts]

    def sampled(prompt: str, seed: int) -> Run:
        run = Run()
        run.record = RequestRecord(operation="chat", model=engine.info)
        req = GenerationRequest([engine.tokenize(chat(engine, prompt))], SamplingParams(temperature=0.9, seed=seed),
                                32, ignore_eos=True)
        run.job = engine.submit(req, run, max_queue=16)
        return run

    with engine.preparing():  # all four start in the same step
        runs = [sampled(PROMPTS[2], 1), submit(engine, greedy_prompts[0], max_tokens=32),
                sampled(PROMPTS[3], 2), submit(engine, greedy_prompts[1], max_tokens=32)]
    for r in runs:
        r.wait()
    assert [runs[1].text, runs[3].text] == alone
    assert all(r.record.batch_size_mean == 4 for r in runs)
    assert all(r.record.output_tokens == 32 and r.finish == "length" for r in runs)


def test_requests_arriving_together_share_the_idle_engines_first_step(
        engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "ARRIVAL_WAIT_S", 30.0)  # only the arrivals end the wait
    with engine.preparing():  # the server is still preparing a second request
        first = submit(engine, chat(engine, PROMPTS[0]), max_tokens=1)
        time.sleep(0.05)  # the idle engine holds its first step meanwhile
        assert first.job.slot is None
        second = submit(engine, chat(engine, PROMPTS[1]), max_tokens=1)
    first.wait(), second.wait()
    assert first.record.batch_size_mean == second.record.batch_size_mean == 2


def test_an_idle_engine_waits_only_briefly_for_requests_still_being_prepared(engine: Engine) -> None:
    with engine.preparing():  # e.g. an image still encoding: never submitted in time
        alone = submit(engine, chat(engine, PROMPTS[0]), max_tokens=1).wait()
    assert alone.finish == "length" and alone.record.batch_size_mean == 1
    assert alone.record.queue_ms < 1000 * worker_module.ARRIVAL_WAIT_S + 500


def test_cancelled_sequence_frees_its_slot_while_others_stream(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2))
    try:
        victim = submit(eng, chat(eng, "a"), max_tokens=1500)
        other = submit(eng, chat(eng, "b"), max_tokens=1500)
        while len(victim.parts) < 3:
            time.sleep(0.005)
        victim.job.cancel()
        victim.wait(5)
        assert victim.finish == "cancelled"
        # The freed slot is taken by a new request while `other` is still streaming: with
        # both slots still held, `third` would wait for all 1500 of `other`'s tokens.
        third = submit(eng, chat(eng, "c"), max_tokens=5)
        third.wait(30)
        assert third.finish == "length" and third.record.output_tokens == 5
        assert not other.done.is_set() and len(other.parts) < 1500
        other.job.cancel()
        other.wait(5)
    finally:
        eng.close()


def test_prefix_reuse_matches_cold_run_and_prefills_only_the_suffix(tiny_llm: Path, engine: Engine) -> None:
    turn1 = [{"role": "system", "content": "You are terse. " * 20},
             {"role": "user", "content": "First question?"}]
    first = submit(engine, engine.template.render(turn1)).wait()
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And?"}]
    prompt2 = engine.template.render(turn2)
    warm = submit(engine, prompt2).wait()
    n_prompt = len(engine.tokenize(prompt2))
    assert warm.record.cached_tokens > 0.5 * n_prompt
    assert warm.record.prefilled_tokens == n_prompt - warm.record.cached_tokens
    # The reused prefix is exactly the first turn's prompt plus the tokens it generated.
    n_first = len(engine.tokenize(engine.template.render(turn1)))
    assert warm.record.cached_tokens >= n_first
    cold_engine = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=1))
    try:
        cold = submit(cold_engine, prompt2).wait()
    finally:
        cold_engine.close()
    assert cold.record.cached_tokens == 0
    assert warm.text == cold.text


def _slot_of(engine: Engine, run: Run) -> "Slot":
    return next(s for s in engine._slots if s.seq_id == run.record.slot)


def _pool_cells(engine: Engine, slot: "Slot") -> int:
    return int(llama_cpp.llama_memory_seq_pos_max(engine.mem, slot.seq_id)) + 1


def _two_turns(engine: Engine) -> tuple[Run, str]:
    """Turn 1 of a chat, then a long unrelated prompt that parks it; returns turn 2's prompt."""
    turn1 = [{"role": "system", "content": "You are terse. " * 20},
             {"role": "user", "content": "First question?"}]
    first = submit(engine, engine.template.render(turn1)).wait()
    long_run = submit(engine, "river " * (PARK_MIN_PREFILL + 50), max_tokens=4).wait()
    assert long_run.record.slot != first.record.slot  # an unrelated prompt leaves the chat's slot alone
    turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And?"}]
    return first, engine.template.render(turn2)


def _cold(tiny_llm: Path, prompt: str, max_tokens: int = 24) -> Run:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=1))
    try:
        return submit(eng, prompt, max_tokens=max_tokens).wait()
    finally:
        eng.close()


def test_long_prompt_parks_idle_caches_in_ram_and_the_next_turn_restores_them(
        tiny_llm: Path, engine: Engine) -> None:
    first, prompt2 = _two_turns(engine)
    chat_slot = _slot_of(engine, first)
    n_history = len(chat_slot.history)
    assert chat_slot.parked is not None and _pool_cells(engine, chat_slot) == 0
    warm = submit(engine, prompt2).wait()
    assert chat_slot.parked is None  # the parked copy is gone once restored
    assert warm.record.slot == first.record.slot
    assert warm.record.restored_tokens == n_history
    n_prompt = len(engine.tokenize(prompt2))
    assert warm.record.cached_tokens >= first.record.input_tokens  # the whole first turn came back
    assert warm.record.prefilled_tokens == n_prompt - warm.record.cached_tokens
    assert warm.text == _cold(tiny_llm, prompt2).text


@pytest.mark.parametrize("first_answer, answer, parks", [
    (8, 4, False),  # a few idle cells and a short answer stay within one padding step
    (KV_WINDOW_PAD + 40, 4, True),  # idle cells alone fill a step
    (KV_WINDOW_PAD // 2, KV_WINDOW_PAD // 2, True),  # fewer, but the answer would cross a step beside them
])
def test_a_short_request_parks_idle_caches_that_would_widen_its_attention(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch, first_answer: int, answer: int, parks: bool) -> None:
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")  # read when the context is made
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2))
    try:
        idle = _slot_of(eng, submit(eng, "<|im_start|>user\nCount.<|im_end|>\n", max_tokens=first_answer).wait())
        with KvCellLog() as log:
            short = submit(eng, "<|im_start|>user\nName a bird.<|im_end|>\n", max_tokens=answer).wait()
        assert short.record.slot != idle.seq_id and short.record.prefilled_tokens < PARK_MIN_PREFILL
        # llama.cpp's own account: attention spans one past the highest cell in use
        window = max(n for n, _ in log.seen)
        if parks:  # the short request decoded beside none of them, in a window of its own cells
            assert idle.parked is not None and _pool_cells(eng, idle) == 0
            assert window <= KV_WINDOW_PAD < len(idle.history) + short.record.input_tokens + answer
        else:  # a few idle cells cannot widen the window: they stay in the pool
            assert idle.parked is None and _pool_cells(eng, idle) == len(idle.history)
            assert window <= KV_WINDOW_PAD
    finally:
        eng.close()


def test_a_restored_cache_lands_below_idle_cells_not_above_them(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")  # read when the context is made
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2))
    manual = "Manual: " + "check the guard. " * 60
    try:
        chat_ = submit(eng, manual + "Question one?", max_tokens=8).wait()
        long_ = submit(eng, "river " * (PARK_MIN_PREFILL + 100), max_tokens=4).wait()  # parks the manual chat
        chat_slot, long_slot = _slot_of(eng, chat_), _slot_of(eng, long_)
        assert chat_slot.parked is not None and long_slot.parked is None  # the long prompt idles in the pool
        with KvCellLog() as log:
            short = submit(eng, "Manual: " + "check the guard. " * 12 + "Is it on?", max_tokens=16).wait()
        assert short.record.slot == chat_slot.seq_id and 0 < short.record.restored_tokens
        # The idle long prompt was parked before the manual came back, so the copy (cut to
        # the shared prefix) lies in the lowest cells: the short request attends over its
        # own cells, not over cells above the long prompt's for its whole life.
        assert long_slot.parked is not None
        assert max(n for n, _ in log.seen) <= KV_WINDOW_PAD < long_.record.input_tokens
    finally:
        eng.close()


def test_a_request_restoring_its_slot_still_shares_the_prefix_an_idle_slot_holds(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=3))
    head = "Line 4 log: "
    system = head + "System: lock out the press before opening the guard. " * 16
    try:
        old = submit(eng, head + "check the guard. " * 60 + "Question one?", max_tokens=4).wait()
        submit(eng, "river " * (PARK_MIN_PREFILL + 100), max_tokens=4).wait()  # parks the old chat
        source = submit(eng, system + "Hello", max_tokens=4).wait()
        assert _slot_of(eng, old).parked is not None and _slot_of(eng, source).parked is None
        prompt = system + "Is the guard on?"
        run = submit(eng, prompt, max_tokens=8).wait()
        # the least recently used slot, whose parked chat shares the log's head: it comes
        # back, and the idle slot holding the system prompt stays in the pool to share it
        assert run.record.slot == old.record.slot and run.record.restored_tokens > 0
        assert run.record.shared_tokens >= len(eng.tokenize(system)) - len(eng.tokenize(head)) - 2
        assert run.text == _cold(tiny_llm, prompt, max_tokens=8).text
    finally:
        eng.close()


def test_an_unrelated_prompt_drops_a_parked_cache_without_restoring_it(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2))
    try:
        first, _ = _two_turns(eng)
        chat_slot = _slot_of(eng, first)
        assert len(chat_slot.history) > 100
        # shares only the template's first token with the parked chat: not worth a copy
        other = submit(eng, "<|im_start|>user\nHello there<|im_end|>\n", max_tokens=4).wait()
        assert other.record.slot == first.record.slot
        assert other.record.restored_tokens == 0 and other.record.cached_tokens == 0
        assert chat_slot.parked is None and _pool_cells(eng, chat_slot) == len(chat_slot.history)
    finally:
        eng.close()


def test_a_parked_cache_that_cannot_be_restored_is_prefilled_again(
        tiny_llm: Path, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    first, prompt2 = _two_turns(engine)
    monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data", lambda *a: 0)  # llama.cpp found no room
    warm = submit(engine, prompt2).wait()
    assert warm.error is None
    assert warm.record.restored_tokens == 0
    assert warm.record.cached_tokens == 0
    assert warm.text == _cold(tiny_llm, prompt2).text


class KvCellLog:
    """llama.cpp's own account of the shared pool at each allocation (``LLAMA_KV_CACHE_DEBUG``).

    ``n`` is one past the highest cell in use: attention spans that many cells (padded to
    256), however few of them are in use.
    """

    PATTERN = re.compile(rb"find_slot: stream\[0\], n = +(\d+), used = +(\d+)")

    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
            match = self.PATTERN.search(text or b"")
            if match:
                self.seen.append((int(match.group(1)), int(match.group(2))))

        self._callback = callback  # llama.cpp holds only the C pointer

    def __enter__(self) -> "KvCellLog":
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc: object) -> None:
        llama_cpp.llama_log_set(llama_lib._log_callback, ctypes.c_void_p(0))


@contextlib.contextmanager
def cell_counts(engine: Engine) -> Iterator[list[tuple[int, int]]]:
    """(the engine's count of cells in use, llama.cpp's own) before each ``llama_decode``.

    The engine must have been made with ``LLAMA_KV_CACHE_DEBUG=1`` in the environment.
    """
    decode = llama_cpp.llama_decode
    checked: list[tuple[int, int]] = []

    def counted_decode(ctx: object, batch: llama_cpp.llama_batch) -> int:
        ours = pool_cells(engine._slots) - batch.n_tokens  # this step's rows are in history
        seen = len(log.seen)
        rc = decode(ctx, batch)
        checked.append((ours, log.seen[seen][1]))
        return rc

    with KvCellLog() as log:
        llama_cpp.llama_decode = counted_decode
        try:
            yield checked
        finally:
            llama_cpp.llama_decode = decode


def test_a_burst_restores_parked_caches_into_the_cells_it_freed(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")  # read when the context is made
    monkeypatch.setattr(worker_module, "ARRIVAL_WAIT_S", 30.0)  # each burst starts in one step
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=4))

    def burst(tag: str) -> list[Run]:
        with eng.preparing():
            runs = [submit(eng, chat(eng, f"Shift {tag}{i}: " + "check the line. " * 8), max_tokens=16)
                    for i in range(4)]
        return [r.wait() for r in runs]

    try:
        with KvCellLog() as log:
            burst("a")
            long_chat = submit(eng, "river " * (PARK_MIN_PREFILL + 300), max_tokens=4).wait()
            assert sum(s.parked is not None for s in eng._slots) == 3  # the idle short chats left the pool
            log.seen.clear()
            runs = burst("b")
        assert sum(r.record.restored_tokens > 0 for r in runs) == 3  # their shared prefix came back
        assert any(r.record.slot == long_chat.record.slot for r in runs)  # the long chat gave way
        # The long chat's cells were trimmed before the parked caches came back, so these
        # landed in its holes: attention spans the burst's cells, not the old chat's.
        assert max(used for _, used in log.seen) < long_chat.record.input_tokens  # the long chat's cells went
        assert max(n for n, _ in log.seen) <= max(used for _, used in log.seen) + 16
    finally:
        eng.close()


MANUAL = "Line 4 safety manual: lock out the press, check the guard, log every stop. " * 12


def _start_together(engine: Engine, prompts: list[str], max_tokens: int = 16) -> list[Run]:
    """Submit ``prompts`` so they start in one step (ARRIVAL_WAIT_S raised) and wait for all."""
    with engine.preparing():
        runs = [submit(engine, p, max_tokens=max_tokens) for p in prompts]
    return [r.wait() for r in runs]


def _operator_prompt(engine: Engine, question: str) -> str:
    return engine.template.render([{"role": "system", "content": MANUAL}, {"role": "user", "content": question}])


def test_requests_starting_together_prefill_their_shared_system_prompt_once(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")  # read when the context is made
    monkeypatch.setattr(worker_module, "ARRIVAL_WAIT_S", 30.0)  # the burst starts in one step
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=4))
    prompts = [_operator_prompt(eng, q) for q in PROMPTS]
    tokens = [eng.tokenize(p) for p in prompts]
    shared = common_prefix(tokens[0], tokens[1])
    assert shared > 100 and all(common_prefix(tokens[0], t) == shared for t in tokens[1:])
    try:
        with KvCellLog() as log:
            runs = _start_together(eng, prompts)
    finally:
        eng.close()
    records = [r.record for r in runs]
    assert sorted(rec.shared_tokens for rec in records) == [0, shared, shared, shared]
    for rec, toks in zip(records, tokens):
        assert rec.cached_tokens == 0 and rec.input_tokens == len(toks)
        assert rec.prefilled_tokens == len(toks) - rec.shared_tokens
        assert rec.batch_size_mean == 4
    # the manual's cells exist once in the pool, not four times ("used" is read before each
    # step places its rows: the first nonzero reading counts what the joint prefill left)
    after_prefill = next(used for _, used in log.seen if used)
    assert after_prefill == sum(len(t) for t in tokens) - 3 * shared
    assert [r.text for r in runs] == [_cold(tiny_llm, p, max_tokens=16).text for p in prompts]


def test_a_new_conversation_shares_a_cached_system_prompt_and_leaves_idle_chats_alone(
        tiny_llm: Path, engine: Engine) -> None:
    first = submit(engine, _operator_prompt(engine, PROMPTS[0])).wait()
    # Another operator, the same manual: it takes an empty slot and borrows the manual's
    # cells instead of taking over the first chat's slot.
    second_prompt = _operator_prompt(engine, PROMPTS[1])
    second = submit(engine, second_prompt).wait()
    shared = common_prefix(engine.tokenize(_operator_prompt(engine, PROMPTS[0])),
                                          engine.tokenize(second_prompt))
    assert second.record.slot != first.record.slot
    assert second.record.shared_tokens == second.record.cached_tokens == shared
    assert second.record.prefilled_tokens == second.record.input_tokens - shared
    assert second.text == _cold(tiny_llm, second_prompt).text
    # the first operator's chat is still whole: its next turn prefills only the new message
    turn2 = engine.template.render([{"role": "system", "content": MANUAL},
                                    {"role": "user", "content": PROMPTS[0]},
                                    {"role": "assistant", "content": first.text},
                                    {"role": "user", "content": "And?"}])
    warm = submit(engine, turn2).wait()
    assert warm.record.slot == first.record.slot
    assert warm.record.cached_tokens >= first.record.input_tokens and warm.record.shared_tokens == 0
    assert warm.text == _cold(tiny_llm, turn2).text


def test_a_follower_goes_on_alone_when_its_leader_is_cancelled_mid_prefill(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_module, "ARRIVAL_WAIT_S", 30.0)
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2, n_batch=32))
    put_prompt = eng._put_prompt

    def cancel_leader_after_one_chunk(job: Job, *args: object) -> int:
        row = put_prompt(job, *args)  # type: ignore[arg-type]
        if job.followers:
            job.cancel()  # seen at the start of the next step
        return row

    monkeypatch.setattr(eng, "_put_prompt", cancel_leader_after_one_chunk)
    prompts = [_operator_prompt(eng, q) for q in PROMPTS[:2]]
    try:
        runs = _start_together(eng, prompts)
    finally:
        eng.close()
    leader, follower = sorted(runs, key=lambda r: r.record.shared_tokens)
    assert leader.finish == "cancelled"
    assert 0 < follower.record.shared_tokens <= 32  # one chunk rode along, then it went on alone
    assert follower.record.prefilled_tokens == follower.record.input_tokens - follower.record.shared_tokens
    assert follower.finish == "length" and follower.text == _cold(tiny_llm, prompts[runs.index(follower)], max_tokens=16).text


def test_parked_caches_are_bounded_by_the_context_size(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=4))
    try:
        words = ["river", "garden", "window", "market"]  # a token each
        runs = [submit(eng, f"{w} " * 700, max_tokens=4).wait() for w in words]
        slots = [_slot_of(eng, r) for r in runs]
        assert len({s.seq_id for s in slots}) == 4
        parked = [s for s in eng._slots if s.parked is not None]
        assert sum(len(s.history) for s in parked) <= eng.n_ctx
        # three 700-token caches were parked in turn; the oldest was dropped to stay in bounds
        assert slots[0].history == [] and slots[0].parked is None
        assert slots[1].parked is not None and slots[2].parked is not None
        assert _pool_cells(eng, slots[3]) == len(slots[3].history)  # the last one stays in the pool
    finally:
        eng.close()


def _other_conversations(engine: Engine, n: int) -> None:
    for i in range(n):
        submit(engine, chat(engine, f"Shift {i}: " + "check the line and log the stop. " * 10), max_tokens=8).wait()


@pytest.mark.parametrize("layout", ["shared", "per-slot"])
@pytest.mark.parametrize("cache_mb", [256, 0])
def test_a_prompt_asked_again_after_more_conversations_than_slots_comes_back_from_ram(
        tiny_llm: Path, layout: str, cache_mb: int) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2, kv_layout=layout,
                              prompt_cache_mb=cache_mb))
    try:
        doc = chat(eng, "Work order 7: " + "replace the belt on press four, then test the guard. " * 12)
        items = eng.tokenize(doc)
        first = submit(eng, doc).wait()
        _other_conversations(eng, 3)  # each slot went to another conversation since
        assert all(common_prefix(s.history, items) < len(items) // 2 for s in eng._slots)
        again = submit(eng, doc).wait()
        assert again.text == first.text
        if cache_mb:
            assert again.record.restored_tokens >= len(items)
            assert again.record.cached_tokens == len(items) - 1 and again.record.prefilled_tokens == 1
            assert 0 < eng._prompt_cache.nbytes <= cache_mb << 20
            assert eng.memory_bytes >= eng._load_bytes + eng._prompt_cache.nbytes
        else:  # without it the document is prefilled again: what the cache saves
            assert again.record.restored_tokens == 0
            assert again.record.prefilled_tokens > len(items) // 2
    finally:
        eng.close()


def test_a_cached_prompt_of_the_default_model_answers_alike_or_parts_at_a_near_tie(default_gguf: Path) -> None:
    # In the shared pool a restored copy lies among other sequences' cells, not where its
    # first prefill put it, and attention sums in another order: on this prompt the default
    # model's answer parts at a near-tie on some CPUs. What must never happen is a change
    # where the model was not near one (a copy restored at wrong positions or cells).
    from tests.test_speculative import assert_same_or_near_tie

    eng = Engine(EngineConfig("smol", str(default_gguf), n_ctx=2048, n_parallel=2, speculative="off"))
    try:
        doc = chat(eng, "Work order 7, press four: " + "replace the drive belt, then test the guard and log it. " * 10)
        first = submit(eng, doc, max_tokens=12).wait()
        _other_conversations(eng, 3)
        again = submit(eng, doc, max_tokens=12).wait()
        assert again.record.cached_tokens == len(eng.tokenize(doc)) - 1 and again.record.restored_tokens > 0
        assert_same_or_near_tie(eng, eng.tokenize(doc), first.job.sampled, again.job.sampled)
    finally:
        eng.close()


def test_a_chat_coming_back_after_other_conversations_continues_from_ram(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=2))
    try:
        turn1 = [{"role": "system", "content": "You are the line 4 assistant. " * 8},
                 {"role": "user", "content": "What is the torque for the guard bolts?"}]
        first = submit(eng, eng.template.render(turn1)).wait()
        _other_conversations(eng, 3)
        turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And?"}]
        prompt2 = eng.template.render(turn2)
        warm = submit(eng, prompt2).wait()
        assert warm.record.cached_tokens >= first.record.input_tokens  # the whole first turn came back
        assert warm.record.prefilled_tokens == len(eng.tokenize(prompt2)) - warm.record.cached_tokens
        assert warm.text == _cold(tiny_llm, prompt2).text
    finally:
        eng.close()


def test_restoring_cached_prompts_keeps_the_engines_cell_count_equal_to_llama_cpps(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=1024, n_parallel=2, n_batch=64))
    docs = [chat(eng, f"Manual {i}: " + f"step {i} of the press check. " * 15) for i in range(4)]
    runs: list[Run] = []
    try:
        with cell_counts(eng) as checked:
            for doc in docs + docs[::-1] + docs:  # four documents through two slots, three times
                runs.append(submit(eng, doc, max_tokens=12).wait())
    finally:
        eng.close()
    assert all(r.error is None for r in runs)
    # after the first round every document comes back whole: from its slot, parked or cached
    assert all(r.record.cached_tokens == r.record.input_tokens - 1 for r in runs[4:])
    assert sum(r.record.restored_tokens > 0 for r in runs) >= 4  # at least two a round from RAM
    assert [r.text for r in runs[4:8]] == [r.text for r in runs[3::-1]]
    assert len(checked) > 50 and all(ours == theirs for ours, theirs in checked)


def test_prompt_that_never_fits_is_refused_and_one_that_fits_later_is_served(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=512, n_parallel=2))
    try:
        with pytest.raises(PromptTooLong) as exc:
            submit(eng, "hello " * 600)
        assert exc.value.status == 400 and "512" in str(exc.value)
        a = submit(eng, "word " * 200, max_tokens=100)
        b = submit(eng, "river " * 200, max_tokens=100)  # 2 x (200 + 100) > 512: must wait
        b.wait()
        a.wait()
        assert a.error is None and b.error is None
        assert a.record.output_tokens == 100 and b.record.output_tokens == 100
        assert b.first_delta_at >= a.done_at  # queued until `a` released its KV cells
    finally:
        eng.close()


def test_requests_sharing_a_prefix_fit_together_where_two_copies_would_not(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=512, n_parallel=2))
    manual = "word " * 200
    try:
        with cell_counts(eng) as checked:
            a = submit(eng, manual + "a", max_tokens=100)
            b = submit(eng, manual + "b", max_tokens=100)  # 2 x (200 + 100) > 512, but one manual
            a.wait(), b.wait()
    finally:
        eng.close()
    assert a.record.output_tokens == b.record.output_tokens == 100
    assert b.first_delta_at < a.done_at  # they ran side by side
    assert b.record.shared_tokens >= 200 and "engine.preemptions" not in b.record.middleware
    assert checked and all(ours == theirs for ours, theirs in checked), checked
    assert max(theirs for _, theirs in checked) < 2 * 200  # the manual's cells exist once
    assert b.text == _cold(tiny_llm, manual + "b", max_tokens=100).text


def test_a_mixed_load_keeps_the_engines_cell_count_equal_to_llama_cpps(
        tiny_llm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Bursts and stragglers with two manuals or none, cancellations, a small context:
    # borrowing, joint prefill, eviction and parking all happen; none may fail a request
    # or let the engine's account of the pool drift from llama.cpp's.
    import random

    monkeypatch.setenv("LLAMA_KV_CACHE_DEBUG", "1")
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=512, n_parallel=4, n_batch=64))
    rng = random.Random(5)
    manuals = [MANUAL, "Line 2: check the guard before every shift. " * 15, ""]
    runs: list[Run] = []
    try:
        with cell_counts(eng) as checked:
            for _ in range(8):
                with eng.preparing():
                    for _ in range(rng.randint(1, 6)):
                        system = rng.choice(manuals)
                        question = " ".join(rng.choice(["press", "jam", "guard", "stop", "log"])
                                            for _ in range(rng.randint(1, 12)))
                        messages = ([{"role": "system", "content": system}] if system else []) + \
                            [{"role": "user", "content": question}]
                        # the bursts may pile up on a slow machine; the queue limit is not under test
                        runs.append(submit(eng, eng.template.render(messages), max_tokens=rng.randint(1, 120),
                                           max_queue=64))
                        if rng.random() < 0.15:
                            runs[-1].job.cancel()
                time.sleep(rng.random() * 0.2)
            for r in runs:
                r.wait()
    finally:
        eng.close()
    assert all(r.error is None and r.finish in ("length", "cancelled") for r in runs)
    assert sum(r.record.shared_tokens > 0 for r in runs) > len(runs) // 3
    assert len(checked) > 100 and all(ours == theirs for ours, theirs in checked)


def test_kv_pressure_preempts_the_youngest_request_which_resumes_later(tiny_llm: Path) -> None:
    # Two long generations are admitted side by side (each reserves only its prompt plus
    # 256 cells), then outgrow the shared 1024-cell context together.
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=1024, n_parallel=2))
    try:
        a = submit(eng, chat(eng, "first"), max_tokens=600)
        while not a.parts:
            time.sleep(0.001)
        b = submit(eng, chat(eng, "second"), max_tokens=600)
        a.wait(120)
        b.wait(120)
        assert a.error is None and b.error is None
        # Nobody was cut short: both produced every token they asked for.
        assert a.finish == b.finish == "length"
        assert a.record.output_tokens == 600 and b.record.output_tokens == 600
        assert b.record.middleware.get("engine.preemptions", 0) >= 1
        assert "engine.preemptions" not in a.record.middleware
        # Resuming re-prefills prompt + generated tokens and carries on where it stopped:
        # the tokens after the preemption point are what a cold engine continues with.
        cut = b.job.preempted_at[0]
        assert 0 < cut < 600
        prompt = eng.tokenize(chat(eng, "second"))
        cold_engine = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=2048, n_parallel=1))
        try:
            cold = Run()
            cold.record = RequestRecord(operation="chat", model=cold_engine.info)
            cold.job = cold_engine.submit(
                GenerationRequest([prompt + b.job.sampled[:cut]], SamplingParams(temperature=0), 16,
                                  ignore_eos=True), cold, max_queue=1)
            cold.wait()
        finally:
            cold_engine.close()
        assert cold.job.sampled == b.job.sampled[cut:cut + 16]
        assert len(b.job.sampled) == 600
    finally:
        eng.close()


def test_long_prompt_prefill_is_chunked_between_decode_steps(tiny_llm: Path) -> None:
    eng = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=4096, n_parallel=2))
    try:
        stamps: list[float] = []
        a = Run()

        def sink(event: object) -> None:
            if isinstance(event, TextDelta):
                stamps.append(time.monotonic())
            a(event)

        a.record = RequestRecord(operation="chat", model=eng.info)
        a.job = eng.submit(GenerationRequest([eng.tokenize(chat(eng, "stream"))], SamplingParams(temperature=0),
                                             3000, ignore_eos=True), sink, max_queue=4)
        while len(stamps) < 5:
            time.sleep(0.001)
        long_prompt = chat(eng, "word " * 1500)
        n_long = len(eng.tokenize(long_prompt))
        t_submit = time.monotonic()
        b = submit(eng, long_prompt, max_tokens=2)
        b.wait(60)
        a.job.cancel()
        a.wait(10)
        during = [t for t in stamps if t_submit <= t <= b.first_delta_at]
        # The 1500-token prompt went in 256-token chunks, and the running stream got a
        # token after each of them instead of waiting for the whole prefill.
        assert n_long > 4 * 256
        assert len(during) >= n_long // 256 - 1
        assert b.record.prefilled_tokens == n_long - b.record.cached_tokens
    finally:
        eng.close()


def test_a_failing_sink_does_not_stop_the_worker(engine: Engine) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("Event loop is closed")  # what a dead request's loop raises

    engine.submit(GenerationRequest([engine.tokenize(chat(engine, "x"))], SamplingParams(temperature=0), 8,
                                    ignore_eos=True), broken, max_queue=4)
    after = submit(engine, chat(engine, "y"), max_tokens=8).wait(30)
    assert after.finish == "length" and after.record.output_tokens == 8


def test_token_text_is_safe_from_several_threads(engine: Engine) -> None:
    tokens = list(range(1000, 1400))
    # Reference pieces straight from llama.cpp, one thread, outside the engine's cache ...
    expected = [engine._token_piece(t, special=False) for t in tokens]
    for t in tokens:  # ... and an empty cache, so the threads race to convert and fill it
        engine._pieces.pop(t, None)
    wrong = []
    start = threading.Barrier(3)

    def hammer() -> None:
        start.wait()
        for _ in range(20):
            got = [engine.token_bytes(t) for t in tokens]
            wrong.extend(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_failed_setup_frees_the_model(default_gguf: Path) -> None:
    import psutil

    from models.engine import EngineError

    proc = psutil.Process()

    def attempt() -> None:
        with pytest.raises(EngineError) as exc:
            Engine(EngineConfig("bad", str(default_gguf), n_ctx=4096, n_parallel=1,
                                chat_template="{% for %}"))
        assert exc.value.code == "model_load_failed"

    attempt()  # first load maps files and warms allocators
    before = proc.memory_info().rss
    for _ in range(4):
        attempt()
    # Without cleanup each attempt keeps the model and a 4096-token context (~150 MiB).
    assert proc.memory_info().rss - before < 100 * 2**20


def test_the_engine_reports_its_figures_in_the_final_event_and_holds_no_record(engine: Engine) -> None:
    assert "record" not in {f.name for f in dataclasses.fields(GenerationRequest)}
    prompt = engine.tokenize(chat(engine, PROMPTS[0]))
    run = Run()
    run.job = engine.submit(GenerationRequest([prompt], SamplingParams(temperature=0), 6, ignore_eos=True),
                            run, max_queue=4)
    run.wait()
    assert isinstance(run.ended, Finished) and run.ended.reason == "length"
    figures = run.ended.figures
    assert figures.input_tokens == len(prompt) == figures.cached_tokens + figures.prefilled_tokens
    assert figures.output_tokens == 6 and figures.slot is not None and figures.batch_size_mean == 1
    assert 0 < figures.prefill_ms <= figures.ttft_ms and figures.decode_ms > 0
    assert figures is not run.job.figures  # a copy: the worker's own books stay on its side


def test_the_server_fills_the_record_from_the_final_event_on_its_event_loop(engine: Engine) -> None:
    from server.scheduler import submit as schedule

    writers: set[str] = set()

    class WatchedRecord(RequestRecord):
        def __setattr__(self, name: str, value: object) -> None:
            writers.add(threading.current_thread().name)
            super().__setattr__(name, value)

    async def answer() -> tuple[WatchedRecord, str]:
        record = WatchedRecord(operation="chat", model=engine.info)
        writers.clear()
        request = GenerationRequest([engine.tokenize(chat(engine, PROMPTS[1]))], SamplingParams(temperature=0),
                                    5, ignore_eos=True)
        gen = schedule(types.SimpleNamespace(engine=engine), request, max_queue=4, record=record)  # type: ignore[arg-type]
        text = "".join([t async for t in gen.deltas()])
        return record, text

    record, text = asyncio.run(answer())
    assert writers == {threading.current_thread().name}  # asyncio.run's loop runs on this thread
    assert text and record.finish_reason == "length" and record.output_tokens == 5
    assert record.input_tokens > 0 and record.ttft_ms > 0 and record.slot is not None
    assert record.batch_size_mean == 1


@pytest.mark.parametrize("sampling", [SamplingParams(temperature=0), SamplingParams(temperature=0, repeat_penalty=1.1),
                                      SamplingParams(temperature=0.7, seed=3)], ids=["argmax", "chain", "sampled"])
@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_ignore_eos_never_samples_an_end_of_generation_token(default_gguf: Path, sampling: SamplingParams,
                                                             speculative: str) -> None:
    """llama-server's ``ignore_eos``: the answer goes on as text, not past an end-of-turn
    token into a turn the model makes up; the answer up to where it would have ended is
    the same."""
    eng = Engine(EngineConfig("smol-eos", str(default_gguf), n_ctx=2048, n_parallel=1, speculative=speculative))
    try:
        prompt = eng.tokenize(chat(eng, "What is 2 + 2?"))  # greedy: an 11-token answer, then EOS
        runs = []
        for ignore in (False, True):
            run = Run()
            run.job = eng.submit(GenerationRequest([prompt], sampling, 48, ignore_eos=ignore), run, max_queue=4)
            runs.append(run.wait())
        natural, forced = runs
        assert forced.finish == "length" and len(forced.job.sampled) == 48
        assert not set(forced.job.sampled) & set(eng.eog_ids)
        if sampling.temperature == 0:
            assert natural.finish == "stop" and len(natural.job.sampled) < 48
            assert forced.job.sampled[:len(natural.job.sampled)] == natural.job.sampled
    finally:
        eng.close()
