"""Prefix sharing, parking and the prompt cache: reuse KV another slot holds, move idle KV
to host RAM, and keep a reassigned slot's KV there until its prompt comes back."""

from __future__ import annotations

import logging

import llama_cpp
import numpy as np

from models.engine.admission import resume_point
from models.engine.job import Job
from models.engine.prompt_cache import PromptCache, SavedPrompt
from models.engine.slots import Slot, common_prefix, evict_idle, idle_cells_widen, pool_cells
from models.llama_lib import copy_seq_state, load_seq_state

log = logging.getLogger("edgevlm.engine")

# A prompt at least this long first moves idle slots' KV to host RAM. In the shared pool
# their cells sit among the new prompt's, so flash attention cannot skip them as masked
# tiles: a 600-token prefill beside three idle chats ran ~12% slower. Parked KV costs a
# copy out and, on its next prefix hit, a copy back.
PARK_MIN_PREFILL = 256

# Per slot, sharing a prefix copies the source's whole stream (n_ctx / n_parallel cells:
# ~10 ms for 2048 cells of SmolLM2-135M), worth it only for a prefix longer than what
# prefilling this many tokens costs (~4 ms each on 2 cores).
MIN_STREAM_COPY = 32

# The prompt cache copies a slot's KV out when a request cuts this many of the previous
# prompt's items (a new conversation taking the slot), not when a chat's next turn only
# replaces the end of its last reply; and copies one back for a match this much longer
# than what the pool already holds. Either copy is ~1 ms per 100 tokens of SmolLM2-135M's
# KV on 2 cores, against ~4 ms per token prefilled.
MIN_SAVE = 32


