"""The engine's KV books and admission decisions, checked without loading a model.

Slots, cell counting, placement, eviction and preemption choice are pure Python
(``models.engine.slots`` and ``models.engine.admission``); the worker only carries
out what they decide, so each decision is tested here on hand-built slots and jobs.
"""

from __future__ import annotations

import itertools

import numpy as np

from models.engine.admission import choose_slot, place, preemption_victim, resume_point
from models.engine.job import Job
from models.engine.prompt_cache import PromptCache, SavedPrompt
from models.engine.slots import KV_WINDOW_PAD, Slot, common_prefix, evict_idle, idle_cells_widen, pool_cells
from models.engine.types import GenerationRequest, ImageSegment, Segment
from models.sampling import SamplingParams


def make_job(*segments: Segment, max_tokens: int = 16) -> Job:
    req = GenerationRequest(list(segments), SamplingParams(temperature=0), max_tokens)
    return Job(req, lambda event: None)


def make_slots(n: int) -> list[Slot]:
    run_ids = itertools.count()
    return [Slot(seq_id=i, run_ids=run_ids) for i in range(n)]


def prefilled(job: Job, slot: Slot) -> Job:
    """``job`` running in ``slot`` with its whole prompt in the KV."""
    job.slot, slot.job = slot, job
    slot.history.extend(job.items)
    job.cursor = job.n_prompt
    return job


def clear(slot: Slot) -> None:
    slot.truncate(0)  # the books' half of the worker's _clear


def test_a_borrowed_prefix_counts_once_and_outlives_its_source() -> None:
    a, b = make_slots(2)
    a.history.extend(range(100))
    b.borrow(a, 0, 60)  # llama_memory_seq_cp tags a's cells with b's sequence too
    b.history.extend(range(1000, 1020))  # b's own tokens go into new cells
    assert pool_cells([a, b]) == 100 + 20
    assert pool_cells([b]) == 60 + 20
    a.truncate(0)  # the shared cells stay while b holds them
    assert pool_cells([a, b]) == 60 + 20


def test_a_parked_slot_holds_no_pool_cells() -> None:
    (slot,) = make_slots(1)
    slot.history.extend(range(50))
    slot.parked = np.zeros(8, dtype=np.uint8)
    assert pool_cells([slot]) == 0 and len(slot.history) == 50


def test_a_request_waits_when_it_does_not_fit_beside_running_ones() -> None:
    slots = make_slots(3)
    running = [prefilled(make_job(list(range(400)), max_tokens=100), slots[0])]  # holds 400 + 100
    too_big = make_job(list(range(1000, 1300)), max_tokens=300)  # 300 + 256 reserved
    assert place(too_big, slots, running, [], n_ctx=1000) is None
    fits = make_job(list(range(1000, 1300)), max_tokens=100)  # 300 + 100
    plan = place(fits, slots, running, [], n_ctx=1000)
    assert plan is not None and plan.need == 400 and plan.evict <= 0
    # what this round already admitted counts too
    assert place(fits, slots, running, [200], n_ctx=1000) is None


def test_a_prefix_a_running_request_holds_is_not_counted_twice() -> None:
    slots = make_slots(2)
    prompt = list(range(400))
    running = [prefilled(make_job(prompt, max_tokens=100), slots[0])]
    follower = make_job(prompt[:200] + list(range(1000, 1100)), max_tokens=256)  # budget 300 + 256
    plan = place(follower, slots, running, [], n_ctx=1000)
    assert plan is not None and plan.need == 556 - 200


def test_idle_caches_are_evicted_least_recently_used_first_and_only_as_needed() -> None:
    slots = make_slots(4)
    running = [prefilled(make_job(list(range(400)), max_tokens=100), slots[0])]
    for slot, start, used in ((slots[1], 2000, 2.0), (slots[2], 3000, 1.0)):
        slot.history.extend(range(start, start + 200))
        slot.last_used = used
    newcomer = make_job(list(range(1000, 1300)), max_tokens=100)
    plan = place(newcomer, slots, running, [], n_ctx=1000)
    assert plan is not None and plan.slot is slots[3]  # the empty slot, not an idle chat
    assert plan.evict == 500 + 400 + 400 - 1000  # two idle chats of 200 leave 300 cells short
    freed = evict_idle(slots, plan.evict, clear, keep=plan.slot)
    assert freed == 400 and not slots[1].history and not slots[2].history
    slots[1].history.extend(range(2000, 2200))
    slots[1].last_used = 5.0
    slots[2].history.extend(range(3000, 3200))
    assert evict_idle(slots, 150, clear) == 200  # one is enough: the older one goes
    assert not slots[2].history and len(slots[1].history) == 200
    assert evict_idle(slots, 0, clear) == 0


def test_evicting_a_cache_another_slot_shares_frees_only_its_own_cells() -> None:
    a, b = make_slots(2)
    a.history.extend(range(100))
    b.borrow(a, 0, 80)
    b.job = make_job([1])  # b is running: never evicted
    assert evict_idle([a, b], 100, clear) == 20


