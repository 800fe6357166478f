"""A draft model for speculative decoding: a small model of the same family proposes tokens.

Prompt lookup (``models.engine.speculative``) proposes only text the context already
holds. A small model sharing the target's tokenizer (SmolLM2-135M for SmolLM2-1.7B)
proposes any text, greedily, at a fraction of the target's cost per token; the target
verifies the proposal in its own batch exactly as it verifies a prompt-lookup draft, so
the output is the target's either way.

The draft model has its own context, as large as the target's, with one sequence per
target slot: each sequence holds a prefix of what the target slot holds (its own books,
``histories``), caught up just before it drafts and cut back whenever the target's
cells are cut (rejected drafts, a reused or cleared slot, parked KV), so it never holds
cells the target slot no longer has. Image rows are not tokens the draft model can
read: sequences with images in their prompt do not draft with it.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import llama_cpp
import numpy as np

from models import cpu_paths
from models.attention import AttentionVerdict
from models.engine.slots import common_prefix
from models.engine.speculative import CostsByThreads
from models.engine.types import EngineError
from models.llama_lib import free_loaded

log = logging.getLogger("edgevlm.engine")

# Most tokens one sequence drafts per step (llama-server's --draft-max default): each is
# a sequential draft decode, so a long draft that fails early costs them all.
MAX_MODEL_DRAFT = 16
# Token ids whose text must match between the two vocabularies (besides BOS and EOS).
VOCAB_SAMPLE_EVERY = 97
# A sequence this far behind its target first looks for the prefix in another sequence
# of the draft context (shared cells, as the target shares them) before decoding it.
SHARE_MIN_LAG = 32


def vocab_mismatch(draft: llama_cpp.llama_vocab_p, target: llama_cpp.llama_vocab_p) -> str | None:
    """How the two vocabularies differ (the first difference found), or None when they agree.

    Verification compares token ids: a draft model that numbers tokens differently
    proposes ids the target reads as other text, and nothing it drafts is ever accepted.
    Equal sizes and equal text at a sample of ids (and at BOS/EOS) catch a different
    tokenizer without reading all of it.
    """
    n_draft, n_target = int(llama_cpp.llama_vocab_n_tokens(draft)), int(llama_cpp.llama_vocab_n_tokens(target))
    if n_draft != n_target:
        return f"{n_draft} tokens vs {n_target}"
    for name, get in (("BOS", llama_cpp.llama_vocab_bos), ("EOS", llama_cpp.llama_vocab_eos)):
        a, b = int(get(draft)), int(get(target))
        if a != b:
            return f"{name} is token {a} vs {b}"
    ids = set(range(0, n_target, VOCAB_SAMPLE_EVERY))
    ids |= {t for t in (int(llama_cpp.llama_vocab_bos(target)), int(llama_cpp.llama_vocab_eos(target)))
            if 0 <= t < n_target}
    for tok in sorted(ids):
        a, b = llama_cpp.llama_vocab_get_text(draft, tok), llama_cpp.llama_vocab_get_text(target, tok)
        if a != b:
            return f"token {tok} is {a.decode(errors='replace')!r} vs {b.decode(errors='replace')!r}"
    return None


class DraftModel:
    """The draft model, its context and what each of its sequences holds."""

    def __init__(self, path: str, *, target_path: str, target_vocab: llama_cpp.llama_vocab_p, n_ctx: int,
                 n_batch: int, n_parallel: int, n_threads: int, allowed: tuple[str, ...] | None,
                 gpu_layers: int, attention: Callable[[llama_cpp.llama_model_p], AttentionVerdict] | None = None):
        self.path = path
        self.model = cpu_paths.load_model(path, allowed, gpu_layers=gpu_layers)
        if not self.model:
            raise EngineError(f"could not load draft model file {path}", code="model_load_failed")
        self.ctx = None
        self.batch = None
        try:
            vocab = llama_cpp.llama_model_get_vocab(self.model)
            why = vocab_mismatch(vocab, target_vocab)
            if why is not None:
                raise EngineError(f"draft model {path} does not share the tokenizer of {target_path} ({why})",
                                  code="invalid_config")
            # its own kernel choice: a smaller model may time the other way
            self.attention = attention(self.model) if attention is not None else AttentionVerdict("auto", None, "not timed")
            cparams = llama_cpp.llama_context_default_params()
            cparams.flash_attn_type = self.attention.flash_attn_type
            cparams.n_ctx = n_ctx
            cparams.n_batch = cparams.n_ubatch = n_batch
            cparams.n_seq_max = n_parallel
            cparams.n_threads = cparams.n_threads_batch = n_threads
            cparams.kv_unified = n_parallel > 1  # like the target's pool
            cparams.no_perf = True
            self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise EngineError(f"could not create a draft context of {n_ctx} tokens", code="context_failed")
        except BaseException:
            self.close()
            raise
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(self.ctx))
        self.n_batch = n_batch
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.histories: list[list[int]] = [[] for _ in range(n_parallel)]
        # Measured ms per draft decode by (sequences, rows), per thread count like the target's.
        self._costs = CostsByThreads()
        self.costs = self._costs.for_threads(n_threads)

    def close(self) -> None:
        if self.batch is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None
        free_loaded(self)

    def set_threads(self, n: int) -> None:
        llama_cpp.llama_set_n_threads(self.ctx, n, n)
        self.costs = self._costs.for_threads(n)

    def token_ms(self, n_seqs: int) -> float:
        """Measured ms one drafted token costs when ``n_seqs`` sequences draft together.

        0 until measured: optimistic, like ``StepCosts``, so the first drafts measure it.
        """
        ms = self.costs.cost(n_seqs, n_seqs)
        return ms / n_seqs if ms else 0.0

    # ------------------------------------------------------------ books
    def keep(self, seq: int, n: int) -> None:
        """Drop sequence ``seq``'s cells from history item ``n`` on."""
        hist = self.histories[seq]
        if n < len(hist):
            llama_cpp.llama_memory_seq_rm(self.mem, seq, n, -1)
            del hist[n:]

    def follow(self, seq: int, history: Sequence[object]) -> None:
        """Keep only what sequence ``seq`` shares with its target slot's ``history``."""
        hist = self.histories[seq]
        n = len(hist)
        if list(history[:n]) != hist:  # in C; the item-by-item search only when they differ
            n = common_prefix(hist, list(history))
        self.keep(seq, n)

    # ------------------------------------------------------------ drafting
    def propose(self, wants: Sequence[tuple[int, list[int], int]], spare: Sequence[int]) -> list[list[int]]:
        """Draft greedily for each ``(seq, context, k)``: up to ``k`` tokens after ``context``.

        ``context`` is everything the target sequence holds plus its next token. The draft
        sequences first catch up on the tokens they lack (all in one batch), then each
        drafted position is one ``llama_decode`` over the sequences still drafting. When
        the draft context has no room, the cells of ``spare`` sequences (slots without a
        request) go first; when it still has none, nothing is drafted this step.
        """
        firsts = self._catch_up(wants, spare)
        if firsts is None:
            return [[] for _ in wants]
        out = [[tok] for tok in firsts]
        for j in range(1, max(k for _, _, k in wants)):
            rows = [i for i, (_, _, k) in enumerate(wants) if k > j]
            t0 = time.perf_counter()
            batch = self.batch
            for r, i in enumerate(rows):
                seq = wants[i][0]
                self._put(r, out[i][-1], len(self.histories[seq]), seq, True)
            batch.n_tokens = len(rows)
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                log.warning("draft model decode failed (llama_decode=%d); drafts cut short", rc)
                for i in rows:
                    seq = wants[i][0]
                    llama_cpp.llama_memory_seq_rm(self.mem, seq, len(self.histories[seq]), -1)
                break
            for i, tok in zip(rows, self._argmax(len(rows))):
                self.histories[wants[i][0]].append(out[i][-1])
                out[i].append(tok)
            self.costs.record(len(rows), len(rows), (time.perf_counter() - t0) * 1000.0)
        return out

    def _catch_up(self, wants: Sequence[tuple[int, list[int], int]], spare: Sequence[int]) -> list[int] | None:
        """Decode what each sequence lacks of its context; returns each one's first drafted token."""
        for seq, context, _ in wants:
            self.follow(seq, context)
            self.keep(seq, len(context) - 1)  # the last token's logits are needed: decode it again
            self._share(seq, context)
        rows = [(seq, pos, context[pos], pos == len(context) - 1)
                for seq, context, _ in wants for pos in range(len(self.histories[seq]), len(context))]
        for attempt in range(2):
            firsts = self._decode_rows(rows)
            if firsts is not None:
                for seq, context, _ in wants:
                    self.histories[seq][:] = context
                return firsts
            if attempt == 0 and any(self.histories[s] for s in spare):
                for s in spare:  # no room: idle slots' draft cells go first
                    self.keep(s, 0)
                continue
        for seq, _, _ in wants:  # still none: start these over next time
            self.keep(seq, 0)
        return None

    def _share(self, seq: int, context: list[int]) -> None:
        """Tag another sequence's cells of a long common prefix with ``seq`` instead of decoding it."""
        have = len(self.histories[seq])
        if len(context) - have < SHARE_MIN_LAG:
            return
        best, source = have, None
        for other, hist in enumerate(self.histories):
            if other != seq and len(hist) > best:
                n = min(common_prefix(hist, context), len(context) - 1)
                if n > best:
                    best, source = n, other
        if source is not None:
            llama_cpp.llama_memory_seq_cp(self.mem, source, seq, have, best)
            self.histories[seq].extend(context[have:best])

    def _decode_rows(self, rows: list[tuple[int, int, int, bool]]) -> list[int] | None:
        """Decode (seq, pos, token, wants logits) rows in ``n_batch`` chunks; the argmax of
        each logits row in order, or None (nothing kept) when a decode fails."""
        firsts: list[int] = []
        done: dict[int, int] = {}  # sequence -> first position decoded this call
        for start in range(0, len(rows), self.n_batch):
            chunk = rows[start:start + self.n_batch]
            t0 = time.perf_counter()
            for r, (seq, pos, tok, logits) in enumerate(chunk):
                self._put(r, tok, pos, seq, logits)
                done.setdefault(seq, pos)
            self.batch.n_tokens = len(chunk)
            rc = llama_cpp.llama_decode(self.ctx, self.batch)
            if rc != 0:
                if rc != 1:
                    log.warning("draft model decode failed (llama_decode=%d); not drafting this step", rc)
                for seq, pos in done.items():
                    llama_cpp.llama_memory_seq_rm(self.mem, seq, pos, -1)
                return None
            n_out = sum(1 for row in chunk if row[3])
            if n_out:
                firsts += self._argmax(n_out)
            self.costs.record(len({row[0] for row in chunk}), len(chunk), (time.perf_counter() - t0) * 1000.0)
        return firsts

    def _put(self, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch = self.batch
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _argmax(self, n_out: int) -> list[int]:
        """The greedy token of each of the last decode's ``n_out`` logits rows, in batch order."""
        logits = llama_cpp.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(logits, shape=(n_out, self.n_vocab)).argmax(axis=1).tolist()
