"""llama.cpp's attention kernel per model: flash attention or the plain path, by timing.

llama.cpp turns flash attention on wherever the backend offers it (``-fa auto``), and on
a GPU that is the right call. On a CPU it is a trade that goes either way by machine
(llama.cpp issue 27086 measured it costing 2x in prompt processing on Arm Neoverse and
helping on an Intel laptop). On a 2-vCPU Intel Xeon, the default model, one sequence
at 1,536 cells of context:

====================  ==========  ===========
                      flash on    flash off
====================  ==========  ===========
prefill (512 rows)    1.6-2.1 s   1.8-2.5 s
one decode step       32.5 ms     17.3 ms
====================  ==========  ===========

Decode at long context is twice as fast without it, prompt processing 10-15 % slower.
So nothing is assumed:

- ``auto`` (the default, CPU only) times both kernels on the model itself, in the
  process that loads it: a prompt is prefilled, and decode steps are timed at its end
  with one stream alone and with four streams in one shared pool (the prompt's cells
  copied into the other sequences with ``llama_state_seq_*``: no compute). Each kernel
  is priced as one request (that prompt, and an answer a quarter of its length) in both
  cases. Flash attention goes off only when the plain path saves at least ``MIN_GAIN``
  in both (a stream per slot attends over its own cells, as one alone does): the plain kernel
  computes attention over every cell of a shared pool, other sequences' masked cells
  included, where flash attention skips them, so a machine where it wins alone may lose
  with four streams in one pool (on a 2-vCPU AMD EPYC: one row at 700 cells 11.6 ms
  with flash attention and 17.6 ms without, beside three other 700-cell sequences).
  Otherwise llama.cpp keeps its own choice. One verdict per model and machine, whatever
  the layout or slots a server gives it, so every context of a model computes alike. It
  is cached on disk beside the fast-path verdicts (``models.cpu_paths``), keyed by the
  CPU, the llama.cpp build, the model file, the threads and the fast paths, so later
  starts cost nothing. With layers offloaded to a GPU, ``auto`` is llama.cpp's choice
  untimed.
- ``on`` and ``off`` force it.

Both kernels compute the same attention; results differ only by summation order, like
the batched and one-token kernels do. The plain path keeps a KQ matrix of the whole
context per head while prefilling, so its compute buffer is larger (counted in the
model's memory).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import llama_cpp
import numpy as np

from models import cpu_paths
from models.llama_lib import OneSequence, copy_seq_state, decode_rows, load_seq_state

FLASH_ATTN_MODES: tuple[str, ...] = ("auto", "on", "off")
# The plain path must price the probe's request this much cheaper to be chosen: a
# smaller difference is within what a shared machine's noise moves.
MIN_GAIN = 0.03
# Answer tokens per prompt token of the request the probe prices.
ANSWER_SHARE = 0.25
# What the probe's prefill may take per kernel, and the prompt lengths it may use: the
# difference grows with the context, so the probe prefills as long a prompt as this
# allows (the default model on 2 vCPUs: about 512 tokens).
PROBE_PREFILL_MS = 2000.0
PROBE_MIN_TOKENS = 128
PROBE_MAX_TOKENS = 1024
PROBE_CHUNK = 64
PROBE_STEPS = 8
# Streams the probe decodes together (a server's default slots).
PROBE_SEQS = 4


@dataclass(frozen=True)
class AttentionVerdict:
    """Whether a model's context uses flash attention, and why."""

    mode: str
    flash: bool | None  # None: llama.cpp's own choice (``-fa auto``)
    reason: str
    seconds: float = 0.0  # what the probe cost (0 when cached or not run)
    cached: bool = False

    @property
    def flash_attn_type(self) -> int:
        """The ``llama_context_params.flash_attn_type`` value."""
        if self.flash is None:
            return llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
        return llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.flash else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED

    def describe(self) -> str:
        """One log line: what was chosen and why."""
        chosen = {None: "llama.cpp's choice", True: "flash attention", False: "plain (flash attention off)"}[self.flash]
        how = "cached verdict" if self.cached else (f"probe {self.seconds:.1f} s" if self.seconds else self.mode)
        return f"attention: {chosen}: {self.reason} ({how})"