def test_idle_cells_are_parked_only_when_they_widen_the_attention_window() -> None:
    pad = KV_WINDOW_PAD
    assert not idle_cells_widen(live=0, total=0, grow=40)  # nothing idle
    assert not idle_cells_widen(live=0, total=16, grow=14)  # 30 cells: one step either way
    assert idle_cells_widen(live=0, total=pad + 40, grow=4)  # idle cells alone fill a step
    assert idle_cells_widen(live=0, total=pad // 2, grow=pad // 2 + 10)  # the answer crosses a step beside them
    assert not idle_cells_widen(live=300, total=320, grow=100)  # 400 and 420 cells: the same two steps
    assert idle_cells_widen(live=300, total=320, grow=200)  # 500 against 520: a third step


def test_the_next_turn_goes_to_its_conversations_slot_and_a_new_one_to_an_empty_slot() -> None:
    chat, _other, empty = slots = make_slots(3)
    turn1 = list(range(100)) + list(range(500, 520))  # prompt and reply
    chat.history.extend(turn1)
    chat.prompt_end = 100
    _other.history.extend(range(5000, 5100))
    _other.job = make_job([1])
    nxt = make_job(turn1 + list(range(700, 730)))
    common = {s.seq_id: common_prefix(s.history, nxt.items) for s in slots if s.history}
    assert choose_slot(slots, [chat, empty], nxt, common) is chat
    stranger = make_job([0] + list(range(9000, 9049)))  # only the first token in common
    common = {s.seq_id: common_prefix(s.history, stranger.items) for s in slots if s.history}
    assert choose_slot(slots, [chat, empty], stranger, common) is empty


def test_prefill_resumes_before_the_last_prompt_token_and_never_inside_an_image() -> None:
    image = ImageSegment(np.zeros((4, 8), dtype=np.float32), key="img")
    job = make_job([1, 2, 3, 4, 5], image, [6, 7, 8])  # items 0-4 text, 5-8 image, 9-11 text
    assert resume_point(job, 7) == 5
    assert resume_point(job, 9) == 9
    assert resume_point(job, 12) == 11
    assert resume_point(job, 0) == 0


def test_the_most_recently_admitted_request_is_preempted() -> None:
    old, young, newer_submit = make_job([1]), make_job([2]), make_job([3])
    old.t_admit, young.t_admit, newer_submit.t_admit = 1.0, 3.0, 3.0
    young.t_submit, newer_submit.t_submit = 0.5, 0.7
    assert preemption_victim([old, young, newer_submit]) is newer_submit
    assert preemption_victim([old, young]) is young


def saved(history: list[int], nbytes: int, last_used: float) -> SavedPrompt:
    return SavedPrompt(list(history), [], len(history), np.zeros(nbytes, dtype=np.uint8), last_used)


def test_the_prompt_cache_drops_least_recently_used_prompts_to_stay_under_its_cap() -> None:
    cache = PromptCache(max_bytes=1000)
    a, b, c = saved([1, 2, 3], 400, 1.0), saved([4, 5, 6], 400, 3.0), saved([7, 8, 9], 400, 2.0)
    assert cache.add(a) and cache.add(b)
    assert cache.nbytes == 800
    assert cache.add(c)  # 1200 > 1000: the least recently used (a) goes
    assert cache.entries == [b, c] and cache.nbytes == 800
    assert not cache.add(saved([10, 11], 1001, 4.0))  # larger than the whole cap: never kept
    assert cache.entries == [b, c] and cache.nbytes == 800
    assert cache.take(b) is b and cache.entries == [c] and cache.nbytes == 400


def test_the_prompt_cache_keeps_one_copy_of_a_conversation_the_longest() -> None:
    cache = PromptCache(max_bytes=10_000)
    turn1 = saved([1, 2, 3], 300, 1.0)
    turn2 = saved([1, 2, 3, 4, 5], 500, 2.0)  # the same chat, one turn on
    assert cache.add(turn1) and cache.add(turn2)
    assert cache.entries == [turn2] and cache.nbytes == 500  # turn 1 gives back nothing turn 2 cannot
    assert not cache.add(saved([1, 2, 3], 300, 5.0))  # covered by turn 2, which is touched instead
    assert turn2.last_used == 5.0 and cache.nbytes == 500


def test_the_prompt_cache_finds_the_longest_shared_prefix() -> None:
    cache = PromptCache(max_bytes=10_000)
    short, long = saved([1, 2, 9], 10, 1.0), saved([1, 2, 3, 4, 8], 10, 2.0)
    cache.add(short)
    cache.add(long)
    assert cache.best([1, 2, 3, 4, 5, 6]) == (long, 4)
    assert cache.best([1, 2, 9, 9]) == (short, 3)
    assert cache.best([7, 7]) == (None, 0)


def test_a_slot_adopts_a_saved_prompt_with_its_positions() -> None:
    slot, other = make_slots(2)
    other.history.extend([1, 2, ("img", 0), ("img", 1), 3])
    other.marks.append((4, 7))  # from item 4 on, positions run 7 ahead (an M-RoPE image)
    slot.adopt(other.history, other.marks, prompt_end=4)
    assert slot.history == other.history and slot.history is not other.history
    assert slot.shift == 7 and slot.pos_at(4) == 11 and slot.prompt_end == 4
    assert pool_cells([slot]) == 5  # its cells are new ones, in the pool
