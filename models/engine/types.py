"""Errors, configuration, requests and the events the engine sends back.

Every other module of the engine and the server speaks in these types, so they depend
on nothing of the engine itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, Union

import numpy as np

from models.sampling import SamplingParams
from telemetry.record import RequestRecord


class EngineError(Exception):
    """A request the engine cannot serve; ``code`` is stable for API errors."""

    code = "engine_error"
    status = 500

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class QueueFull(EngineError):
    code = "queue_full"
    status = 429


class PromptTooLong(EngineError):
    code = "context_length_exceeded"
    status = 400


class EngineClosed(EngineError):
    code = "model_unloaded"
    status = 503


# How the context's KV cells are laid out among the slots.
# * shared: one pool; a request may use any free cell, up to the whole context, and
#   slots share the cells of a common prefix. Each sequence's attention spans every cell
#   up to the highest one in use, masked or not, so concurrent long streams pay for each
#   other's cells (4 streams of 750 cells: 2 to 10 % slower steps; of 1500: 11 to 13 %).
# * per-slot: each slot has its own n_ctx / n_parallel cells (llama-server's layout with
#   an explicit -np): attention spans only a sequence's own cells, but one request can
#   hold only its slot's share, and a shared prefix is copied, not shared.
KV_LAYOUTS = ("shared", "per-slot")


def kv_layout_problem(layout: str) -> str | None:
    """What is wrong with a KV layout name, or None: one rule for the engine and the registry."""
    if layout not in KV_LAYOUTS:
        return f"kv_layout must be one of {', '.join(KV_LAYOUTS)}, not {layout!r}"
    return None


# Most decode steps a running request's text may wait before it is handed over.
STREAM_INTERVAL_MAX = 64
# The default stream interval: decided per machine by ``resolve_stream_interval``.
STREAM_INTERVAL_AUTO = "auto"
# What "auto" hands over by when the model's compute threads take every usable CPU.
# Each hand-over then wakes the server and the client on cores llama.cpp computes on;
# measured on 2 cores (bench.stream_interval, one stream, paired with llama-server):
# every token 0.93-0.94, every 4th 0.97-1.09, the client's CPU per token a quarter. With
# a CPU to spare (1 compute thread on 2 CPUs) both decoded at 0.95: there every token
# goes out alone.
AUTO_STREAM_INTERVAL = 4


def stream_interval_problem(steps: object) -> str | None:
    """What is wrong with a stream interval, or None: one rule for the engine and the registry."""
    if steps == STREAM_INTERVAL_AUTO:
        return None
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= STREAM_INTERVAL_MAX:
        return (f"stream_interval must be {STREAM_INTERVAL_AUTO} or a whole number of decode steps "
                f"from 1 to {STREAM_INTERVAL_MAX}, not {steps!r}")
    return None


def resolve_stream_interval(steps: int | str, n_threads: int, usable_cpus: int) -> int:
    """The decode steps per hand-over a setting means on this machine.

    ``auto`` hands every token over alone while the model's compute threads leave a CPU
    for the server and the client, and every ``AUTO_STREAM_INTERVAL`` steps once they
    take every CPU (each hand-over then costs the model compute time). One rule for the
    engine, which applies it, and ``/health``, which shows it.
    """
    if steps == STREAM_INTERVAL_AUTO:
        return AUTO_STREAM_INTERVAL if n_threads >= usable_cpus else 1
    return int(steps)


@dataclass(frozen=True)
class EngineConfig:
    model_id: str
    path: str
    n_ctx: int = 4096
    n_threads: int = 0  # 0 = physical cores
    n_parallel: int = 0  # 0 = default_parallel()
    n_batch: int = 512
    chat_template: str | None = None  # overrides the GGUF's template
    mmproj_path: str | None = None
    repack: str = "auto"  # CPU fast paths: auto (self-tested) | on | off; see models.cpu_paths
    flash_attn: str = "auto"  # attention kernel: auto (timed) | on | off; see models.attention
    speculative: str = "off"  # off | ngram (prompt lookup) | draft; see models.engine.speculative
    draft_path: str | None = None  # the draft model of speculative "draft" (models.engine.draft)
    kv_layout: str = "shared"  # shared | per-slot; see KV_LAYOUTS
    # Hand running requests their text every N decode steps instead of every step (a
    # request's first text and its end go out at once), or "auto": see Engine._flush
    # and resolve_stream_interval.
    stream_interval: int | str = STREAM_INTERVAL_AUTO
    # Host RAM for the KV of prompts whose slot another request took (models.engine.prompt_cache); 0 = off.
    prompt_cache_mb: int = 256


@dataclass
class ImageSegment:
    """An image's (possibly pruned) embedding rows, prefilled in place of tokens.

    ``positions`` and ``n_pos`` matter only to M-RoPE models (Qwen2-VL family):
    ``positions`` is ``(4, n_tokens)`` int, each kept row's (t, y, x, z) position relative
    to the image's first position (``ImageChunk.positions``, indexed by the kept rows
    after pruning), and the image advances the sequence by ``n_pos`` positions
    (``max(nx, ny)`` of the *encoded* grid, pruned or not). Without ``positions`` an
    M-RoPE model gets consecutive positions in all four sections (mtmd-helper's
    ``set_position_mrope_1d``). 1-D RoPE models ignore both and number rows consecutively.
    """

    embeddings: np.ndarray  # (n_tokens, n_embd) float32, C-contiguous
    key: str  # identity for KV reuse: image hash + resolution + pruning
    non_causal: bool = False
    positions: np.ndarray | None = None  # (4, n_tokens) relative M-RoPE positions
    n_pos: int | None = None  # positions the image advances (M-RoPE); None -> derived

    @property
    def n_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def mrope_advance(self) -> int:
        """Positions this image occupies in an M-RoPE sequence."""
        if self.n_pos is not None:
            return int(self.n_pos)
        if self.positions is not None and self.positions.size:
            return int(self.positions[:3].max()) + 1
        return self.n_tokens


Segment = Union[list[int], ImageSegment]


def segment_tokens(segments: list[Segment]) -> int:
    """Prompt positions the segments take (image rows count one each)."""
    return sum(len(s) if isinstance(s, list) else s.n_tokens for s in segments)


@dataclass
class GenerationRequest:
    segments: list[Segment]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    speculative: bool = True  # may draft, when the engine's mode is not "off"
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass
class JobFigures:
    """What the engine measured for one request (times in milliseconds).

    The worker keeps these on the job and sends a copy in the request's ``Finished``
    or ``Failed`` event; the server copies them into the telemetry record on its own
    thread, so the worker never writes a record whose span the server may be ending.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from a reused KV prefix
    restored_tokens: int = 0  # KV tokens copied back from host RAM before reuse
    shared_tokens: int = 0  # prompt tokens whose KV another request's slot holds or computed
    prefilled_tokens: int = 0  # prompt tokens actually computed
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    slot: int | None = None
    batch_size_mean: float | None = None
    preemptions: int = 0
    drafted_tokens: int = 0  # tokens proposed by speculative decoding and verified
    accepted_tokens: int = 0  # of those, tokens the model agreed with (emitted at no extra step)
    runner_peak_rss_bytes: int | None = None  # set by a runner process: its own peak (the model's memory)

    def fill(self, record: RequestRecord) -> None:
        """Copy the figures into ``record``; preemptions go to its middleware, when any."""
        for f in fields(self):
            if f.name != "preemptions":
                setattr(record, f.name, getattr(self, f.name))
        if self.preemptions:
            record.middleware["engine.preemptions"] = self.preemptions


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled
    figures: JobFigures = field(default_factory=JobFigures)


@dataclass(frozen=True)
class Failed:
    error: Exception
    figures: JobFigures = field(default_factory=JobFigures)


Event = Union[TextDelta, Finished, Failed]
Sink = Callable[[Event], None]
