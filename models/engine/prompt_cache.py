"""The prompt cache: KV of conversations whose slot went to another request, kept in host RAM.

A slot holds one conversation's KV. With more conversations than slots, each new one
takes a slot and its old content was lost: the same document asked about again, or a
chat coming back after a few others, prefilled everything again. Here that KV (llama.cpp's
sequence state, the same bytes parking copies out) waits in host RAM, least recently
used dropped first under a byte cap, until a prompt that starts with it comes back.

Pure Python over opaque blobs, so what is kept, matched and dropped can be checked
without llama.cpp; the worker copies the blobs out of and back into the KV pool.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np

from models.engine.slots import common_prefix


@dataclass
class SavedPrompt:
    """One sequence's KV out of the pool, and the slot books that describe it."""

    history: list[Hashable]  # what the KV holds, item by item (tokens, image rows)
    marks: list[tuple[int, int]]  # M-RoPE position shifts (``Slot.marks``)
    prompt_end: int  # where the last request's prompt ended in ``history``
    blob: np.ndarray  # llama.cpp's sequence state (``llama_state_seq_get_data``)
    last_used: float = 0.0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = int(self.blob.nbytes)


class PromptCache:
    """Saved sequence states, least recently used dropped first to stay under ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: list[SavedPrompt] = []
        self.nbytes = 0  # read from other threads (memory accounting): one int, always whole

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def entries(self) -> list[SavedPrompt]:
        return list(self._entries)

    def add(self, entry: SavedPrompt) -> bool:
        """Keep ``entry``; False when it is not kept (over the cap on its own, or already covered).

        An entry whose history another one starts with adds nothing that one cannot give
        back (restoring it cuts the rest): the longer of the two stays, touched.
        """
        if not entry.history or entry.nbytes > self.max_bytes:
            return False
        for other in self._entries:
            if common_prefix(other.history, entry.history) == len(entry.history):
                other.last_used = max(other.last_used, entry.last_used)
                return False
        for other in [o for o in self._entries if common_prefix(o.history, entry.history) == len(o.history)]:
            self._drop(other)
        self._entries.append(entry)
        self.nbytes += entry.nbytes
        for victim in sorted(self._entries, key=lambda e: e.last_used):
            if self.nbytes <= self.max_bytes:
                break
            self._drop(victim)
        return True

    def best(self, items: list[Hashable]) -> tuple[SavedPrompt | None, int]:
        """The entry sharing the longest prefix with ``items``, and that prefix's length."""
        best, best_n = None, 0
        for entry in self._entries:
            n = common_prefix(entry.history, items)
            if n > best_n:
                best, best_n = entry, n
        return best, best_n

    def take(self, entry: SavedPrompt) -> SavedPrompt:
        """Remove ``entry`` to restore it into a slot (the slot's books own it from then on)."""
        self._drop(entry)
        return entry

    def _drop(self, entry: SavedPrompt) -> None:
        self._entries.remove(entry)
        self.nbytes -= entry.nbytes
