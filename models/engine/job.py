"""One submitted request as the worker sees it: prompt items, cursor, sampled tokens."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Hashable

from models.engine.detok import TextStream
from models.engine.types import GenerationRequest, ImageSegment, JobFigures, Segment, Sink

if TYPE_CHECKING:
    import llama_cpp

    from models.engine.slots import Slot
    from models.engine.speculative import SpecState

# Cells of KV reserved for a request's generation when admitting it, so a new prompt
# does not take the room a running stream is about to need.
GENERATION_RESERVE = 256


class Job:
    """A submitted request; ``cancel()`` is safe from any thread."""

    def __init__(self, req: GenerationRequest, sink: Sink):
        self.req = req
        self.sink = sink
        self._cancel = threading.Event()
        self.items: list[Hashable] = []
        self.seg_bounds: list[tuple[int, int, Segment]] = []
        for seg in req.segments:
            start = len(self.items)
            if isinstance(seg, ImageSegment):
                self.items.extend((seg.key, i) for i in range(seg.n_tokens))
            else:
                self.items.extend(seg)
            self.seg_bounds.append((start, len(self.items), seg))
        # no image rows in the prompt: a draft model, which reads tokens only, may draft for it
        self.text_only = not any(isinstance(seg, ImageSegment) for seg in req.segments)
        self.prompt_items = list(self.items)
        self.prompt_bounds = list(self.seg_bounds)
        self.generated: list[int] = []  # sampled tokens already decoded into the KV
        self.sampled: list[int] = []  # every token sampled for the output, in order
        self.preempted_at: list[int] = []  # len(sampled) at each preemption
        self.slot: Slot | None = None
        self.cursor = 0  # next prompt item to prefill
        # A request that starts beside another with the same next prompt tokens prefills
        # them jointly: the leader's batch rows carry both sequence ids up to ``lead_end``.
        self.lead: Job | None = None
        self.lead_end = 0
        self.followers: list[Job] = []
        self.sampler: llama_cpp.llama_sampler_p | None = None
        self.next_token: int | None = None
        self.n_generated = 0
        self.text = TextStream(req.stop)
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0
        self.t_first = 0.0
        self.streamed = False  # a text delta of it was emitted (its first goes out at once)
        self.t_last = 0.0
        self.batch_sum = 0
        self.batch_steps = 0
        self.done = False
        self.spec: SpecState | None = None  # drafting state, made on its first decode step
        self.figures = JobFigures()  # written by the worker only; events carry copies

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def n_prompt(self) -> int:
        return len(self.items)

    @property
    def reserve(self) -> int:
        """Room kept for its next tokens (up to GENERATION_RESERVE)."""
        return min(max(1, self.req.max_tokens - self.n_generated), GENERATION_RESERVE)

    @property
    def kv_budget(self) -> int:
        """KV cells this job holds once prefilled plus room for its next tokens."""
        return len(self.prompt_items) + len(self.generated) + self.reserve

    @property
    def resuming(self) -> bool:
        """Re-prefilling after preemption: the next token is already sampled."""
        return self.next_token is not None and self.cursor < self.n_prompt

    def requeue(self) -> None:
        """Forget the KV; on re-admission prefill prompt + generated tokens, then go on."""
        self.items = self.prompt_items + self.generated
        self.seg_bounds = list(self.prompt_bounds)
        if self.generated:
            self.seg_bounds.append((len(self.prompt_items), len(self.items), list(self.generated)))
        self.cursor = 0
        self.slot = None
        self.preempted_at.append(len(self.sampled))

    @property
    def preemptions(self) -> int:
        return len(self.preempted_at)

    def segment_at(self, pos: int) -> tuple[int, int, Segment]:
        for bound in self.seg_bounds:
            if bound[0] <= pos < bound[1]:
                return bound
        raise IndexError(pos)
