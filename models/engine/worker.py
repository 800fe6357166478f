"""The engine: its front door, its worker thread and loop, and making room in the KV pool."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Iterator

import llama_cpp
import numpy as np

from models.engine.admission import place, preemption_victim, resume_point, worth_restoring
from models.engine.batch import PREFILL_CHUNK_WHILE_DECODING, BatchBuilder
from models.engine.job import Job
from models.engine.native import NativeModel
from models.engine.prefix import MIN_SAVE, PARK_MIN_PREFILL, PrefixSharing
from models.engine.prompt_cache import PromptCache
from models.engine.slots import Slot, common_prefix, evict_idle, pool_cells
from models.engine.speculative import CostsByThreads, mode_problem
from models.engine.types import (EngineClosed, EngineConfig, EngineError, Event, Failed, Finished,
                                 GenerationRequest, Sink, TextDelta, kv_layout_problem,
                                 stream_interval_problem)
from models.engine.validation import Limits, check_queue, check_request
from models.sampling import build_sampler

log = logging.getLogger("edgevlm.engine")

# Longest an idle engine holds its first step for requests the server is still
# preparing, so a burst prefills in one step (long enough for a text prompt's template
# and tokenizer, short next to an image encode it would otherwise wait out).
ARRIVAL_WAIT_S = 0.015

# The longest a running request's text waits for its hand-over under ``stream_interval``:
# a reader sees no pause in ten updates a second, and a step this slow is never held.
STREAM_HOLD_MAX_S = 0.1


class Engine(NativeModel, PrefixSharing, BatchBuilder):
    """One model, one context, ``n_parallel`` sequences, one worker thread."""

    def __init__(self, config: EngineConfig):
        problem = (mode_problem(config.speculative, config.draft_path) or kv_layout_problem(config.kv_layout)
                   or stream_interval_problem(config.stream_interval))
        if problem is not None:
            raise EngineError(problem, code="invalid_config")
        self._load(config)
        self._costs = CostsByThreads()
        self._step_costs = self._costs.for_threads(self.n_threads)  # measured llama_decode ms (plans drafts)
        self._threads_now = self._threads_wanted = self.n_threads
        run_ids = itertools.count()  # one numbering for every slot's cell runs
        self._slots = [Slot(seq_id=i, run_ids=run_ids) for i in range(self.n_parallel)]
        self._prompt_cache = PromptCache(config.prompt_cache_mb << 20) if config.prompt_cache_mb > 0 else None
        self._waiting: deque[Job] = deque()
        self._outbox: list[tuple[Sink, Event]] = []  # events waiting for the next flush
        self._stream_interval = self.info.stream_interval  # "auto" resolved at load
        self._held_steps = 0  # decode steps whose events the outbox still holds
        self._held_since = 0.0  # when the outbox first held them (perf_counter)
        self._last_step_flush = 0.0  # the previous step's flush: one step ago
        self._urgent = False  # the outbox holds an event that goes out at the next flush
        # Called after each flush has handed its events to their sinks: a runner sends
        # them to the HTTP process then, all of one step in one message.
        self.flushed: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._closing = False
        self._active = 0
        self._preparing = 0  # requests the server is still preparing for this engine
        self._thread = threading.Thread(target=self._run, name=f"engine-{config.model_id}", daemon=True)
        self._thread.start()

    @property
    def limits(self) -> Limits:
        return Limits(n_ctx=self.n_ctx, n_embd=self.n_embd, n_batch=self.n_batch, mrope=self.mrope)

    @property
    def memory_bytes(self) -> int:
        """What loading took (weights, KV pool, buffers) plus KV parked or cached in host RAM."""
        parked = [s.parked for s in self._slots]  # read once: the worker may drop one meanwhile
        cached = self._prompt_cache.nbytes if self._prompt_cache is not None else 0
        return self._load_bytes + sum(p.nbytes for p in parked if p is not None) + cached

    # ----------------------------------------------------------- front door
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._active

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or self._active > 0

    def submit(self, req: GenerationRequest, sink: Sink, *, max_queue: int) -> Job:
        """Queue a request; raises at once rather than accept what it cannot serve."""
        check_request(req, self.limits)
        job = Job(req, sink)
        with self._cond:
            if self._closing or not self._thread.is_alive():
                raise EngineClosed("the model is being unloaded")
            free_slots = max(0, len(self._slots) - self._active)
            check_queue(self.config.model_id, len(self._waiting) - free_slots, max_queue)
            self._waiting.append(job)
            self._cond.notify()
        return job

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Mark a request being prepared (template, images) for this engine until it is submitted.

        An idle engine holds its first step (at most ``ARRIVAL_WAIT_S``) while any are
        marked, so requests that arrive together prefill in one step instead of the
        first prompt running alone while the rest wait for it. Submit inside the block.
        """
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            log.error("engine thread for %s did not stop; leaking its context", self.config.model_id)
            return
        self._free_native()

    # ----------------------------------------------------------- worker
    def _emit(self, job: Job, event: Event) -> None:
        self._outbox.append((job.sink, event))
        if not isinstance(event, TextDelta):
            self._urgent = True  # an end: the request's figures and its client wait for it
        elif not job.streamed:
            job.streamed = True
            self._urgent = True  # a first token: time to first token is not held back

    def _flush(self, step: bool = False) -> None:
        """Hand queued events to their requests.

        Called just before each ``llama_decode`` (``step``; it releases the GIL), so the
        event loop formats and sends the previous step's tokens while the next step
        computes, instead of contending with this thread for the GIL between steps.

        With ``stream_interval`` N a step's text waits in the outbox until N steps'
        worth is there (or a first token or an end comes), and then goes in one hand-over;
        never held so long that it would wait more than ``STREAM_HOLD_MAX_S`` for it, so
        a slow model (a step of 100 ms or more) hands every step's text over as it comes.
        Each hand-over wakes the server (the runner's socket, the event loop, an SSE
        write) and the client on the cores llama.cpp computes on: on a 2-core box each
        wake-up costs about as much CPU as 0.1-0.2 ms of the model's compute.
        """
        if step and self._stream_interval > 1:  # at 1 every step hands over: nothing to time
            now = time.perf_counter()
            step_s, self._last_step_flush = now - self._last_step_flush, now
            if self._outbox and not self._urgent and self._held_steps + 1 < self._stream_interval:
                # held until the next step's flush: only while that stays within the bound
                held_s = now - self._held_since if self._held_steps else 0.0
                if held_s + step_s < STREAM_HOLD_MAX_S:
                    if not self._held_steps:
                        self._held_since = now
                    self._held_steps += 1
                    return
        self._held_steps = 0
        self._urgent = False
        if self._outbox:
            out, self._outbox = self._outbox, []
            for sink, event in out:
                try:
                    sink(event)
                except Exception:  # e.g. the request's event loop is gone; others still get theirs
                    log.warning("could not deliver an engine event", exc_info=True)
            if self.flushed is not None:
                try:
                    self.flushed()
                except Exception:
                    log.warning("could not send a step's engine events", exc_info=True)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("engine worker for %s stopped", self.config.model_id)
            with self._cond:
                self._closing = True
                pending = list(self._waiting) + [s.job for s in self._slots if s.job is not None]
                self._waiting.clear()
            for job in pending:
                self._finish(job, error=EngineError("the inference worker stopped", code="engine_failed"))
            self._flush()

    def _loop(self) -> None:
        running: list[Job] = []
        while True:
            if not running:
                self._flush()
            with self._cond:
                while not self._closing and not self._waiting and not running:
                    self._cond.wait()
                if not running:
                    self._await_arrivals_locked()
                if self._closing:
                    pending = list(self._waiting) + running
                    self._waiting.clear()
                    break
                admitted = self._admit_locked(running)
            # Trim the caches that stay in the pool before copying parked ones back, so the
            # restored cells fill the holes just freed: llama.cpp attends over every cell up
            # to the highest one in use, and caches restored above a long chat's cells kept
            # a burst's attention twice as wide as its cells for as long as they lived.
            for job in sorted(admitted, key=self._restores):
                self._start(job)
                if not job.done:
                    running.append(job)
            if len(running) > 1 and admitted and not self.per_slot:  # rows of one stream only
                self._join_prefills(admitted, running)
            self._apply_threads()
            try:
                self._step(running)
            except Exception as exc:  # never let one bad step kill the worker
                log.exception("engine step failed")
                with self._cond:
                    for job in running:
                        if job in self._waiting:  # preempted during the failed step
                            self._waiting.remove(job)
                for job in running:
                    self._finish(job, error=EngineError(f"inference failed: {exc}"))
            running = [j for j in running if not j.done and j.slot is not None]
            with self._cond:
                self._active = len(running)
        for job in pending:
            self._finish(job, error=EngineClosed("the model was unloaded"))
        self._flush()

    def set_threads(self, n_threads: int) -> None:
        """Compute with ``n_threads`` from the next step on (any thread may call this).

        When several models decode at once, their runners share the cores
        (``models.runner.cpu_share``): more compute threads than cores make llama.cpp's
        threads spin at barriers while the thread they wait for is descheduled.
        """
        if n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self._threads_wanted = n_threads

    def _apply_threads(self) -> None:
        """Worker thread, between steps: take up the thread count ``set_threads`` asked for."""
        n = self._threads_wanted
        if n != self._threads_now:
            llama_cpp.llama_set_n_threads(self.ctx, n, n)
            if self._drafter is not None:
                self._drafter.set_threads(n)
            self._threads_now = n
            self._step_costs = self._costs.for_threads(n)

    @property
    def threads(self) -> int:
        """The compute threads of the current (or next) step."""
        return self._threads_now

    def _await_arrivals_locked(self) -> None:
        """Before an idle engine's first step, let requests still being prepared join it."""
        deadline = time.perf_counter() + ARRIVAL_WAIT_S
        while self._preparing and not self._closing and len(self._waiting) < len(self._slots):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    # ----------------------------------------------------------- admission
    def _admit_locked(self, running: list[Job]) -> list[Job]:
        admitted: list[Job] = []
        needs: list[int] = []  # cells each admitted job adds to the pool
        if any(j.cancelled or j.done for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled or j.done]:
                self._waiting.remove(job)
                self._finish(job, reason="cancelled")
        while self._waiting:
            job = self._waiting[0]
            plan = place(job, self._slots, running, needs, self.n_ctx, per_slot=self.per_slot)
            if plan is None:
                break
            evict_idle(self._slots, plan.evict, self._evict, keep=plan.slot)
            needs.append(plan.need)
            self._waiting.popleft()
            job.slot = plan.slot
            plan.slot.job = job
            admitted.append(job)
            self._active = len(running) + len(admitted)
        return admitted

    def _restores(self, job: Job) -> bool:
        """Whether starting ``job`` copies KV back into the pool (its slot's parked KV, or a
        cached prompt)."""
        slot = job.slot
        if slot is None:
            return False
        common = common_prefix(slot.history, job.items)
        if slot.parked is not None and worth_restoring(slot, common):
            return True
        return self._cache_gain(job, common)[1] >= MIN_SAVE

    def _start(self, job: Job) -> None:
        slot = job.slot
        assert slot is not None
        if not job.preemptions:
            job.t_admit = time.perf_counter()
        if job.cancelled:
            self._finish(job, reason="cancelled")
            return
        fig = job.figures
        if self._restores(job):
            # Idle caches leave the pool before a copy comes back, not after: the copy would
            # land above their cells, and the cells this request keeps of it would hold the
            # window that wide for its whole life (a free-form answer after three grounded
            # chats decoded over ~1200 cells instead of ~250, ~10 % slower). An idle slot
            # holding a longer prefix to share stays: parking it would forgo the share.
            n, source = self._pool_prefix(job)
            self._park_if_widening(job, 0, keep=source if n >= MIN_SAVE else None)
        common = common_prefix(slot.history, job.items)
        if slot.parked is not None:
            if worth_restoring(slot, common) and self._unpark(slot):
                fig.restored_tokens += len(slot.history)
            else:
                self._save(slot)
                slot.truncate(0)
                common = 0
        if self._restore_saved(job, common):
            fig.restored_tokens += len(slot.history)
            common = common_prefix(slot.history, job.items)
        elif not slot.history:
            common = 0  # the cache's copy could not come back: the slot was emptied for it
        reuse = resume_point(job, common)
        if reuse < len(slot.history):
            self._save(slot, keep=reuse)
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.pos_at(reuse), -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                reuse = 0
            slot.truncate(reuse)
        own = reuse
        reuse = self._share_cached_prefix(job, reuse)
        self._follow_draft(slot)
        job.cursor = reuse
        slot.prompt_end = len(job.prompt_items)
        self._park_if_widening(job, reuse)
        fig.slot = slot.seq_id
        if job.preemptions:
            fig.preemptions = job.preemptions
            return  # sampler, text state and first-admission figures carry on
        fig.cached_tokens = reuse
        fig.shared_tokens = reuse - own
        fig.prefilled_tokens = job.n_prompt - reuse
        fig.input_tokens = job.n_prompt
        fig.queue_ms = (job.t_admit - job.t_submit) * 1000.0
        if job.req.sampling.plain_greedy:
            return  # _sample takes the argmax itself
        try:
            job.sampler = build_sampler(job.req.sampling, self.vocab,
                                        self.eog_ids if job.req.ignore_eos else ())
        except Exception as exc:
            self._finish(job, error=EngineError(str(exc), code="invalid_sampling", status=400))

    def _park_if_widening(self, job: Job, reuse: int, keep: Slot | None = None) -> None:
        """Park idle caches (but ``keep``) before ``job`` prefills from ``reuse`` on, if its
        prompt is long or they would widen the window the running requests attend over.
        Per slot, idle caches lie in their own streams: nobody attends over them."""
        if not self.per_slot and (job.n_prompt - reuse >= PARK_MIN_PREFILL or self._idle_cells_widen(
                job.n_prompt - reuse + sum(j.reserve for s in self._slots if (j := s.job) is not None))):
            self._park_idle(keep)

    # ----------------------------------------------------------- room
    def _ensure_room(self, live: list[Job], n_new: int) -> None:
        """Free KV cells before a step: idle caches first, then preempt the youngest request.

        Per slot there is nothing to free: a prompt fits its stream (``check_request``)
        and generation ends at the stream's end (``_sample``).
        """
        if self.per_slot:
            return
        used = pool_cells(self._slots)
        # Cells this step may add: a token per decoding sequence, the step's prompt chunk
        # (shared by all prefilling jobs) and possibly one image chunk of up to n_batch rows.
        remaining = sum(j.n_prompt - j.cursor for j in live if j.cursor < j.n_prompt)
        chunk = PREFILL_CHUNK_WHILE_DECODING if n_new else self.n_batch
        need = n_new + min(remaining, chunk + self.n_batch)
        used -= evict_idle(self._slots, used + need - self.n_ctx, self._evict)
        # Still short: the most recently admitted job gives its cells back and waits at the
        # head of the queue, resuming later exactly where it was; a running stream is
        # never cut short for a newcomer. A job alone at the limit ends with "length".
        while used + need > self.n_ctx:
            holders = [j for j in live if not j.done and j.slot is not None]
            if len(holders) <= 1:
                for j in holders:
                    if j.next_token is not None:
                        self._finish(j, reason="length")
                break
            youngest = preemption_victim(holders)
            if youngest.next_token is not None and not youngest.resuming:
                n_new -= 1
            else:
                remaining -= youngest.n_prompt - youngest.cursor
            need = n_new + min(remaining, chunk + self.n_batch)
            self._preempt(youngest)
            used = pool_cells(self._slots)  # its cells that others share stay

    def _clear(self, slot: Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.truncate(0)
        self._follow_draft(slot)

    def _preempt(self, job: Job) -> None:
        slot = job.slot
        self._detach(job)
        self._save(slot)  # what it prefilled and generated comes back when it resumes
        self._clear(slot)
        slot.job = None
        slot.last_used = time.monotonic()
        job.requeue()
        with self._cond:
            self._waiting.appendleft(job)
        log.info("preempted a request of %s to free KV cells; it resumes when room frees up",
                 self.config.model_id)

    def _decode_failed(self, rc: int, undo: list[tuple[Job, int, int, int]], live: list[Job]) -> None:
        """Undo what the failed batch added; on "no KV room" free some and retry next step."""
        for job, *_ in undo:
            self._detach(job)  # followers go on alone: their undone rows were the leader's
        for job, n_hist, cursor, n_gen in undo:
            slot = job.slot
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.pos_at(n_hist), -1)
            slot.truncate(n_hist)
            self._follow_draft(slot)
            job.cursor = cursor
            del job.generated[n_gen:]
        if rc == 1:  # llama.cpp found no room in the KV cache for this batch: recoverable
            holders = [j for j in live if not j.done and j.slot is not None]
            if len(holders) > 1:
                self._preempt(preemption_victim(holders))
                return
            for job in holders:
                self._finish(job, reason="length")
            return
        for job, *_ in undo:
            self._finish(job, error=EngineError(f"llama_decode failed with status {rc}"))

    def _sample(self, job: Job, idx: int, greedy: int | None = None) -> None:
        if job.sampler is None:
            # Plain greedy: the first maximal logit, exactly what llama.cpp's greedy sampler
            # picks, without copying 49k candidates into a token-data array each step.
            if greedy is not None:
                tok = greedy
            else:
                row = llama_cpp.llama_get_logits_ith(self.ctx, idx)
                if not row:
                    self._finish(job, error=EngineError(f"llama.cpp returned no logits for batch row {idx}"))
                    return
                logits = np.ctypeslib.as_array(row, shape=(self.n_vocab,))
                if job.req.ignore_eos:
                    self._ban_eog(logits)
                tok = int(logits.argmax())
        else:
            tok = int(llama_cpp.llama_sampler_sample(job.sampler, self.ctx, idx))
        now = time.perf_counter()
        fig = job.figures
        if job.n_generated == 0 and not job.t_first:
            job.t_first = now
            fig.ttft_ms = (now - job.req.arrival) * 1000.0
            fig.prefill_ms = (now - job.t_admit) * 1000.0
        job.t_last = now
        # ignore_eos banned end-of-generation tokens from sampling (llama-server's meaning)
        if llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            self._finish(job, reason="stop")
            return
        job.n_generated += 1
        job.sampled.append(tok)
        text, stopped = job.text.push(self.token_bytes(tok))
        if text:
            self._emit(job, TextDelta(text))
        if stopped:
            self._finish(job, reason="stop")
        elif job.n_generated >= job.req.max_tokens:
            self._finish(job, reason="length")
        elif job.slot is not None and len(job.slot.history) + 1 >= self.n_ctx:
            self._finish(job, reason="length")
        else:
            job.next_token = tok

    def _finish(self, job: Job, *, reason: str | None = None, error: Exception | None = None) -> None:
        if job.done:
            return
        job.done = True
        job.next_token = None
        self._detach(job)
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
            job.sampler = None
        if job.slot is not None:
            job.slot.job = None
            job.slot.last_used = time.monotonic()
        fig = job.figures
        fig.output_tokens = job.n_generated
        if job.t_first:
            fig.decode_ms = (job.t_last - job.t_first) * 1000.0
        if job.batch_steps:
            fig.batch_size_mean = job.batch_sum / job.batch_steps
        if error is not None:
            self._emit(job, Failed(error, dataclasses.replace(fig)))
            return
        tail = job.text.flush() if reason != "cancelled" else ""
        if tail:
            self._emit(job, TextDelta(tail))
        self._emit(job, Finished(reason or "stop", dataclasses.replace(fig)))
