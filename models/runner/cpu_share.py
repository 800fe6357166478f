"""The cores, shared among the runners that compute at the same time.

Each runner is its own process with its own llama.cpp thread team, sized for the whole
machine (``--threads``, physical cores by default). One model at a time runs at full
speed. Two at once would run twice the threads the cores hold, and llama.cpp's threads
spin at each of the hundreds of barriers per token while the thread they wait for is
descheduled: measured on a 2-core VM with SmolLM2-135M and 2 threads each, one model
alone decodes at 113 to 156 tok/s, two busy at once at 36 tok/s *together*; with one
thread each, they make 188 tok/s together.

So the HTTP process, which sees every runner's requests, splits the cores among the
runners that have work (``share_threads``) and tells a runner its share before the
request that changes it is sent (the runner's engine takes it up at its next step);
when a runner falls idle the others get its cores back.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Mapping
from typing import Protocol

from models.engine.native import default_threads


def share_threads(wanted: Mapping[Hashable, int], cores: int) -> dict[Hashable, int]:
    """Threads for each busy runner: what it wants while the wants fit in ``cores``,
    else an even split (at least one each; the cores left over go to the runners
    listed first, never above what they want)."""
    if sum(wanted.values()) <= cores or not wanted:
        return dict(wanted)
    even = max(1, cores // len(wanted))
    given = {k: min(w, even) for k, w in wanted.items()}
    spare = cores - sum(given.values())
    for k, w in wanted.items():
        if spare <= 0:
            break
        extra = min(spare, w - given[k])
        given[k] += extra
        spare -= extra
    return given


class Sharer(Protocol):
    """What the share needs of a runner client."""

    @property
    def busy(self) -> bool: ...  # it has requests in flight

    n_threads: int  # the threads it computes with alone

    def tell_threads(self, n: int) -> None: ...  # send the runner its share


class CpuShare:
    """Which runners are busy, and the thread count each was last told.

    A runner client calls ``update`` when its first request arrives (before sending it)
    and when its last one ends; the share reads ``busy`` itself, under its lock, so
    updates that race (a request ending as another arrives) still leave it right.
    """

    def __init__(self, cores: int | None = None):
        self.cores = cores or default_threads()
        self._lock = threading.Lock()
        self._busy: dict[Sharer, int] = {}  # runner -> threads it wants, in order of arrival
        self._told: dict[Sharer, int] = {}

    def update(self, runner: Sharer) -> None:
        """Re-split the cores after ``runner`` became busy or idle."""
        with self._lock:
            if runner.busy:
                self._busy.setdefault(runner, runner.n_threads)
            else:
                self._busy.pop(runner, None)  # keeps its count until its next request
            self._tell_locked()

    def forget(self, runner: Sharer) -> None:
        """``runner``'s process is gone (closed, or died; a new one starts with its own
        count): its cores go to the others."""
        with self._lock:
            self._told.pop(runner, None)
            self._busy.pop(runner, None)
            self._tell_locked()

    def _tell_locked(self) -> None:
        for r, n in share_threads(self._busy, self.cores).items():
            if self._told.get(r, r.n_threads) != n:
                self._told[r] = n
                r.tell_threads(n)

    def told(self, runner: Sharer) -> int:
        """The thread count ``runner`` computes with (as last told)."""
        with self._lock:
            return self._told.get(runner, runner.n_threads)


CPU_SHARE = CpuShare()  # one machine: every runner of this server process shares it
