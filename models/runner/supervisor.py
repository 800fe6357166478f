"""When a crashed runner restarts, and when its model is given up as failed."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RestartPolicy:
    """Restart after ``backoff_s`` doubling per crash (up to ``backoff_max_s``); after
    ``max_crashes`` crashes within ``window_s`` the model is marked failed instead."""

    max_crashes: int = 3
    window_s: float = 300.0
    backoff_s: float = 0.5
    backoff_max_s: float = 30.0


@dataclass
class CrashLog:
    """The recent crashes of one model's runner."""

    policy: RestartPolicy
    times: deque[float] = field(default_factory=deque)

    def record(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.times.append(now)
        while self.times and now - self.times[0] > self.policy.window_s:
            self.times.popleft()

    @property
    def given_up(self) -> bool:
        return len(self.times) >= self.policy.max_crashes

    @property
    def backoff_s(self) -> float:
        return min(self.policy.backoff_max_s, self.policy.backoff_s * 2 ** max(0, len(self.times) - 1))
