"""Speculative decoding by prompt lookup: draft tokens, plan how many to verify, learn.

Answers that repeat text already in the context (copying a work order, filling a form
from it, reading back part numbers) are full of tokens the context itself predicts:
match the last tokens of the sequence against earlier ones and propose what followed
them. One ``llama_decode`` over the next token plus a proposal checks them all at once,
and every proposed token the model agrees with is a step saved. On a CPU the extra rows
are not free (see ``NGRAM_SIZES``), so proposals are made only where they are likely to
hold, and their length is planned from what steps were measured to cost.

Pure Python, like admission: the worker puts the drafts in its batch, verifies them
against its own sampling (``models.engine.worker``) and rolls rejected cells back.

Why verification keeps the output distribution: the drafter proposes one token with
certainty (q(d) = 1). The standard rejection rule then accepts d with probability
min(1, p(d)/q(d)) = p(d) and, on rejection, samples from p with d removed. Sampling x
from the target's own chain at each drafted position and accepting while x == d does
exactly that, and what is emitted is always the sampled x, so greedy output is the
same argmax sequence and sampled output keeps the target's distribution (and its
grammar and penalties, which live in the sampler chain).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

__all__ = [
    "DEFAULT_SPECULATIVE", "MAX_DRAFT", "NGRAM_SIZES", "PRIOR_ROW_SHARE", "RESYNC_TOKENS", "SPECULATIVE_MODES",
    "CostsByThreads",
    "NgramIndex", "SpecState", "StepCosts", "mode_problem", "plan_drafts",
]

SPECULATIVE_MODES = ("off", "ngram", "draft")
# What a model gets unless configured: see the README's speculative decoding section
# for the benchmark that decided it.
DEFAULT_SPECULATIVE = "ngram"



def mode_problem(mode: str, draft_path: str | None) -> str | None:
    """What is wrong with a speculative mode and draft model pairing, or None.

    One rule for the engine and the model registry: ``draft`` needs a draft model and
    only ``draft`` uses one (a draft model beside ``ngram`` would load and never run).
    """
    if mode not in SPECULATIVE_MODES:
        return f"speculative must be one of {', '.join(SPECULATIVE_MODES)}, not {mode!r}"
    if mode == "draft" and not draft_path:
        return "speculative draft needs a draft model (--draft-model / EDGEVLM_DRAFT_MODEL / draft_model)"
    if mode != "draft" and draft_path:
        return f"a draft model is used only with speculative draft, not {mode!r}"
    return None


# The tail lengths looked up, longest first. On a CPU a verification step is not free
# (SmolLM2-135M, 2 cores: 7 ms for one row, 15 for two, 68 for sixteen), so a draft pays
# only when it is long and nearly all accepted. A match of 16 or more tokens is text
# being copied; 2- to 8-token matches were tried first and are mostly common phrases
# or the model's own loops, whose continuation it does not repeat: no faster overall.
NGRAM_SIZES = (24, 16)
# Most tokens drafted for one sequence in one step (llama-server's ngram-mod maximum).
MAX_DRAFT = 64
# Re-finding a copy after the model strays from it: once a long match has said where the
# text being copied continues, a one-token deviation (a changed word, a digit) would
# otherwise stop drafting until 16 more tokens match again. Instead the last
# RESYNC_TOKENS tokens are looked up only near the point the copy had reached (from
# RESYNC_BEHIND before it to RESYNC_AHEAD after it), where a short match is the same
# copy going on, not a common phrase. bench.speculative_replay (15 greedy answers to
# grounded prompts, measured step costs, the planner below): 1.17x the speed of no
# speculation with long matches alone, 1.23x with this.
RESYNC_TOKENS = 4
RESYNC_BEHIND = 4
RESYNC_AHEAD = 16
# What the acceptance estimate starts from, as counts of accepted and rejected tokens:
# a long match is usually text being copied.
PRIOR_HITS = 9.5
PRIOR_MISSES = 0.5
# Drafts with no token accepted, in a row, before a sequence pauses drafting; the pause
# (in generated tokens) starts at PAUSE_TOKENS and doubles each time it recurs.
FAIL_STREAK = 2
PAUSE_TOKENS = 16
PAUSE_MAX_TOKENS = 256
# Weight of older drafts in the acceptance estimate, per verified draft.
ACCEPT_DECAY = 0.7


class NgramIndex:
    """A sequence's tokens and, per n-gram, where it last occurred before the tail; and,
    once a long match was found, where the text being copied continues.

    ``items`` may hold non-token entries (an image's placeholder rows): they never match
    anything and never enter a draft. The index lags one token behind the sequence, so
    the n-gram ending at the newest token is never matched against itself. ``resync``
    False keeps to long matches (see ``RESYNC_TOKENS``).
    """

    def __init__(self, items: Iterable[Hashable] = (), *, resync: bool = True):
        self.tokens: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}
        self._resyncs = resync
        # Where the text being copied continues: the index of the token a copy would
        # propose next, moved on by every token appended (accepted, or the model's own
        # in place of a rejected one). None until a long match has been found.
        self._copy_at: int | None = None
        self.extend(items)

    def extend(self, items: Iterable[Hashable]) -> None:
        for item in items:
            # a unique negative stand-in: equal to no token and to no other stand-in
            tok = item if isinstance(item, int) and item >= 0 else -1 - len(self.tokens)
            self._index_tail()
            self.tokens.append(tok)
            if self._copy_at is not None:
                self._copy_at += 1

    def _index_tail(self) -> None:
        """Record the n-grams ending at the current last token (their continuation comes next)."""
        toks, end = self.tokens, len(self.tokens)
        for n in NGRAM_SIZES:
            if end < n:
                continue
            gram = tuple(toks[end - n:end])
            if min(gram) < 0:
                continue
            self._last[gram] = end

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the longest recent match of the tail, or
        else those after the tail's short match near where a copy had got to."""
        if k <= 0:
            return []
        toks = self.tokens
        for n in NGRAM_SIZES:
            if len(toks) < n:
                continue
            at = self._last.get(tuple(toks[-n:]))
            if at is None:
                continue
            out = self._continuation(at, k)
            if out:
                self._copy_at = at
                return out
        at = self._resync()
        if at is None:
            return []
        self._copy_at = at
        return self._continuation(at, k)

    def _continuation(self, at: int, k: int) -> list[int]:
        out = []
        for tok in self.tokens[at:at + k]:
            if tok < 0:
                break
            out.append(tok)
        return out

    def _resync(self) -> int | None:
        """Where the copy goes on after a deviation: the end of the occurrence of the last
        RESYNC_TOKENS tokens nearest the copy's expected place, before the tail itself."""
        toks, m = self.tokens, RESYNC_TOKENS
        if not self._resyncs or self._copy_at is None or len(toks) <= m:
            return None
        tail = toks[-m:]
        if min(tail) < 0:
            return None
        expected = self._copy_at
        best = None
        for end in range(max(m, expected - RESYNC_BEHIND), min(len(toks) - 1, expected + RESYNC_AHEAD) + 1):
            if toks[end - m:end] == tail and (best is None or abs(end - expected) < abs(best - expected)):
                best = end
        return best


@dataclass
class SpecState:
    """One sequence's drafting: its index, acceptance so far and any pause."""

    index: NgramIndex | None  # prompt lookup's; None when a draft model proposes
    seen: int = 0  # sampled tokens already in the index
    hits: float = PRIOR_HITS  # decayed count of accepted drafted tokens
    misses: float = PRIOR_MISSES  # decayed count of rejected first-mismatches
    fail_streak: int = 0
    pause: int = PAUSE_TOKENS
    paused_until: int = 0  # n_generated before which this sequence does not draft
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        """Estimated chance the next drafted token is accepted (a geometric run's p)."""
        return self.hits / (self.hits + self.misses)

    def catch_up(self, sampled: Sequence[int]) -> None:
        """Add the tokens sampled since the last draft to the index."""
        if self.index is not None and len(sampled) > self.seen:
            self.index.extend(sampled[self.seen:])
            self.seen = len(sampled)

    def record(self, n_drafted: int, n_accepted: int, n_generated: int) -> None:
        """Learn from one verified draft; pause after a run of wholly rejected ones."""
        self.drafted += n_drafted
        self.accepted += n_accepted
        self.hits = self.hits * ACCEPT_DECAY + n_accepted
        self.misses = self.misses * ACCEPT_DECAY + (1 if n_accepted < n_drafted else 0)
        if n_accepted:
            self.fail_streak = 0
            self.pause = PAUSE_TOKENS
            return
        self.fail_streak += 1
        if self.fail_streak >= FAIL_STREAK:
            self.paused_until = n_generated + self.pause
            self.pause = min(PAUSE_MAX_TOKENS, self.pause * 2)
            self.fail_streak = 0


# Row counts whose step times are learned separately; a count costs what its bucket does.
_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Every this many plans one ignores the measured costs for up to EXPLORE_ROWS extra
# rows, so a cost measured in a bad moment (another process on the cores) cannot keep
# drafts off for good. Rare and small: a probe of 8 rows costs about four plain steps.
EXPLORE_EVERY = 256
EXPLORE_ROWS = 8


# What one more row is assumed to cost, as a share of the cheapest measured step, while
# only that step has been measured: enough to try a short draft, never a long one.
PRIOR_ROW_SHARE = 0.25


@dataclass
class StepCosts:
    """How long a decoding step takes, by decoding sequences and batch rows, as measured.

    Every step without a prompt chunk is a measurement (plain decode steps and
    verification steps alike), so the planner's view of "what do k more rows cost" is
    this machine's, under its present load, not a guess. Sequences are part of the key
    because each one attends over its own context: four streams' rows cost more than
    one stream's.

    A row count not measured yet costs what the measured counts around it say (a line
    through the nearest two), and the planner may go only one row bucket past the
    largest measured one (``frontier``). Rows are nearly free on a memory-bound machine
    and cost as much as a whole step on a compute-bound one (2 vCPUs of an AMD EPYC:
    13 ms for one row, 26 for two, 129 for sixteen): drafts grow bucket by bucket while
    what they cost is worth it, and a first probe never verifies 64 rows at once.
    """

    weight: float = 0.2
    ms: dict[tuple[int, int], float] = field(default_factory=dict)
    plans: int = 0

    @staticmethod
    def bucket(rows: int) -> int:
        i = bisect.bisect_left(_BUCKETS, rows)
        return _BUCKETS[min(i, len(_BUCKETS) - 1)]

    def record(self, seqs: int, rows: int, ms: float) -> None:
        key = (seqs, self.bucket(rows))
        old = self.ms.get(key)
        self.ms[key] = ms if old is None else old + self.weight * (ms - old)

    def _measured(self, seqs: int) -> list[tuple[int, float]]:
        return sorted((k, ms) for (s, k), ms in self.ms.items() if s == seqs)

    def cost(self, seqs: int, rows: int) -> float | None:
        """Estimated ms for ``rows`` rows of ``seqs`` sequences; None if none measured."""
        b = self.bucket(rows)
        if (seqs, b) in self.ms:
            return self.ms[(seqs, b)]
        pts = self._measured(seqs)
        if not pts:
            return None
        below = [p for p in pts if p[0] < b]
        above = [p for p in pts if p[0] > b]
        if not below:
            return above[0][1]
        k0, c0 = below[-1]
        if above:  # between two measured counts: on the line through them
            k1, c1 = above[0]
            return c0 + (c1 - c0) * (b - k0) / (k1 - k0)
        if len(below) >= 2:  # past the largest: the last measured slope, never falling
            kp, cp = below[-2]
            slope = max(0.0, (c0 - cp) / (k0 - kp))
        else:
            slope = PRIOR_ROW_SHARE * c0
        return c0 + slope * (b - k0)

    def frontier(self, seqs: int) -> int | None:
        """The most rows a plan may use: one bucket past the largest measured; None if none is."""
        pts = self._measured(seqs)
        if not pts:
            return None
        i = _BUCKETS.index(pts[-1][0])
        return _BUCKETS[min(i + 1, len(_BUCKETS) - 1)]

    def explore(self) -> bool:
        """Whether this plan should ignore the costs (one in EXPLORE_EVERY)."""
        self.plans += 1
        return self.plans % EXPLORE_EVERY == 0


class CostsByThreads:
    """``StepCosts`` per compute-thread count. A runner's thread count changes while other
    models decode (``models.runner.cpu_share``), and what a step cost on two threads says
    nothing of its cost on one: each count keeps its own measurements."""

    def __init__(self) -> None:
        self._tables: dict[int, StepCosts] = {}

    def for_threads(self, n: int) -> StepCosts:
        return self._tables.setdefault(n, StepCosts())


def plan_drafts(candidates: Sequence[tuple[float, int]], base_tokens: int, base_rows: int,
                costs: StepCosts, max_rows: int, *, explore: bool = False,
                draft_ms: float = 0.0) -> list[int]:
    """How many drafted tokens each sequence verifies this step.

    ``candidates`` are (acceptance, tokens available) per drafting sequence; the step
    yields ``base_tokens`` tokens (one per decoding sequence) from ``base_rows`` rows
    without drafts. Each sequence's expected tokens for k drafts are 1 + a + ... + a^k;
    rows are added one at a time where the next one is likeliest to be accepted, up to
    ``costs.frontier``, and the prefix with the most expected tokens per ms is kept.
    Where rows cost almost nothing (a memory-bound machine) drafts run long; where
    each row costs real time (a compute-bound CPU, a batch full of decoding streams)
    only well-accepted drafts stay, or none. ``explore`` treats a few rows as free, to
    measure what they cost now.

    ``draft_ms`` is what proposing one token costs before the step (a draft model's own
    decode, as measured; prompt lookup's is nil): a draft model as slow as the target
    never pays, however well it agrees, so it stops drafting.
    """
    if explore:
        max_rows = min(max_rows, base_rows + EXPLORE_ROWS)
    else:
        max_rows = min(max_rows, costs.frontier(base_tokens) or base_rows)
    ks = [0] * len(candidates)
    gains = [a for a, _ in candidates]  # a^(k+1): the chance the next row of each is accepted
    priced: dict[int, float] = {}  # by row bucket: rows within one cost the same

    def cost(rows: int) -> float:
        b = costs.bucket(rows)
        if b not in priced:
            ms = None if explore else costs.cost(base_tokens, rows)
            priced[b] = ms if ms is not None and ms > 0 else base
        return priced[b]

    base = costs.cost(base_tokens, base_rows) or 1.0
    expected = float(base_tokens)
    best_value, best_rows = expected / base, 0
    order: list[int] = []
    rows = base_rows
    # Step costs jump at bucket edges, so the rows are added all the way and the best
    # prefix of that order is kept, rather than stopping at the first jump.
    while rows < max_rows:
        pick = -1
        for i, (_, avail) in enumerate(candidates):
            if ks[i] < avail and (pick < 0 or gains[i] > gains[pick]):
                pick = i
        if pick < 0 or gains[pick] <= 0.0:
            break
        ks[pick] += 1
        expected += gains[pick]
        gains[pick] *= candidates[pick][0]
        rows += 1
        order.append(pick)
        value = expected / (cost(rows) + (0.0 if explore else draft_ms) * len(order))
        if value > best_value:
            best_value, best_rows = value, len(order)
    ks = [0] * len(candidates)
    for i in order[:best_rows]:
        ks[i] += 1
    return ks
