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
  process that loads it and in the context layout it will serve with: a prompt is
  prefilled and copied into every other slot's sequence (``llama_state_seq_*``, no
  compute), then decode steps are timed at its end, one stream alone and all slots at
  once. Each kernel is priced as one request (that prompt, and an answer a quarter of
  its length) in both cases. Flash attention goes off only when the plain path saves at
  least ``MIN_GAIN`` in both: the plain kernel computes attention over every cell of a
  shared pool, other sequences' masked cells included, where flash attention skips
  them, so a machine where it wins alone may lose with four streams in one pool (on a
  2-vCPU AMD EPYC: one row at 700 cells 11.6 ms with flash attention and 17.6 ms
  without, beside three other 700-cell sequences). Otherwise llama.cpp keeps its own
  choice. The verdict is cached on disk beside the fast-path verdicts
  (``models.cpu_paths``), keyed by the CPU, the llama.cpp build, the model file, the
  threads, the fast paths and the layout, so later starts cost nothing. With layers
  offloaded to a GPU, ``auto`` is llama.cpp's choice untimed.
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
from models.llama_lib import OneSequence, bytes_ptr, decode_rows

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
# Slots the probe fills (a server's default is 4; more only repeats what 4 show).
PROBE_MAX_SEQS = 4


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


@dataclass(frozen=True)
class KernelTiming:
    """One kernel's probe: a prompt's prefill, and a decode step at its end with one
    stream (``step_ms``) and with every slot's stream at once (``all_step_ms``)."""

    prompt_tokens: int
    prefill_ms: float
    step_ms: float
    n_seqs: int = 1
    all_step_ms: float = 0.0

    def request_ms(self, concurrent: bool = False) -> float:
        """The probe's request (the prompt, an answer ANSWER_SHARE of its length), alone or
        as one of ``n_seqs`` decoding together (a step's time shared among them)."""
        step = self.all_step_ms / self.n_seqs if concurrent else self.step_ms
        return self.prefill_ms + ANSWER_SHARE * self.prompt_tokens * step


def decide(flash: KernelTiming, plain: KernelTiming) -> tuple[bool | None, str]:
    """Flash attention off (False) when the plain path prices the request MIN_GAIN
    cheaper alone and among all slots, else llama.cpp's choice (None); and the figures
    that say why."""
    figures = (f"{flash.prompt_tokens}-token prompt prefilled in {flash.prefill_ms:.0f} ms with flash "
               f"attention, {plain.prefill_ms:.0f} ms without; a decode step {flash.step_ms:.1f} ms "
               f"vs {plain.step_ms:.1f} ms")
    gains = [1.0 - plain.request_ms() / flash.request_ms()]
    if flash.n_seqs > 1:
        figures += f", {flash.n_seqs} streams {flash.all_step_ms:.1f} ms vs {plain.all_step_ms:.1f} ms"
        gains.append(1.0 - plain.request_ms(True) / flash.request_ms(True))
    gain = min(gains)
    if gain >= MIN_GAIN:
        return False, f"{figures}: a request costs {gain:.0%} less without"
    return None, f"{figures}: flash attention kept ({-gain:+.0%} without)"


