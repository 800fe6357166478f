"""Prefix sharing and parking: reuse KV another slot holds, move idle KV to host RAM."""

from __future__ import annotations

import ctypes
import logging

import llama_cpp
import numpy as np

from models.engine.admission import resume_point
from models.engine.job import Job
from models.engine.slots import Slot, common_prefix, idle_cells_widen, pool_cells

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


def bytes_ptr(buf: np.ndarray) -> ctypes._Pointer:
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


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
        best, source = reuse, None
        for other in self._slots:
            if other is slot or other.parked is not None or len(other.history) <= best:
                continue
            n = common_prefix(other.history, job.items)
            if n > best:
                best, source = n, other
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

    def _park_idle(self) -> None:
        """Move every idle slot's KV to host RAM; at most ``n_ctx`` tokens stay parked (LRU)."""
        for slot in self._slots:
            if slot.job is not None or not slot.spans:
                continue
            size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id)
            blob = np.empty(size, dtype=np.uint8)
            got = llama_cpp.llama_state_seq_get_data(self.ctx, bytes_ptr(blob), size, slot.seq_id)
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            if got == size:
                slot.parked = blob
            else:
                slot.truncate(0)
            self._follow_draft(slot)  # parked KV leaves the draft context: it is cheap to catch up
        parked = sorted((s for s in self._slots if s.parked is not None), key=lambda s: s.last_used)
        total = sum(len(s.history) for s in parked)
        while total > self.n_ctx:
            victim = parked.pop(0)
            total -= len(victim.history)
            victim.truncate(0)

    def _unpark(self, slot: Slot) -> bool:
        """Put a parked slot's KV back into the pool (any free cells will do)."""
        blob, slot.parked = slot.parked, None
        assert blob is not None
        if llama_cpp.llama_state_seq_set_data(self.ctx, bytes_ptr(blob), blob.nbytes, slot.seq_id) == blob.nbytes:
            slot.refill()
            return True
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        log.warning("could not restore a parked KV cache of %s; prefilling it again", self.config.model_id)
        return False