# The shapes a decode step is timed in: one stream alone, and PROBE_SEQS streams in one
# shared pool. A stream per slot attends over its own cells only, as one alone does.
# (A state copied out of a shared pool does not load into a context of one stream per
# slot, so timing that shape too would cost a second prefill.)
SHAPES = ("alone", "shared pool")


@dataclass(frozen=True)
class KernelTiming:
    """One kernel's probe: a prompt's prefill, and the median decode step at its end in
    each of SHAPES (one row per stream)."""

    prompt_tokens: int
    prefill_ms: float
    step_ms: dict[str, float]

    def request_ms(self, shape: str) -> float:
        """The probe's request (the prompt, an answer ANSWER_SHARE of its length), its
        steps shared with the other streams of ``shape``."""
        streams = 1 if shape == "alone" else PROBE_SEQS
        return self.prefill_ms + ANSWER_SHARE * self.prompt_tokens * self.step_ms[shape] / streams


def decide(flash: KernelTiming, plain: KernelTiming) -> tuple[bool | None, str]:
    """Flash attention off (False) when the plain path prices the request MIN_GAIN
    cheaper in every shape, else llama.cpp's choice (None); and the figures that say why."""
    steps = ", ".join(f"{shape} {flash.step_ms[shape]:.1f} vs {plain.step_ms[shape]:.1f} ms" for shape in SHAPES)
    figures = (f"{flash.prompt_tokens}-token prompt prefilled in {flash.prefill_ms:.0f} ms with flash "
               f"attention, {plain.prefill_ms:.0f} ms without; a decode step {steps}")
    gain = min(1.0 - plain.request_ms(shape) / flash.request_ms(shape) for shape in SHAPES)
    if gain >= MIN_GAIN:
        return False, f"{figures}: a request costs {gain:.0%} less without"
    return None, f"{figures}: flash attention kept ({-gain:+.0%} without)"


class _ProbeContext:
    """A shared pool of PROBE_SEQS sequences with one kernel, and its batch."""

    def __init__(self, model: llama_cpp.llama_model_p, flash: bool, n_ctx_seq: int, n_threads: int) -> None:
        cparams = llama_cpp.llama_context_default_params()
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.n_ctx = n_ctx_seq * PROBE_SEQS
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = PROBE_SEQS
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise RuntimeError(f"could not create a probe context of {cparams.n_ctx} tokens")
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)

    def decode(self, rows: list[tuple[int, int, int]], logits: bool) -> float:
        """Decode (sequence, position, token) rows; the ms it took."""
        t0 = time.perf_counter()
        if decode_rows(self.ctx, self.batch, [(tok, pos, seq, logits) for seq, pos, tok in rows]) != 0:
            raise RuntimeError("llama_decode failed")
        return (time.perf_counter() - t0) * 1000.0

    def copy_out(self, seq: int) -> np.ndarray:
        """Sequence ``seq``'s cells as a state blob."""
        blob = copy_seq_state(self.ctx, seq)
        if blob is None:
            raise RuntimeError("could not copy a sequence out")
        return blob

    def copy_in(self, blob: np.ndarray, seqs: range) -> None:
        """Give each of ``seqs`` cells of its own holding ``blob`` (a copy: no compute)."""
        if not all(load_seq_state(self.ctx, blob, seq) for seq in seqs):
            raise RuntimeError("could not copy a sequence in")

    def steps(self, starts: list[tuple[int, int]], tokens: list[int]) -> float:
        """Median ms of PROBE_STEPS steps of one row per (sequence, first position)."""
        return statistics.median(self.decode([(seq, at + i, tokens[i]) for seq, at in starts], True)
                                 for i in range(PROBE_STEPS))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def time_kernel(model: llama_cpp.llama_model_p, flash: bool, tokens: list[int], n_threads: int) -> KernelTiming:
    """Prefill ``tokens`` into a shared pool and time one stream's steps there; copy it
    into the pool's other sequences and time all of them stepping."""
    n = len(tokens)
    step: dict[str, float] = {}
    pool = _ProbeContext(model, flash, n + 2 * PROBE_STEPS + 8, n_threads)
    try:
        prefill_ms = sum(pool.decode([(0, at + i, t) for i, t in enumerate(tokens[at:at + 512])], False)
                         for at in range(0, n, 512))
        blob = pool.copy_out(0)  # the prompt alone, before its steps
        step["alone"] = pool.steps([(0, n)], tokens)
        pool.copy_in(blob, range(1, PROBE_SEQS))
        # sequence 0 is PROBE_STEPS ahead; the others step from the prompt's end
        step["shared pool"] = pool.steps([(0, n + PROBE_STEPS)] + [(seq, n) for seq in range(1, PROBE_SEQS)], tokens)
    finally:
        pool.close()
    return KernelTiming(n, prefill_ms, step)