class _ProbeContext:
    """A context shaped like the engine's (slots, layout) with one kernel, and its batch."""

    def __init__(self, model: llama_cpp.llama_model_p, flash: bool, n_seqs: int, per_slot: bool,
                 n_ctx_seq: int, n_threads: int) -> None:
        cparams = llama_cpp.llama_context_default_params()
        cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash
                                   else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.n_ctx = n_ctx_seq * n_seqs
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = n_seqs
        cparams.kv_unified = n_seqs > 1 and not per_slot
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

    def clone(self, src: int, dst: int) -> None:
        """Copy ``src``'s cells into sequence ``dst`` (its own cells: no compute)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, src)
        blob = np.empty(size, dtype=np.uint8)
        llama_cpp.llama_state_seq_get_data(self.ctx, bytes_ptr(blob), size, src)
        if llama_cpp.llama_state_seq_set_data(self.ctx, bytes_ptr(blob), size, dst) != size:
            raise RuntimeError("could not copy a sequence")

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def time_kernel(model: llama_cpp.llama_model_p, flash: bool, tokens: list[int], n_threads: int,
                n_seqs: int = 1, per_slot: bool = False) -> KernelTiming:
    """Prefill ``tokens`` into sequence 0 and copy it to the others, then time PROBE_STEPS
    one-row steps of sequence 0 and PROBE_STEPS steps of a row per sequence."""
    n = len(tokens)
    probe = _ProbeContext(model, flash, n_seqs, per_slot, n + 2 * PROBE_STEPS + 8, n_threads)
    try:
        prefill_ms = 0.0
        for at in range(0, n, 512):
            prefill_ms += probe.decode([(0, at + i, t) for i, t in enumerate(tokens[at:at + 512])], False)
        for seq in range(1, n_seqs):
            probe.clone(0, seq)
        one = [probe.decode([(0, n + i, tokens[i])], True) for i in range(PROBE_STEPS)]
        # then every sequence steps together, each at its own next position
        all_ = [probe.decode([(s, n + (PROBE_STEPS if s == 0 else 0) + i, tokens[i]) for s in range(n_seqs)], True)
                for i in range(PROBE_STEPS)] if n_seqs > 1 else []
    finally:
        probe.close()
    return KernelTiming(n, prefill_ms, statistics.median(one), n_seqs, statistics.median(all_) if all_ else 0.0)


def probe(model: llama_cpp.llama_model_p, n_threads: int, n_seqs: int = 1,
          per_slot: bool = False) -> tuple[KernelTiming, KernelTiming]:
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
    seqs = max(1, min(PROBE_MAX_SEQS, n_seqs))
    return (time_kernel(model, True, tokens, n_threads, seqs, per_slot),
            time_kernel(model, False, tokens, n_threads, seqs, per_slot))


def choose(model: llama_cpp.llama_model_p, path: str, mode: str, n_threads: int,
           fast_paths: tuple[str, ...] | None, *, gpu: bool, n_seqs: int = 1, per_slot: bool = False,
           use_cache: bool = True) -> AttentionVerdict:
    """Decide whether ``model`` (loaded from ``path`` with ``fast_paths``), served with
    ``n_seqs`` slots in one pool or a stream each (``per_slot``), uses flash attention on
    this machine (see the module docstring)."""
    if mode not in FLASH_ATTN_MODES:
        raise ValueError(f"flash_attn must be one of {', '.join(FLASH_ATTN_MODES)}, not {mode!r}")
    if mode == "on":
        return AttentionVerdict(mode, True, "turned on (flash-attn on)")
    if mode == "off":
        return AttentionVerdict(mode, False, "turned off (flash-attn off)")
    if gpu:
        return AttentionVerdict(mode, None, "layers offloaded to a GPU: not timed")
    file = cpu_paths.cache_dir() / "attention.json"
    seqs = max(1, min(PROBE_MAX_SEQS, n_seqs))
    key = cpu_paths.machine_key(path, n_threads, fast_paths=list(fast_paths) if fast_paths is not None else None,
                                attention_probe={"seqs": seqs, "per_slot": per_slot and seqs > 1})
    if use_cache:
        hit = cpu_paths.read_verdicts(file).get(key)
        if hit is not None:
            return AttentionVerdict(mode, hit["flash"], hit["reason"], cached=True)
    started = time.monotonic()
    flash, plain = probe(model, n_threads, seqs, per_slot)
    choice, reason = decide(flash, plain)
    verdict = AttentionVerdict(mode, choice, reason, seconds=time.monotonic() - started)
    if use_cache:
        cpu_paths.write_verdict(file, key, {"flash": choice, "reason": reason, "checked_at": time.time()})
    return verdict
