"""KV slots and cell accounting: what each sequence's KV holds and which cells it shares.

Pure Python: llama.cpp's memory calls live with the worker; these only keep the books
that admission and room-making decide from.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Hashable, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    from models.engine.job import Job


@dataclass
class Slot:
    seq_id: int
    history: list[Hashable] = field(default_factory=list)  # what this sequence's KV holds
    job: Job | None = None
    last_used: float = 0.0
    # Position of history item i is i + (shift in force at i). Always 0 for 1-D RoPE
    # models; an M-RoPE image advances the position by its n_pos, not its row count, so
    # each finished image appends (history index after it, new shift) to ``marks``.
    shift: int = 0
    marks: list[tuple[int, int]] = field(default_factory=list)
    # The KV of ``history`` (llama.cpp's sequence state) while it is out of the pool.
    parked: np.ndarray | None = None
    # Where the last request's prompt ended in ``history``: a prompt that extends past it
    # is that conversation's next turn (its reply may re-tokenize differently).
    prompt_end: int = 0
    # Which physical cells hold ``history``, for counting cells that several slots share:
    # ``runs`` are (run, start, end) spans of history lying in cells of ``run``; from
    # ``run_end`` on, history lies in the cells of ``tail``, the run this slot appends
    # to (a follower's tail is its leader's while they prefill jointly).
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    run_end: int = 0
    tail: int = 0
    run_ids: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        self.tail = next(self.run_ids)

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        """(run, start, end) of every history span in the pool; none while parked."""
        if self.parked is not None:
            return []
        if len(self.history) > self.run_end:
            return self.runs + [(self.tail, self.run_end, len(self.history))]
        return self.runs

    def seal(self, tail: int | None = None) -> None:
        """Close the span appended so far; what follows lies in run ``tail`` (a new one)."""
        if len(self.history) > self.run_end:
            self.runs.append((self.tail, self.run_end, len(self.history)))
            self.run_end = len(self.history)
        self.tail = next(self.run_ids) if tail is None else tail

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` history items (and the position shifts that apply to them)."""
        assert self.parked is None or n == 0, "restore a parked slot before truncating it"
        self.parked = None
        self.seal()  # cells after n are freed; what comes next lies in new cells
        self.runs = [(r, a, min(b, n)) for r, a, b in self.runs if a < n]
        self.run_end = min(self.run_end, n)
        self.history = self.history[:n] if n else []
        self.prompt_end = min(self.prompt_end, n)
        marks = self.marks
        while marks and marks[-1][0] > n:
            marks.pop()
        self.shift = marks[-1][1] if marks else 0

    def borrow(self, source: "Slot", start: int, end: int) -> None:
        """Take ``source``'s cells of history ``[start, end)`` (after this slot's first ``start``)."""
        self.seal()
        self.runs += [(r, max(a, start), min(b, end)) for r, a, b in source.spans if a < end and b > start]
        self.history.extend(source.history[start:end])
        self.run_end = end
        self.marks = [m for m in source.marks if m[0] <= end]
        self.shift = self.marks[-1][1] if self.marks else 0

    def refill(self) -> None:
        """The whole history came back into new cells (a parked cache restored)."""
        self.parked = None
        self.runs, self.run_end = [], 0
        self.tail = next(self.run_ids)

    def adopt(self, history: list[Hashable], marks: list[tuple[int, int]], prompt_end: int) -> None:
        """An empty slot took another sequence's saved KV (the prompt cache): its books too."""
        assert not self.history and self.parked is None, "clear a slot before it adopts a saved cache"
        self.history = list(history)
        self.marks = list(marks)
        self.shift = marks[-1][1] if marks else 0
        self.prompt_end = prompt_end
        self.refill()

    def pos_at(self, i: int) -> int:
        """Position of history item ``i`` (valid for ``i <= len(history)``)."""
        shift = 0
        for start, value in self.marks:
            if start > i:
                break
            shift = value
        return i + shift


def pool_cells(slots: Iterable[Slot]) -> int:
    """Distinct KV cells the slots' histories occupy: shared cells count once."""
    by_run: dict[int, list[tuple[int, int]]] = {}
    for slot in slots:
        for run, a, b in slot.spans:
            by_run.setdefault(run, []).append((a, b))
    total = 0
    for spans in by_run.values():
        spans.sort()
        lo, hi = spans[0]
        for a, b in spans[1:]:
            if a > hi:
                total += hi - lo
                lo = a
            hi = max(hi, b)
        total += hi - lo
    return total


# Idle slots' cells slow every decode step of the requests running beside them:
# llama.cpp attends over every cell up to the highest one in use, padded to this many,
# masked or not. Measured on 2 cores (SmolLM2-135M), a short request decoding beside 2213
# idle cached cells made 74 to 81 tok/s, 94 to 99 with them parked; beside one idle
# 235-cell chat (its window 512 cells instead of 256) 9.50 against 9.34 ms a token
# (medians of 8 alternated rounds, 7 of 8 faster parked). So a request of any length
# parks them whenever they would widen that window (``idle_cells_widen``).
KV_WINDOW_PAD = 256


def idle_cells_widen(live: int, total: int, grow: int) -> bool:
    """Whether ``total`` cells in the pool, ``live`` of them held by running requests that
    will add ``grow``, make llama.cpp attend over more padded cells than ``live`` alone.

    The pool fills from its lowest free cells, so the window is about the cells in use
    padded to ``KV_WINDOW_PAD``: a few idle cells cost nothing until they push it a step
    wider, and then every decode step of every running request pays for it.
    """
    def window(cells: int) -> int:
        return -(-cells // KV_WINDOW_PAD)

    return total > live and window(total + grow) > window(live + grow)


def common_prefix(a: list[Hashable], b: list[Hashable]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def evict_idle(slots: list[Slot], excess: int, clear: Callable[[Slot], None], keep: Slot | None = None) -> int:
    """Drop idle caches in the pool, least recently used first, until ``excess`` cells are free.

    ``clear`` empties one slot (the worker also removes its cells from llama.cpp).
    Returns the cells freed: cells another slot shares stay in the pool.
    """
    if excess <= 0:
        return 0
    idle = sorted((s for s in slots if s.job is None and s is not keep and s.spans),
                  key=lambda s: s.last_used)
    before = used = pool_cells(slots)
    for victim in idle:
        if before - used >= excess:
            break
        clear(victim)
        used = pool_cells(slots)  # cells another slot shares stay in the pool
    return before - used