def probe(model: llama_cpp.llama_model_p, n_threads: int) -> tuple[KernelTiming, KernelTiming]:
    """Time both kernels on a prompt as long as PROBE_PREFILL_MS allows (flash first)."""
    n_train = int(llama_cpp.llama_model_n_ctx_train(model))
    first = cpu_paths.selftest_tokens(model, PROBE_CHUNK)
    with OneSequence(model, n_ctx=PROBE_CHUNK + 8, n_batch=PROBE_CHUNK, n_threads=n_threads) as seq:
        seq.decode(first, 0, logits=False)  # warm: weights paged in, threads up
        seq.clear()
        t0 = time.perf_counter()
        seq.decode(first, 0, logits=False)
        chunk_ms = max((time.perf_counter() - t0) * 1000.0, 1e-3)
    n = int(PROBE_PREFILL_MS / chunk_ms) * PROBE_CHUNK
    n = max(PROBE_MIN_TOKENS, min(PROBE_MAX_TOKENS, n, n_train - 2 * PROBE_STEPS - 16))
    tokens = cpu_paths.selftest_tokens(model, n)
    return time_kernel(model, True, tokens, n_threads), time_kernel(model, False, tokens, n_threads)


def choose(model: llama_cpp.llama_model_p, path: str, mode: str, n_threads: int,
           fast_paths: tuple[str, ...] | None, *, gpu: bool, use_cache: bool = True) -> AttentionVerdict:
    """Decide whether ``model`` (loaded from ``path`` with ``fast_paths``) uses flash
    attention on this machine (see the module docstring)."""
    if mode not in FLASH_ATTN_MODES:
        raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}, not {mode!r}")
    if mode == "on":
        return AttentionVerdict(mode, True, "turned on (flash-attn on)")
    if mode == "off":
        return AttentionVerdict(mode, False, "turned off (flash-attn off)")
    if gpu:
        return AttentionVerdict(mode, None, "layers offloaded to a GPU: not timed")
    file = cpu_paths.cache_dir() / "attention.json"
    key = cpu_paths.machine_key(path, n_threads, fast_paths=list(fast_paths) if fast_paths is not None else None)
    if use_cache:
        hit = cpu_paths.read_verdicts(file).get(key)
        if hit is not None:
            return AttentionVerdict(mode, hit["flash"], hit["reason"], cached=True)
    started = time.monotonic()
    flash, plain = probe(model, n_threads)
    choice, reason = decide(flash, plain)
    verdict = AttentionVerdict(mode, choice, reason, seconds=time.monotonic() - started)
    if use_cache:
        cpu_paths.write_verdict(file, key, {"flash": choice, "reason": reason, "checked_at": time.time()})
    return verdict
