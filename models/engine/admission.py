"""Admission: which waiting request starts next, in which slot, and whether it fits.

Pure Python over the slots' books (``models.engine.slots``) and the jobs' cursors, so
every decision here can be checked without llama.cpp; the worker carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from models.engine.job import Job
from models.engine.slots import Slot, common_prefix, pool_cells
from models.engine.types import ImageSegment


@dataclass(frozen=True)
class Placement:
    """Where a waiting job starts and what starting it costs the KV pool."""

    slot: Slot
    need: int  # cells the job adds to the pool
    evict: int  # idle cells to free first; nothing to free when <= 0


def place(job: Job, slots: list[Slot], running: list[Job], needs: list[int], n_ctx: int, *,
          per_slot: bool = False) -> Placement | None:
    """Place ``job`` beside ``running`` and the jobs admitted this round (``needs``), or None.

    Cells the running requests hold or will fill count shared cells once; then what
    this one adds beyond a prefix already in their cells, or anywhere in the pool.
    None means no free slot, or no room until a running request finishes. ``per_slot``
    (each slot its own KV stream): any free slot will do, with no pool to share and no
    idle cache to evict (the chosen slot's own is cut back when the job starts).
    """
    free = [s for s in slots if s.job is None]
    if not free:
        return None
    common = {s.seq_id: common_prefix(s.history, job.items) for s in slots if s.history}
    slot = choose_slot(slots, free, job, common)
    if per_slot:
        return Placement(slot, 0, 0)
    by_seq = {s.seq_id: s for s in slots}
    busy = [j.slot for j in running if j.slot is not None]
    committed = (pool_cells(busy) + sum(j.n_prompt - j.cursor + j.reserve for j in running)
                 + sum(needs))
    in_busy = max((common.get(s.seq_id, 0) for s in busy if s.parked is None), default=0)
    if committed + min(job.kv_budget - in_busy, n_ctx) > n_ctx:
        return None  # fits later, when a running request finishes
    in_pool = max((n for seq, n in common.items() if by_seq[seq].parked is None), default=0)
    need = min(job.kv_budget - min(in_pool, job.n_prompt - 1), n_ctx)
    # idle caches stay in the pool unless room runs short (a parked slot comes back)
    restored = len(slot.history) if slot.parked is not None else 0
    evict = committed + need + pool_cells(slots) - pool_cells(busy) + restored - n_ctx
    return Placement(slot, need, evict)


def choose_slot(slots: list[Slot], free: list[Slot], job: Job, common: dict[int, int]) -> Slot:
    """The free slot that saves the most prefill and destroys the least cache.

    ``common`` maps a slot's seq id to the items its history shares with the job's.
    A prefix cached in any other slot's pool cells can be shared into whichever slot
    the request takes (``PrefixSharing._share_cached_prefix``), so among equal savings
    an empty slot, or the slot of the conversation this prompt continues, beats wiping
    an idle chat; then the least recently used goes.
    """
    sources = [s for s in slots if s.history and s.parked is None]

    def key(slot: Slot) -> tuple[int, int, float]:
        shared = max((common[o.seq_id] for o in sources if o is not slot), default=0)
        own = reusable(common.get(slot.seq_id, 0), job)
        continues = own > 0 and (own >= len(slot.history) or own >= slot.prompt_end)
        return max(own, shared), 2 if continues else int(not slot.history), -slot.last_used

    return max(free, key=key)


def reusable(n: int, job: Job) -> int:
    """Of a slot's ``n`` matching items, what it would save ``job``, if worth the cache it overwrites.

    A match of under a tenth of the prompt (a BOS, a template's first tokens) counts
    as none, so a new conversation takes the least recently used slot (an empty one
    first) instead of wiping an idle chat to save a few tokens; llama-server's
    default slot-prompt similarity is the same 0.1.
    """
    return n if n * 10 >= len(job.items) else 0


def worth_restoring(slot: Slot, common: int) -> bool:
    """Copying KV back costs a small fraction of prefilling it (~10 us against ~3 ms a
    token on a 2-core CPU): worth it for a match of 1% of the parked history."""
    return 100 * common >= len(slot.history)


def resume_point(job: Job, common: int) -> int:
    """Where prefill starts given ``common`` cached items: never past the last prompt
    token (its logits are needed) nor in the middle of an image."""
    reuse = min(common, job.n_prompt - 1)
    if reuse > 0:
        start, _end, seg = job.segment_at(reuse)
        if isinstance(seg, ImageSegment) and start < reuse:
            reuse = start
    return reuse


def preemption_victim(holders: Iterable[Job]) -> Job:
    """The job that gives its cells back when the pool runs short: the most recently
    admitted, so a running stream is never cut short for a newcomer."""
    return max(holders, key=lambda j: (j.t_admit, j.t_submit))
