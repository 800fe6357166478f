"""Long-prompt policy: drop the oldest conversation turns until the prompt fits.

Opt-in per request (``edgevlm.truncate``); without it an over-long prompt is an error,
as with OpenAI. System/developer messages and the last user turn (plus anything
after it, e.g. an assistant prefix) are never dropped. Older messages go in whole
turns — a user message with the assistant and tool messages that answer it — so a
tool result is never left without the call that produced it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["PROTECTED_ROLES", "PromptTooLongError", "truncate_messages"]

# Roles whose messages are instructions, not history: never dropped.
PROTECTED_ROLES = frozenset({"system", "developer"})

Message = Mapping[str, Any]


class PromptTooLongError(ValueError):
    """Even the minimal prompt (protected messages + last user turn) exceeds the limit."""

    def __init__(self, minimum_tokens: int, limit: int) -> None:
        super().__init__(
            f"prompt needs at least {minimum_tokens} tokens after dropping all older turns "
            f"(system messages and the last user turn are kept), but the limit is {limit}"
        )
        self.minimum_tokens = minimum_tokens
        self.limit = limit


def _history_turns(messages: Sequence[Message]) -> list[list[int]]:
    """Indices of droppable messages grouped into turns, oldest first."""
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
    turns: list[list[int]] = []
    for i in range(last_user):
        role = messages[i].get("role")
        if role in PROTECTED_ROLES:
            continue
        if role == "user" or not turns:
            turns.append([i])
        else:
            turns[-1].append(i)
    return turns


def truncate_messages(
    messages: Sequence[Message],
    count_tokens: Callable[[list[Message]], int],
    limit: int,
) -> tuple[list[Message], int]:
    """Return ``(messages that fit in limit tokens, tokens dropped)``.

    Drops the fewest oldest turns needed (binary search: ``count_tokens`` is called
    O(log turns) times, as it usually renders the chat template and tokenizes).
    Raises ``PromptTooLongError`` if dropping every droppable turn is not enough.
    """
    msgs = list(messages)
    full = count_tokens(msgs)
    if full <= limit:
        return msgs, 0
    turns = _history_turns(msgs)

    def without_first(k: int) -> list[Message]:
        drop = {i for turn in turns[:k] for i in turn}
        return [m for i, m in enumerate(msgs) if i not in drop]

    minimal = without_first(len(turns))
    min_tokens = count_tokens(minimal)
    if min_tokens > limit:
        raise PromptTooLongError(min_tokens, limit)
    lo, hi, best = 1, len(turns), (minimal, min_tokens)  # smallest k that fits is in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        cand = without_first(mid)
        n = count_tokens(cand)
        if n <= limit:
            hi, best = mid, (cand, n)
        else:
            lo = mid + 1
    return best[0], full - best[1]
