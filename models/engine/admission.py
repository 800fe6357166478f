"""Admission: which waiting request starts next, in which slot, and whether it fits."""

from __future__ import annotations

import time

import llama_cpp

from models.engine.job import Job
from models.engine.prefix import PARK_MIN_PREFILL
from models.engine.slots import Slot, common_prefix, pool_cells
from models.engine.types import EngineError, ImageSegment
from models.sampling import build_sampler


class Admission:
    """Moves waiting jobs into free slots while the KV pool has room for them."""

    def _admit_locked(self, running: list[Job]) -> list[Job]:
        admitted: list[Job] = []
        needs: list[int] = []  # cells each admitted job adds to the pool
        if any(j.cancelled or j.done for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled or j.done]:
                self._waiting.remove(job)
                self._finish(job, reason="cancelled")
        while self._waiting:
            job = self._waiting[0]
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            common = {s.seq_id: common_prefix(s.history, job.items) for s in self._slots if s.history}
            slot = self._choose_slot(free, job, common)
            # Cells the running requests hold or will fill, shared cells once; then what
            # this one adds beyond a prefix already in their cells, or anywhere in the pool.
            busy = [j.slot for j in running if j.slot is not None]
            committed = (pool_cells(busy) + sum(j.n_prompt - j.cursor + j.reserve for j in running)
                         + sum(needs))
            in_busy = max((common.get(s.seq_id, 0) for s in busy if s.parked is None), default=0)
            if committed + min(job.kv_budget - in_busy, self.n_ctx) > self.n_ctx:
                break  # fits later, when a running request finishes
            in_pool = max((n for seq, n in common.items() if self._slots[seq].parked is None), default=0)
            need = min(job.kv_budget - min(in_pool, job.n_prompt - 1), self.n_ctx)
            # idle caches stay in the pool unless room runs short (a parked slot comes back)
            restored = len(slot.history) if slot.parked is not None else 0
            self._evict_idle(committed + need + pool_cells(self._slots) - pool_cells(busy)
                             + restored - self.n_ctx, keep=slot)
            needs.append(need)
            self._waiting.popleft()
            job.slot = slot
            slot.job = job
            admitted.append(job)
            self._active = len(running) + len(admitted)
        return admitted

    def _choose_slot(self, free: list[Slot], job: Job, common: dict[int, int]) -> Slot:
        """The free slot that saves the most prefill and destroys the least cache.

        A prefix cached in any other slot's pool cells can be shared into whichever slot
        the request takes (``_share_cached_prefix``), so among equal savings an empty slot,
        or the slot of the conversation this prompt continues, beats wiping an idle chat;
        then the least recently used goes.
        """
        sources = [s for s in self._slots if s.history and s.parked is None]

        def key(slot: Slot) -> tuple[int, int, float]:
            shared = max((common[o.seq_id] for o in sources if o is not slot), default=0)
            own = self._reusable(common.get(slot.seq_id, 0), job)
            continues = own > 0 and (own >= len(slot.history) or own >= slot.prompt_end)
            return max(own, shared), 2 if continues else int(not slot.history), -slot.last_used

        return max(free, key=key)

    @staticmethod
    def _reusable(n: int, job: Job) -> int:
        """Of a slot's ``n`` matching items, what it would save ``job``, if worth the cache it overwrites.

        A match of under a tenth of the prompt (a BOS, a template's first tokens) counts
        as none, so a new conversation takes the least recently used slot (an empty one
        first) instead of wiping an idle chat to save a few tokens; llama-server's
        default slot-prompt similarity is the same 0.1.
        """
        return n if n * 10 >= len(job.items) else 0

    @staticmethod
    def _worth_restoring(slot: Slot, common: int) -> bool:
        """Copying KV back costs a small fraction of prefilling it (~10 us against ~3 ms a
        token on a 2-core CPU): worth it for a match of 1% of the parked history."""
        return 100 * common >= len(slot.history)

    def _restores(self, job: Job) -> bool:
        """Whether starting ``job`` copies its slot's parked KV back into the pool."""
        slot = job.slot
        return (slot is not None and slot.parked is not None
                and self._worth_restoring(slot, common_prefix(slot.history, job.items)))

    def _start(self, job: Job) -> None:
        slot = job.slot
        assert slot is not None
        if not job.preemptions:
            job.t_admit = time.perf_counter()
        if job.cancelled:
            self._finish(job, reason="cancelled")
            return
        rec = job.req.record
        common = common_prefix(slot.history, job.items)
        if slot.parked is not None:
            if self._worth_restoring(slot, common) and self._unpark(slot):
                rec.restored_tokens = len(slot.history)
            else:
                slot.truncate(0)
                common = 0
        reuse = self._resume_point(job, common)
        if reuse < len(slot.history):
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.pos_at(reuse), -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                reuse = 0
            slot.truncate(reuse)
        own = reuse
        reuse = self._share_cached_prefix(job, reuse)
        job.cursor = reuse
        slot.prompt_end = len(job.prompt_items)
        if job.n_prompt - reuse >= PARK_MIN_PREFILL:
            self._park_idle()
        rec.slot = slot.seq_id
        if job.preemptions:
            rec.middleware["engine.preemptions"] = job.preemptions
            return  # sampler, text state and first-admission figures carry on
        rec.cached_tokens = reuse
        rec.shared_tokens = reuse - own
        rec.prefilled_tokens = job.n_prompt - reuse
        rec.input_tokens = job.n_prompt
        rec.queue_ms = (job.t_admit - job.t_submit) * 1000.0
        if job.req.sampling.plain_greedy:
            return  # _sample takes the argmax itself
        try:
            job.sampler = build_sampler(job.req.sampling, self.vocab)
        except Exception as exc:
            self._finish(job, error=EngineError(str(exc), code="invalid_sampling", status=400))

    @staticmethod
    def _resume_point(job: Job, common: int) -> int:
        """Where prefill starts given ``common`` cached items: never past the last prompt
        token (its logits are needed) nor in the middle of an image."""
        reuse = min(common, job.n_prompt - 1)
        if reuse > 0:
            start, _end, seg = job.segment_at(reuse)
            if isinstance(seg, ImageSegment) and start < reuse:
                reuse = start
        return reuse
