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
  process that loads it: a prompt is prefilled and a few single-token steps decoded at
  its end, once with flash attention and once without, and each is priced as one
  request (that prompt, and an answer a quarter of its length, at the measured step
  cost). Flash attention goes off only when the plain path saves at least ``MIN_GAIN``;
  otherwise llama.cpp keeps its own choice. The verdict is cached on disk beside the
  fast-path verdicts (``models.cpu_paths``), keyed by the CPU, the llama.cpp build, the
  model file, the threads and the fast paths, so later starts cost nothing. With
  layers offloaded to a GPU, ``auto`` is llama.cpp's choice untimed.
- ``on`` and ``off`` force it.

Both kernels compute the same attention; results differ only by summation order, like
the batched and one-token kernels do. The plain path keeps a KQ matrix of the whole
context per head while prefilling, so its compute buffer is larger (counted in the
model's memory).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from typing import Literal

import llama_cpp

from models import cpu_paths
from models.llama_lib import OneSequence

log = logging.getLogger("edgevlm.attention")

FlashAttnMode = Literal["auto", "on", "off"]
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
    """One kernel's probe: a prompt's prefill and a decode step at its end."""

    prompt_tokens: int
    prefill_ms: float
    step_ms: float

    def request_ms(self) -> float:
        """The probe's request: the prompt, and an answer ANSWER_SHARE of its length."""
        return self.prefill_ms + ANSWER_SHARE * self.prompt_tokens * self.step_ms


def decide(flash: KernelTiming, plain: KernelTiming) -> tuple[bool | None, str]:
    """Flash attention off (False) when the plain path prices the request MIN_GAIN
    cheaper, else llama.cpp's choice (None); and the figures that say why."""
    figures = (f"{flash.prompt_tokens}-token prompt prefilled in {flash.prefill_ms:.0f} ms with flash "
               f"attention, {plain.prefill_ms:.0f} ms without; a decode step {flash.step_ms:.1f} ms "
               f"vs {plain.step_ms:.1f} ms")
    gain = 1.0 - plain.request_ms() / flash.request_ms()
    if gain >= MIN_GAIN:
        return False, f"{figures}: a request costs {gain:.0%} less without"
    return None, f"{figures}: flash attention kept ({-gain:+.0%} without)"


def time_kernel(model: llama_cpp.llama_model_p, flash: bool, tokens: list[int], n_threads: int) -> KernelTiming:
    """Prefill ``tokens`` and decode PROBE_STEPS single tokens after them with one kernel."""
    n = len(tokens)
    with OneSequence(model, n_ctx=n + PROBE_STEPS + 8, n_batch=min(512, n), n_threads=n_threads,
                     flash_attn=flash) as seq:
        started = time.perf_counter()
        for at in range(0, n, seq.n_batch):
            if seq.decode(tokens[at:at + seq.n_batch], at, logits=False) != 0:
                raise RuntimeError("llama_decode failed")
        prefill_ms = (time.perf_counter() - started) * 1000.0
        steps = []
        for i in range(PROBE_STEPS):
            t0 = time.perf_counter()
            if seq.decode([tokens[i]], n + i) != 0:
                raise RuntimeError("llama_decode failed")
            steps.append((time.perf_counter() - t0) * 1000.0)
    return KernelTiming(n, prefill_ms, statistics.median(steps))


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
    n = max(PROBE_MIN_TOKENS, min(PROBE_MAX_TOKENS, n, n_train - PROBE_STEPS - 16))
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
