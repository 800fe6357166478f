"""Batch building: one ``llama_decode`` over every sequence's next rows, M-RoPE included."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence

import llama_cpp
import numpy as np

from models.engine.job import Job
from models.engine.draft import MAX_MODEL_DRAFT
from models.engine.slots import Slot, pool_cells
from models.engine.speculative import MAX_DRAFT, NgramIndex, SpecState, plan_drafts
from models.engine.types import EngineError, ImageSegment

# Prompt tokens prefilled per step while other sequences are decoding: bounds how long
# a new long prompt can delay the next token of running streams.
PREFILL_CHUNK_WHILE_DECODING = 256


class BatchBuilder:
    """Builds and decodes each step's batch: decode tokens, prompt chunks, image rows."""

    def _step(self, running: list[Job]) -> None:
        for job in running:
            if job.cancelled and not job.done:
                self._finish(job, reason="cancelled")
        live = [j for j in running if not j.done]
        if not live:
            return
        self._ensure_room(live, sum(1 for j in live if j.next_token is not None and j.cursor >= j.n_prompt))
        live = [j for j in live if not j.done and j.slot is not None]
        decoding = [j for j in live if j.next_token is not None and j.cursor >= j.n_prompt]
        prefilling = [j for j in live if j.cursor < j.n_prompt]
        speculating = self.config.speculative != "off"
        drafts = self._plan_drafts(decoding, prefilling) if speculating else {}

        batch = self._batch
        n = 0
        outputs: list[tuple[int, Job]] = []
        # (job, history length, cursor, generated length) before this step, to undo a failed decode
        undo: list[tuple[Job, int, int, int]] = []
        # Per slot, llama.cpp splits a batch into ubatches of sequences whose ids rise by one
        # in batch order, and each ubatch reads all the weights again: rows in admission
        # order (say seqs 3, 0, 1, 2) cost two passes a step or more. So there the rows are
        # laid out by sequence id once the chunks are chosen (no joint prefill per slot).
        per_slot = self.per_slot
        later: list[tuple[Job, int | None]] = []  # (job, prompt rows, None to decode)
        for job in decoding:
            if per_slot:
                later.append((job, None))
            else:
                n = self._put_decode(job, drafts.get(job, ()), n, outputs, undo)
        budget = self.n_batch - sum(1 + len(drafts.get(j, ())) for j in decoding)
        if decoding:
            budget = min(budget, PREFILL_CHUNK_WHILE_DECODING)
        image_job: Job | None = None
        followers = [j for j in prefilling if j.lead is not None]
        # Leaders first: a follower whose shared part ends in this step goes on alone after them.
        for job in [j for j in prefilling if j.lead is None] + followers:
            if budget <= 0:
                break
            if job.lead is not None:
                if job.cursor < job.lead_end:
                    continue  # its leader carries its rows
                self._detach(job)
            start, end, seg = job.segment_at(job.cursor)
            if isinstance(seg, ImageSegment):
                if image_job is None:
                    image_job = job
                continue
            take = min(end - job.cursor, budget)
            budget -= take
            if per_slot:
                later.append((job, take))
            else:
                n = self._put_prompt(job, take, n, outputs, undo)
        for job, take in sorted(later, key=lambda jt: jt[0].slot.seq_id):
            if take is None:
                n = self._put_decode(job, drafts.get(job, ()), n, outputs, undo)
            else:
                n = self._put_prompt(job, take, n, outputs, undo)
        if n:
            batch.n_tokens = n
            self._flush(step=True)
            t0 = time.perf_counter()
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                self._decode_failed(rc, undo, live)
                return
            # a decoding step without a prompt chunk: what the draft planner learns from
            if speculating and decoding and n == len(outputs):
                self._step_costs.record(len(decoding), n, (time.perf_counter() - t0) * 1000.0)
            n_seqs = len(decoding) + sum(1 for j in prefilling if j.cursor > 0)
            greedy = self._greedy_tokens(outputs)
            row = 0
            while row < len(outputs):
                idx, job = outputs[row]
                job.batch_sum += n_seqs
                job.batch_steps += 1
                draft = drafts.get(job)
                if draft:
                    self._verify(job, outputs, row, draft, greedy)
                    row += 1 + len(draft)
                else:
                    self._sample(job, idx, None if greedy is None else int(greedy[row]))
                    row += 1
        if image_job is not None and not image_job.done:
            self._prefill_image(image_job)

    def _plan_drafts(self, decoding: list[Job], prefilling: list[Job]) -> dict[Job, list[int]]:
        """Each decoding sequence's drafted tokens for this step, sized by its acceptance so
        far, the step's measured cost and the free KV cells.

        Prompt lookup drafts first and plans how much of each draft to verify; a draft
        model plans first (its tokens cost a decode each, counted at their measured cost)
        and then drafts just that many. With a draft model, sequences with images in their
        prompt do not draft at all: the draft model reads tokens, not image rows.
        """
        drafter = self._drafter
        jobs: list[tuple[Job, list[int]]] = []
        candidates: list[tuple[float, int]] = []
        for job in decoding:
            if not job.req.speculative or (drafter is not None and not job.text_only):
                continue
            spec = job.spec
            if spec is None:
                spec = job.spec = SpecState(None if drafter is not None else NgramIndex(job.prompt_items))
            spec.catch_up(job.sampled)
            if job.n_generated < spec.paused_until:
                continue
            # every accepted token is emitted: stay within max_tokens and the context
            room = min(MAX_DRAFT if drafter is None else MAX_MODEL_DRAFT,
                       job.req.max_tokens - job.n_generated - 1, self.n_ctx - len(job.slot.history) - 2)
            draft = spec.index.draft(room) if spec.index is not None else []
            if draft or (drafter is not None and room > 0):
                jobs.append((job, draft))
                candidates.append((spec.acceptance, len(draft) if drafter is None else room))
        if not jobs:
            return {}
        remaining = sum(j.n_prompt - j.cursor for j in prefilling)
        prefill = min(remaining, PREFILL_CHUNK_WHILE_DECODING, self.n_batch - len(decoding))
        base_rows = len(decoding) + prefill
        # each draft stays within its own context (room above); in the pool, all share it
        free = self.n_batch if self.per_slot else self.n_ctx - pool_cells(self._slots) - base_rows
        ks = plan_drafts(candidates, len(decoding), base_rows, self._step_costs,
                         min(self.n_batch, base_rows + max(0, free)), explore=self._step_costs.explore(),
                         draft_ms=0.0 if drafter is None else drafter.token_ms(len(jobs)))
        if drafter is None:
            return {job: draft[:k] for (job, draft), k in zip(jobs, ks) if k}
        chosen = [(job, k) for (job, _), k in zip(jobs, ks) if k]
        if not chosen:
            return {}
        wants = [(job.slot.seq_id, [*job.slot.history, job.next_token], k) for job, k in chosen]
        spare = [s.seq_id for s in self._slots if s.job is None]
        return {job: draft for (job, _), draft in zip(chosen, drafter.propose(wants, spare)) if draft}

    def _follow_draft(self, slot: Slot) -> None:
        """Cut the draft model's copy of ``slot`` back to what the slot's KV still holds."""
        if self._drafter is not None:
            self._drafter.follow(slot.seq_id, () if slot.parked is not None else slot.history)

    def _verify(self, job: Job, outputs: list[tuple[int, Job]], row: int, draft: list[int],
                greedy: np.ndarray | None) -> None:
        """Sample the job's token row and its drafted rows in order while they agree.

        Row i's logits follow the token and the first i drafted tokens; as long as the
        sampled token equals drafted token i, row i + 1 is a valid next step. The first
        disagreement is itself the next token (sampled from the right context), so a
        verification step emits between 1 and len(draft) + 1 tokens. Cells of rejected
        drafted tokens leave the KV cache.
        """
        slot = job.slot
        keep = len(slot.history) - len(draft)  # history up to and including the decoded token
        fig = job.figures  # counted before sampling: the last sample may finish the job
        fig.drafted_tokens += len(draft)
        accepted = 0
        for i in range(len(draft) + 1):
            self._sample(job, outputs[row + i][0], None if greedy is None else int(greedy[row + i]))
            if job.done or i == len(draft) or job.next_token != draft[i]:
                break
            accepted += 1
            fig.accepted_tokens += 1
            job.generated.append(draft[i])
        keep += accepted
        if keep < len(slot.history):
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.pos_at(keep), -1)
            slot.truncate(keep)
        if self._drafter is not None:  # it decoded its own proposal: keep what was accepted
            self._drafter.keep(slot.seq_id, keep)
        job.spec.record(len(draft), accepted, job.n_generated)

    def _put_decode(self, job: Job, draft: Sequence[int], n: int, outputs: list[tuple[int, Job]],
                    undo: list[tuple[Job, int, int, int]]) -> int:
        """Add ``job``'s next token at batch row ``n``, its drafted tokens after it; returns the next row."""
        batch = self._batch
        slot = job.slot
        undo.append((job, len(slot.history), job.cursor, len(job.generated)))
        self._put(batch, n, job.next_token, len(slot.history) + slot.shift, slot.seq_id, True)
        slot.history.append(job.next_token)
        job.generated.append(job.next_token)
        outputs.append((n, job))
        n += 1
        for tok in draft:  # verified in the same decode, after the token
            self._put(batch, n, tok, len(slot.history) + slot.shift, slot.seq_id, True)
            slot.history.append(tok)
            outputs.append((n, job))
            n += 1
        return n

    def _put_prompt(self, job: Job, take: int, n: int, outputs: list[tuple[int, Job]],
                    undo: list[tuple[Job, int, int, int]]) -> int:
        """Add ``take`` prompt tokens of ``job`` at batch row ``n``; returns the next row.

        Rows its followers share carry their sequence ids too, and advance them.
        """
        batch = self._batch
        slot = job.slot
        start = job.cursor
        # each follower rides on the first ``k`` rows, the longest riders first
        riders = sorted(((f, min(take, f.lead_end - start)) for f in job.followers
                         if f.cursor == start and f.cursor < f.lead_end), key=lambda fk: -fk[1])
        for f in [job] + [f for f, _ in riders]:
            undo.append((f, len(f.slot.history), f.cursor, len(f.generated)))
        last_prompt = start + take == job.n_prompt and not job.resuming
        base = len(slot.history) + slot.shift
        width = len(riders)
        for k in range(take):
            tok = job.items[start + k]
            want = last_prompt and k == take - 1
            self._put(batch, n, tok, base + k, slot.seq_id, want)
            if riders:
                while width and riders[width - 1][1] <= k:
                    width -= 1
                for i in range(width):
                    batch.seq_id[n][i + 1] = riders[i][0].slot.seq_id
                batch.n_seq_id[n] = 1 + width
            if want:
                outputs.append((n, job))
            n += 1
        slot.history.extend(job.items[start:start + take])
        job.cursor += take
        for f, k in riders:
            f.slot.history.extend(job.items[start:start + k])
            f.cursor += k
            f.figures.shared_tokens += k
            f.figures.prefilled_tokens -= k
        return n

    def _put(self, batch: llama_cpp.llama_batch, i: int, token: int, pos: int, seq: int,
             logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _prefill_image(self, job: Job) -> None:
        start, end, seg = job.segment_at(job.cursor)
        assert isinstance(seg, ImageSegment)
        slot = job.slot
        take = min(end - job.cursor, self.n_batch)
        rows = seg.embeddings[job.cursor - start: job.cursor - start + take]
        batch = self._embd_batch
        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        last_prompt = job.cursor + take == job.n_prompt and not job.resuming
        if self.mrope:
            # Follow mtmd-helper: rows at (n_past + t, n_past + y, n_past + x, z) with
            # n_past the image's first position (set_position_mrope_2d), section-major.
            img_base = start + slot.shift
            off = job.cursor - start
            if seg.positions is not None:
                pos4 = np.array(seg.positions[:, off: off + take], dtype=np.int32)
                pos4[:3] += img_base
            else:  # set_position_mrope_1d
                pos4 = np.broadcast_to(np.arange(img_base + off, img_base + off + take, dtype=np.int32),
                                       (4, take)).copy()
            ctypes.memmove(self._mrope_pos, pos4.ctypes.data, pos4.nbytes)
            for k in range(take):
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = slot.seq_id
                batch.logits[k] = last_prompt and k == take - 1
        else:
            base = len(slot.history)
            for k in range(take):
                batch.pos[k] = base + k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = slot.seq_id
                batch.logits[k] = last_prompt and k == take - 1
        batch.n_tokens = take
        if seg.non_causal:
            llama_cpp.llama_set_causal_attn(self.ctx, False)
        try:
            self._flush(step=True)
            rc = llama_cpp.llama_decode(self.ctx, batch)
        finally:
            if seg.non_causal:
                llama_cpp.llama_set_causal_attn(self.ctx, True)
        if rc != 0:
            self._finish(job, error=EngineError(f"image prefill failed (llama_decode={rc})"))
            return
        slot.history.extend(job.items[job.cursor: job.cursor + take])
        job.cursor += take
        if self.mrope and job.cursor == end:
            # After an image n_past advances by n_pos (max(nx, ny)), not by its rows.
            slot.shift = start + slot.shift + seg.mrope_advance - end
            slot.marks.append((end, slot.shift))
        if last_prompt:
            self._sample(job, take - 1)

    def _greedy_tokens(self, outputs: list[tuple[int, Job]]) -> np.ndarray | None:
        """Argmax of every output row in one call, when any plain-greedy job wants one.

        Rows of ``llama_get_logits`` follow the batch order of the rows that asked for
        logits, which is the order of ``outputs``. One vectorised argmax replaces a
        ctypes lookup, an array view and an argmax per sequence each step.
        """
        if not any(job.sampler is None for _, job in outputs):
            return None
        logits = llama_cpp.llama_get_logits(self.ctx)
        if not logits:
            return None
        # A view is costlier to make than the argmax; the buffer moves only when
        # llama.cpp grows it, so views are kept per (address, rows).
        key = (ctypes.cast(logits, ctypes.c_void_p).value, len(outputs))
        view = self._logit_views.get(key)
        if view is None:
            if len(self._logit_views) >= 16:
                self._logit_views.clear()
            view = self._logit_views[key] = np.ctypeslib.as_array(logits, shape=(len(outputs), self.n_vocab))
        for row, (_, job) in enumerate(outputs):
            if job.req.ignore_eos and job.sampler is None:  # the sampler chain bans them itself
                self._ban_eog(view[row])
        return view.argmax(axis=1)

    def _ban_eog(self, logits: np.ndarray) -> None:
        """``ignore_eos`` as llama-server means it: no end-of-generation token can be the argmax."""
        logits[list(self.eog_ids)] = -np.inf