class PrefixSharing:
    """Shares cached prefixes between slots and parks idle slots' KV."""

    def _share_cached_prefix(self, job: Job, reuse: int) -> int:
        """Extend the job's ``reuse`` cached items with a longer prefix another slot holds.

        In the unified pool ``llama_memory_seq_cp`` only tags the source's cells with this
        sequence too: no copy, no compute; per slot it copies the source's stream. The
        shared system prompt of several operators, or a second question about a photo
        someone else asked about, is prefilled once.
        """
        slot = job.slot
        assert slot is not None
        best, source = self._pool_prefix(job, reuse)
        if source is None:
            return reuse
        n = resume_point(job, best)
        if n <= reuse or (self.per_slot and n - reuse < MIN_STREAM_COPY):
            return reuse
        if self.per_slot:
            # Another stream's cells: llama.cpp copies the whole stream (at the next
            # decode), then this slot drops what follows the shared prefix.
            llama_cpp.llama_memory_seq_cp(self.mem, source.seq_id, slot.seq_id, -1, -1)
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, source.pos_at(n), -1)
        else:
            llama_cpp.llama_memory_seq_cp(self.mem, source.seq_id, slot.seq_id,
                                          source.pos_at(reuse), source.pos_at(n))
        slot.borrow(source, reuse, n)
        return n

    def _pool_prefix(self, job: Job, at_least: int = 0) -> tuple[int, Slot | None]:
        """The longest prefix of ``job``'s items, over ``at_least``, that another slot's pool cells hold."""
        best, source = at_least, None
        for other in self._slots:
            if other is job.slot or other.parked is not None or len(other.history) <= best:
                continue
            n = common_prefix(other.history, job.items)
            if n > best:
                best, source = n, other
        return best, source

    def _join_prefills(self, started: list[Job], running: list[Job]) -> None:
        """Let requests that start together prefill their common next tokens once.

        A follower's rows ride on a leader's batch rows (one row, both sequence ids) from
        the point where both caches end, which llama.cpp requires to be the same, up to
        the last token they share; neither's final prompt token is shared, so each gets
        its own logits. Text only: image rows and shifted M-RoPE positions stay apart.
        """
        for job in started:
            if job.done or job.preemptions or job.followers or job.lead is not None:
                continue
            best, lead = job.cursor, None
            for other in running:
                if (other is job or other.done or other.slot is None or other.lead is not None
                        or other.preemptions or other.cursor != job.cursor
                        or other.slot.marks != job.slot.marks):
                    continue
                end = min(common_prefix(other.items, job.items), job.n_prompt - 1, other.n_prompt - 1)
                if end > best:
                    best, lead = end, other
            if lead is None:
                continue
            end = job.cursor
            while end < best and isinstance(job.items[end], int):
                end += 1
            if end > job.cursor:
                job.lead, job.lead_end = lead, end
                lead.followers.append(job)
                job.slot.seal(lead.slot.tail)  # the rows it gets lie in the leader's cells

    @staticmethod
    def _detach(job: Job) -> None:
        """End joint prefill for ``job`` as leader or follower; followers go on alone."""
        if job.lead is not None:
            job.lead.followers.remove(job)
            job.lead = None
            if job.slot is not None:
                job.slot.seal()  # its own rows from here on
        for follower in job.followers:
            follower.lead = None
            if follower.slot is not None:
                follower.slot.seal()
        job.followers = []

    def _idle_cells_widen(self, grow: int) -> bool:
        """Whether idle slots' cells would widen the attention window of the requests running
        once they add ``grow`` more cells (what parking them would narrow)."""
        in_pool = [s for s in self._slots if s.parked is None]
        return idle_cells_widen(pool_cells(s for s in in_pool if s.job is not None), pool_cells(in_pool), grow)

    def _park_idle(self, keep: Slot | None = None) -> None:
        """Move every idle slot's KV (but ``keep``'s) to host RAM; at most ``n_ctx`` tokens
        stay parked (LRU)."""
        for slot in self._slots:
            if slot.job is not None or not slot.spans or slot is keep:
                continue
            blob = self._copy_out(slot)
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            if blob is not None:
                slot.parked = blob
            else:
                slot.truncate(0)
            self._follow_draft(slot)  # parked KV leaves the draft context: it is cheap to catch up
        parked = sorted((s for s in self._slots if s.parked is not None), key=lambda s: s.last_used)
        total = sum(len(s.history) for s in parked)
        while total > self.n_ctx:
            victim = parked.pop(0)
            total -= len(victim.history)
            self._save(victim)
            victim.truncate(0)

    def _unpark(self, slot: Slot) -> bool:
        """Put a parked slot's KV back into the pool (any free cells will do)."""
        blob, slot.parked = slot.parked, None
        assert blob is not None
        if self._copy_in(slot, blob, "a parked KV cache"):
            slot.refill()
            return True
        return False

    def _copy_out(self, slot: Slot) -> np.ndarray | None:
        """``slot``'s sequence state (its KV) copied to host RAM, or None if llama.cpp fails."""
        return copy_seq_state(self.ctx, slot.seq_id)

    def _copy_in(self, slot: Slot, blob: np.ndarray, what: str) -> bool:
        """Copy a sequence state back into ``slot``'s sequence; on failure (no room) its
        cells are left empty and the request prefills instead."""
        if load_seq_state(self.ctx, blob, slot.seq_id):
            return True
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        log.warning("could not restore %s of %s; prefilling it again", what, self.config.model_id)
        return False

    # ----------------------------------------------------------- prompt cache
    def _save(self, slot: Slot, keep: int = 0) -> None:
        """Keep ``slot``'s KV in the prompt cache before it is cut back to ``keep`` items,
        if that cut loses a prompt worth keeping (see ``MIN_SAVE``)."""
        cache: PromptCache | None = self._prompt_cache
        if cache is None or min(slot.prompt_end, len(slot.history)) - keep < MIN_SAVE:
            return
        blob = slot.parked if slot.parked is not None else self._copy_out(slot)
        if blob is not None:
            cache.add(SavedPrompt(list(slot.history), list(slot.marks), slot.prompt_end, blob, slot.last_used))

    def _evict(self, slot: Slot) -> None:
        """An idle slot gives its cells back to make room; its prompt waits in the cache."""
        self._save(slot)
        self._clear(slot)

    def _cache_gain(self, job: Job, common: int) -> tuple[SavedPrompt | None, int]:
        """The cached prompt that would save ``job`` the most prefill beyond its slot's own
        ``common`` items and what any other slot could share, and how many items more."""
        cache: PromptCache | None = self._prompt_cache
        if cache is None or not len(cache):
            return None, 0
        entry, n = cache.best(job.items)
        if entry is None:
            return None, 0
        pool, _ = self._pool_prefix(job, common)
        return entry, resume_point(job, n) - resume_point(job, pool)

    def _restore_saved(self, job: Job, common: int) -> bool:
        """Put the cached prompt ``job`` starts with into its slot, if one saves enough prefill.

        The slot's own KV goes to the cache first (when worth keeping): it is some other
        conversation's. False leaves the slot as it was, or empty when there was no room.
        """
        entry, gain = self._cache_gain(job, common)
        if entry is None or gain < MIN_SAVE:
            return False
        slot = job.slot
        assert slot is not None and slot.parked is None
        self._save(slot)
        self._clear(slot)
        if not self.per_slot:
            short = len(entry.history) - (self.n_ctx - pool_cells(self._slots))
            if short > 0:
                evict_idle(self._slots, short, self._evict, keep=slot)
            if len(entry.history) > self.n_ctx - pool_cells(self._slots):
                return False  # running requests hold the room; prefill it instead
        elif len(entry.history) > self.n_ctx:
            return False
        self._prompt_cache.take(entry)
        if not self._copy_in(slot, entry.blob, "a cached prompt"):
            return False
        slot.adopt(entry.history, entry.marks, entry.prompt_end)
        return True
