"""A continuous-batching llama.cpp engine that owns the prefill/decode loop.

One worker thread per loaded model drives one llama.cpp context holding ``n_parallel``
sequences over a unified KV cache. Every step runs a single ``llama_decode`` over the
next token of every generating sequence plus a chunk of any prompt still being
prefilled, so concurrent requests share the matrix multiplications instead of taking
turns, and a long prompt never stalls running streams for more than one chunk. Each
slot remembers what its KV holds, so a request that repeats a prompt prefix held by
any slot (the next turn of a chat, a shared system prompt, the same photo) prefills
only what is new, and requests that start together prefill their common prefix once;
shared cells are counted once when deciding what fits. Before a long prompt
prefills, idle slots' KV moves to host RAM so the prompt attends over its own cells
only; it comes back on that conversation's next turn. Running requests are never
interrupted by new ones.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import itertools
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterable, Iterator, Union

import llama_cpp
import numpy as np
import psutil

from models import cpu_info, cpu_paths, gguf_info
from models.llama_lib import ensure_backend, meta_str
from models.sampling import SamplingParams, build_sampler
from models.templates import CHATML_TEMPLATE, ChatTemplate
from telemetry.record import ModelInfo, RequestRecord

log = logging.getLogger("edgevlm.engine")

# Cells of KV reserved for a request's generation when admitting it, so a new prompt
# does not take the room a running stream is about to need.
GENERATION_RESERVE = 256
# Prompt tokens prefilled per step while other sequences are decoding: bounds how long
# a new long prompt can delay the next token of running streams.
PREFILL_CHUNK_WHILE_DECODING = 256
# Longest an idle engine holds its first step for requests the server is still
# preparing, so a burst prefills in one step (long enough for a text prompt's template
# and tokenizer, short next to an image encode it would otherwise wait out).
ARRIVAL_WAIT_S = 0.015
# A prompt at least this long first moves idle slots' KV to host RAM. In the shared pool
# their cells sit among the new prompt's, so flash attention cannot skip them as masked
# tiles: a 600-token prefill beside three idle chats ran ~12% slower. Parked KV costs a
# copy out and, on its next prefix hit, a copy back.
PARK_MIN_PREFILL = 256


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
    record: RequestRecord
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    arrival: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Union[TextDelta, Finished, Failed]
Sink = Callable[[Event], None]


class _TextStream:
    """Incremental UTF-8 decoding with stop strings that may straddle tokens."""

    def __init__(self, stops: tuple[str, ...]):
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = ""
        self._stops = tuple(s for s in stops if s)
        self.text_parts: list[str] = []

    def push(self, data: bytes) -> tuple[str, bool]:
        self._pending += self._decoder.decode(data)
        if not self._stops:
            out, self._pending = self._pending, ""
            return self._emit(out), False
        cut = min((i for i in (self._pending.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self._pending = self._pending[:cut], ""
            return self._emit(out), True
        hold = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        return self._emit(out), False

    def flush(self) -> str:
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return self._emit(out)

    def _emit(self, text: str) -> str:
        if text:
            self.text_parts.append(text)
        return text


class Job:
    """A submitted request; ``cancel()`` is safe from any thread."""

    def __init__(self, req: GenerationRequest, sink: Sink):
        self.req = req
        self.sink = sink
        self._cancel = threading.Event()
        self.items: list[Hashable] = []
        self.seg_bounds: list[tuple[int, int, Segment]] = []
        for seg in req.segments:
            start = len(self.items)
            if isinstance(seg, ImageSegment):
                self.items.extend((seg.key, i) for i in range(seg.n_tokens))
            else:
                self.items.extend(seg)
            self.seg_bounds.append((start, len(self.items), seg))
        self.prompt_items = list(self.items)
        self.prompt_bounds = list(self.seg_bounds)
        self.generated: list[int] = []  # sampled tokens already decoded into the KV
        self.sampled: list[int] = []  # every token sampled for the output, in order
        self.preempted_at: list[int] = []  # len(sampled) at each preemption
        self.slot: _Slot | None = None
        self.cursor = 0  # next prompt item to prefill
        # A request that starts beside another with the same next prompt tokens prefills
        # them jointly: the leader's batch rows carry both sequence ids up to ``lead_end``.
        self.lead: Job | None = None
        self.lead_end = 0
        self.followers: list[Job] = []
        self.sampler: llama_cpp.llama_sampler_p | None = None
        self.next_token: int | None = None
        self.n_generated = 0
        self.text = _TextStream(req.stop)
        self.t_submit = time.perf_counter()
        self.t_admit = 0.0
        self.t_first = 0.0
        self.t_last = 0.0
        self.batch_sum = 0
        self.batch_steps = 0
        self.done = False

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def n_prompt(self) -> int:
        return len(self.items)

    @property
    def reserve(self) -> int:
        """Room kept for its next tokens (up to GENERATION_RESERVE)."""
        return min(max(1, self.req.max_tokens - self.n_generated), GENERATION_RESERVE)

    @property
    def kv_budget(self) -> int:
        """KV cells this job holds once prefilled plus room for its next tokens."""
        return len(self.prompt_items) + len(self.generated) + self.reserve

    @property
    def resuming(self) -> bool:
        """Re-prefilling after preemption: the next token is already sampled."""
        return self.next_token is not None and self.cursor < self.n_prompt

    def requeue(self) -> None:
        """Forget the KV; on re-admission prefill prompt + generated tokens, then go on."""
        self.items = self.prompt_items + self.generated
        self.seg_bounds = list(self.prompt_bounds)
        if self.generated:
            self.seg_bounds.append((len(self.prompt_items), len(self.items), list(self.generated)))
        self.cursor = 0
        self.slot = None
        self.preempted_at.append(len(self.sampled))

    @property
    def preemptions(self) -> int:
        return len(self.preempted_at)

    def segment_at(self, pos: int) -> tuple[int, int, Segment]:
        for bound in self.seg_bounds:
            if bound[0] <= pos < bound[1]:
                return bound
        raise IndexError(pos)


@dataclass
class _Slot:
    seq_id: int
    history: list[Hashable] = field(default_factory=list)  # what this sequence's KV holds
    job: Job | None = None
    last_used: float = 0.0
    # Position of history item i is i + (shift in force at i). Always 0 for 1-D RoPE
    # models; an M-RoPE image advances the position by its n_pos, not its row count, so
    # each finished image appends (history index after it, new shift) to ``marks``.
    shift: int = 0
    marks: list[tuple[int, int]] = field(default_factory=list)
    # The KV of ``history`` (llama.cpp's sequence state) while it is out of the pool.
    parked: np.ndarray | None = None
    # Where the last request's prompt ended in ``history``: a prompt that extends past it
    # is that conversation's next turn (its reply may re-tokenize differently).
    prompt_end: int = 0
    # Which physical cells hold ``history``, for counting cells that several slots share:
    # ``runs`` are (run, start, end) spans of history lying in cells of ``run``; from
    # ``run_end`` on, history lies in the cells of ``tail``, the run this slot appends
    # to (a follower's tail is its leader's while they prefill jointly).
    runs: list[tuple[int, int, int]] = field(default_factory=list)
    run_end: int = 0
    tail: int = 0
    run_ids: Iterator[int] = field(default_factory=itertools.count, repr=False)

    def __post_init__(self) -> None:
        self.tail = next(self.run_ids)

    @property
    def spans(self) -> list[tuple[int, int, int]]:
        """(run, start, end) of every history span in the pool; none while parked."""
        if self.parked is not None:
            return []
        if len(self.history) > self.run_end:
            return self.runs + [(self.tail, self.run_end, len(self.history))]
        return self.runs

    def seal(self, tail: int | None = None) -> None:
        """Close the span appended so far; what follows lies in run ``tail`` (a new one)."""
        if len(self.history) > self.run_end:
            self.runs.append((self.tail, self.run_end, len(self.history)))
            self.run_end = len(self.history)
        self.tail = next(self.run_ids) if tail is None else tail

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` history items (and the position shifts that apply to them)."""
        assert self.parked is None or n == 0, "restore a parked slot before truncating it"
        self.parked = None
        self.seal()  # cells after n are freed; what comes next lies in new cells
        self.runs = [(r, a, min(b, n)) for r, a, b in self.runs if a < n]
        self.run_end = min(self.run_end, n)
        self.history = self.history[:n] if n else []
        self.prompt_end = min(self.prompt_end, n)
        marks = self.marks
        while marks and marks[-1][0] > n:
            marks.pop()
        self.shift = marks[-1][1] if marks else 0

    def borrow(self, source: "_Slot", start: int, end: int) -> None:
        """Take ``source``'s cells of history ``[start, end)`` (after this slot's first ``start``)."""
        self.seal()
        self.runs += [(r, max(a, start), min(b, end)) for r, a, b in source.spans if a < end and b > start]
        self.history.extend(source.history[start:end])
        self.run_end = end
        self.marks = [m for m in source.marks if m[0] <= end]
        self.shift = self.marks[-1][1] if self.marks else 0

    def refill(self) -> None:
        """The whole history came back into new cells (a parked cache restored)."""
        self.parked = None
        self.runs, self.run_end = [], 0
        self.tail = next(self.run_ids)

    def pos_at(self, i: int) -> int:
        """Position of history item ``i`` (valid for ``i <= len(history)``)."""
        shift = 0
        for start, value in self.marks:
            if start > i:
                break
            shift = value
        return i + shift


def pool_cells(slots: Iterable[_Slot]) -> int:
    """Distinct KV cells the slots' histories occupy: shared cells count once."""
    by_run: dict[int, list[tuple[int, int]]] = {}
    for slot in slots:
        for run, a, b in slot.spans:
            by_run.setdefault(run, []).append((a, b))
    total = 0
    for spans in by_run.values():
        spans.sort()
        lo, hi = spans[0]
        for a, b in spans[1:]:
            if a > hi:
                total += hi - lo
                lo = a
            hi = max(hi, b)
        total += hi - lo
    return total


def _bytes_ptr(buf: np.ndarray) -> ctypes._Pointer:
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def _common_prefix(a: list[Hashable], b: list[Hashable]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Engine:
    """One model, one context, ``n_parallel`` sequences, one worker thread."""

    def __init__(self, config: EngineConfig):
        ensure_backend()
        self.config = config
        rss_before = psutil.Process().memory_info().rss
        n_threads = config.n_threads or default_threads()
        self.fast_paths = _choose_fast_paths(config, n_threads)
        log.info("model %s: %s", config.model_id, self.fast_paths.describe())
        warning = cpu_info.threads_warning(n_threads)
        if warning:
            log.warning("model %s: %s", config.model_id, warning)
        model = cpu_paths.load_model(config.path, self.fast_paths.allowed,
                                     gpu_layers=0 if os.environ.get("EDGEVLM_CPU_ONLY") else 999)
        if not model:
            raise EngineError(f"could not load model file {config.path}", code="model_load_failed")
        self.model = model
        self.ctx = None
        self._batch = self._embd_batch = None
        self._embd_pos_orig = None
        try:
            self._init_context(config, rss_before)
        except BaseException as exc:
            self._free_native()
            if isinstance(exc, EngineError):
                raise
            raise EngineError(f"could not set up model {config.model_id}: {exc}",
                              code="model_load_failed") from exc
        self._thread = threading.Thread(target=self._run, name=f"engine-{config.model_id}", daemon=True)
        self._thread.start()

    def _init_context(self, config: EngineConfig, rss_before: int) -> None:
        """Context, template, batches and slots; any failure is cleaned up by the caller."""
        model = self.model
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        n_threads = config.n_threads or default_threads()  # as chosen in __init__
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        n_ctx = config.n_ctx or min(n_ctx_train, 4096)
        n_batch = max(32, min(config.n_batch, n_ctx))
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = config.n_parallel if config.n_parallel > 0 else default_parallel()
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        # One shared KV pool across slots, so a long prompt may use any free cell instead
        # of a fixed 1/n share; a single slot needs no sharing.
        cparams.kv_unified = cparams.n_seq_max > 1
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise EngineError(f"could not create a context of {n_ctx} tokens", code="context_failed")
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_batch = n_batch
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
        self.n_threads = n_threads
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.template = ChatTemplate(
            config.chat_template or meta_str(model, "tokenizer.chat_template") or CHATML_TEMPLATE,
            bos_token=self.token_text(self.bos_id),
            eos_token=self.token_text(int(llama_cpp.llama_vocab_eos(self.vocab))),
        )
        self.info = ModelInfo(
            model_id=config.model_id,
            path=config.path,
            mmproj_path=config.mmproj_path,
            quantization=gguf_info.quantization_name(model),
            bits_per_weight=gguf_info.bits_per_weight(model),
            n_params=int(llama_cpp.llama_model_n_params(model)),
            file_bytes=gguf_info.file_bytes(config.path),
            n_ctx=self.n_ctx,
            n_threads=n_threads,
            n_parallel=cparams.n_seq_max,
        )
        # Token rows may belong to every slot at once (a prefix prefilled jointly).
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, cparams.n_seq_max)
        self._embd_batch = llama_cpp.llama_batch_init(n_batch, self.n_embd, 1)
        # M-RoPE (Qwen2-VL family): embedding batches carry 4 positions per row, laid out
        # section-major (pos[j * n_tokens + i]); llama_batch_init allocates only one per
        # row, so the embedding batch points at our own array (restored before freeing).
        # Token batches keep one position: llama.cpp broadcasts it to all sections.
        rope = int(llama_cpp.llama_model_rope_type(model))
        mrope_types = {llama_cpp.LLAMA_ROPE_TYPE_MROPE, getattr(llama_cpp, "LLAMA_ROPE_TYPE_IMROPE", -1)}
        self.mrope = rope in mrope_types
        self._mrope_pos = None
        if self.mrope:
            self._mrope_pos = (llama_cpp.llama_pos * (4 * n_batch))()
            # The address, not the field object: a ctypes pointer read from a Structure
            # is a view of the field and would follow the reassignment below.
            self._embd_pos_orig = ctypes.cast(self._embd_batch.pos, ctypes.c_void_p).value
            self._embd_batch.pos = ctypes.cast(self._mrope_pos, ctypes.POINTER(llama_cpp.llama_pos))
        run_ids = itertools.count()  # one numbering for every slot's cell runs
        self._slots = [_Slot(seq_id=i, run_ids=run_ids) for i in range(cparams.n_seq_max)]
        self._waiting: deque[Job] = deque()
        self._outbox: list[tuple[Sink, Event]] = []  # events waiting for the next flush
        self._cond = threading.Condition()
        self._closing = False
        self._active = 0
        self._preparing = 0  # requests the server is still preparing for this engine
        # Each generated token's text, looked up once per token id: a ctypes call and a
        # buffer per token is a measurable share of a decode step's Python work.
        self._pieces: dict[int, bytes] = {}
        self._logit_views: dict[tuple[int | None, int], np.ndarray] = {}
        self._load_bytes = max(psutil.Process().memory_info().rss - rss_before,
                               int(llama_cpp.llama_model_size(model)))

    @property
    def memory_bytes(self) -> int:
        """What loading took (weights, KV pool, buffers) plus KV parked in host RAM."""
        parked = [s.parked for s in self._slots]  # read once: the worker may drop one meanwhile
        return self._load_bytes + sum(p.nbytes for p in parked if p is not None)

    # ----------------------------------------------------------- tokenizer
    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize with special tokens parsed; drops a BOS the template already wrote."""
        data = text.encode("utf-8")
        add = add_special and self.add_bos
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add, True)
        if n < 0:
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, n_max, add, True)
        tokens = list(buf[:n])
        if add and len(tokens) > 1 and tokens[0] == self.bos_id and tokens[1] == self.bos_id:
            tokens.pop(0)
        return tokens

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        if not special:
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self._token_piece(token, special=False)
            return piece
        return self._token_piece(token, special=True)

    def _token_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)  # per call: the worker and request threads both use this
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # ----------------------------------------------------------- front door
    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._active

    @property
    def busy(self) -> bool:
        return bool(self._waiting) or self._active > 0

    def submit(self, req: GenerationRequest, sink: Sink, *, max_queue: int) -> Job:
        """Queue a request; raises at once rather than accept what it cannot serve."""
        job = Job(req, sink)
        if job.n_prompt == 0:
            raise EngineError("the prompt is empty", code="empty_prompt", status=400)
        if job.n_prompt >= self.n_ctx:
            raise PromptTooLong(
                f"this model's context is {self.n_ctx} tokens, but the prompt has "
                f"{job.n_prompt} tokens; shorten the messages or raise --ctx-size"
            )
        for seg in req.segments:
            if isinstance(seg, ImageSegment):
                if seg.embeddings.ndim != 2 or seg.embeddings.shape[1] != self.n_embd:
                    raise EngineError("image embeddings do not match the model width",
                                      code="bad_embeddings", status=400)
                if self.mrope and seg.positions is not None:
                    p = seg.positions
                    if p.ndim != 2 or p.shape != (4, seg.n_tokens) or not np.issubdtype(p.dtype, np.integer):
                        raise EngineError("image positions must be an int (4, n_tokens) array",
                                          code="bad_positions", status=400)
                    if p.size and (int(p.min()) < 0 or int(p[:3].max()) >= seg.mrope_advance):
                        raise EngineError("image positions fall outside the image's n_pos",
                                          code="bad_positions", status=400)
                if self.mrope and seg.mrope_advance < 1:
                    raise EngineError("an image must advance at least one position",
                                      code="bad_positions", status=400)
                if seg.non_causal and seg.n_tokens > self.n_batch:
                    raise EngineError(
                        f"an image of {seg.n_tokens} tokens needs a batch of at least that size "
                        f"(batch is {self.n_batch})", code="image_too_large", status=400)
        with self._cond:
            if self._closing or not self._thread.is_alive():
                raise EngineClosed("the model is being unloaded")
            # Jobs beyond the free slots are the real queue (they may also wait for KV room).
            free_slots = max(0, len(self._slots) - self._active)
            if len(self._waiting) - free_slots >= max_queue:
                raise QueueFull(f"the queue for model {self.config.model_id} is full "
                                f"({max_queue} waiting)")
            self._waiting.append(job)
            self._cond.notify()
        return job

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """Mark a request being prepared (template, images) for this engine until it is submitted.

        An idle engine holds its first step (at most ``ARRIVAL_WAIT_S``) while any are
        marked, so requests that arrive together prefill in one step instead of the
        first prompt running alone while the rest wait for it. Submit inside the block.
        """
        with self._cond:
            self._preparing += 1
        try:
            yield
        finally:
            with self._cond:
                self._preparing -= 1
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            log.error("engine thread for %s did not stop; leaking its context", self.config.model_id)
            return
        self._free_native()

    def _free_native(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._embd_batch is not None:
            if self._embd_pos_orig is not None:
                # free() what llama_batch_init allocated, not our ctypes array
                self._embd_batch.pos = ctypes.cast(self._embd_pos_orig, ctypes.POINTER(llama_cpp.llama_pos))
            llama_cpp.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    # ----------------------------------------------------------- worker
    def _emit(self, job: Job, event: Event) -> None:
        self._outbox.append((job.sink, event))

    def _flush(self) -> None:
        """Hand queued events to their requests.

        Called just before each ``llama_decode`` (which releases the GIL), so the event
        loop formats and sends the previous step's tokens while the next step computes,
        instead of contending with this thread for the GIL between steps.
        """
        if self._outbox:
            out, self._outbox = self._outbox, []
            for sink, event in out:
                try:
                    sink(event)
                except Exception:  # e.g. the request's event loop is gone; others still get theirs
                    log.warning("could not deliver an engine event", exc_info=True)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException:
            log.exception("engine worker for %s stopped", self.config.model_id)
            with self._cond:
                self._closing = True
                pending = list(self._waiting) + [s.job for s in self._slots if s.job is not None]
                self._waiting.clear()
            for job in pending:
                self._finish(job, error=EngineError("the inference worker stopped", code="engine_failed"))
            self._flush()

    def _loop(self) -> None:
        running: list[Job] = []
        while True:
            if not running:
                self._flush()
            with self._cond:
                while not self._closing and not self._waiting and not running:
                    self._cond.wait()
                if not running:
                    self._await_arrivals_locked()
                if self._closing:
                    pending = list(self._waiting) + running
                    self._waiting.clear()
                    break
                admitted = self._admit_locked(running)
            # Trim the caches that stay in the pool before copying parked ones back, so the
            # restored cells fill the holes just freed: llama.cpp attends over every cell up
            # to the highest one in use, and caches restored above a long chat's cells kept
            # a burst's attention twice as wide as its cells for as long as they lived.
            for job in sorted(admitted, key=self._restores):
                self._start(job)
                if not job.done:
                    running.append(job)
            if len(running) > 1 and admitted:
                self._join_prefills(admitted, running)
            try:
                self._step(running)
            except Exception as exc:  # never let one bad step kill the worker
                log.exception("engine step failed")
                with self._cond:
                    for job in running:
                        if job in self._waiting:  # preempted during the failed step
                            self._waiting.remove(job)
                for job in running:
                    self._finish(job, error=EngineError(f"inference failed: {exc}"))
            running = [j for j in running if not j.done and j.slot is not None]
            with self._cond:
                self._active = len(running)
        for job in pending:
            self._finish(job, error=EngineClosed("the model was unloaded"))
        self._flush()

    def _await_arrivals_locked(self) -> None:
        """Before an idle engine's first step, let requests still being prepared join it."""
        deadline = time.perf_counter() + ARRIVAL_WAIT_S
        while self._preparing and not self._closing and len(self._waiting) < len(self._slots):
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._cond.wait(left)

    def _admit_locked(self, running: list[Job]) -> list[Job]:
        admitted: list[Job] = []
        needs: list[int] = []  # cells each admitted job adds to the pool
        if any(j.cancelled or j.done for j in self._waiting):
            for job in [j for j in self._waiting if j.cancelled or j.done]:
                self._waiting.remove(job)
                self._finish(job, reason="cancelled")
        while self._waiting:
            job = self._waiting[0]
            free = [s for s in self._slots if s.job is None]
            if not free:
                break
            common = {s.seq_id: _common_prefix(s.history, job.items) for s in self._slots if s.history}
            slot = self._choose_slot(free, job, common)
            # Cells the running requests hold or will fill, shared cells once; then what
            # this one adds beyond a prefix already in their cells, or anywhere in the pool.
            busy = [j.slot for j in running if j.slot is not None]
            committed = (pool_cells(busy) + sum(j.n_prompt - j.cursor + j.reserve for j in running)
                         + sum(needs))
            in_busy = max((common.get(s.seq_id, 0) for s in busy if s.parked is None), default=0)
            if committed + min(job.kv_budget - in_busy, self.n_ctx) > self.n_ctx:
                break  # fits later, when a running request finishes
            in_pool = max((n for seq, n in common.items() if self._slots[seq].parked is None), default=0)
            need = min(job.kv_budget - min(in_pool, job.n_prompt - 1), self.n_ctx)
            # idle caches stay in the pool unless room runs short (a parked slot comes back)
            restored = len(slot.history) if slot.parked is not None else 0
            self._evict_idle(committed + need + pool_cells(self._slots) - pool_cells(busy)
                             + restored - self.n_ctx, keep=slot)
            needs.append(need)
            self._waiting.popleft()
            job.slot = slot
            slot.job = job
            admitted.append(job)
            self._active = len(running) + len(admitted)
        return admitted

    def _choose_slot(self, free: list[_Slot], job: Job, common: dict[int, int]) -> _Slot:
        """The free slot that saves the most prefill and destroys the least cache.

        A prefix cached in any other slot's pool cells can be shared into whichever slot
        the request takes (``_share_cached_prefix``), so among equal savings an empty slot,
        or the slot of the conversation this prompt continues, beats wiping an idle chat;
        then the least recently used goes.
        """
        sources = [s for s in self._slots if s.history and s.parked is None]

        def key(slot: _Slot) -> tuple[int, int, float]:
            shared = max((common[o.seq_id] for o in sources if o is not slot), default=0)
            own = self._reusable(common.get(slot.seq_id, 0), job)
            continues = own > 0 and (own >= len(slot.history) or own >= slot.prompt_end)
            return max(own, shared), 2 if continues else int(not slot.history), -slot.last_used

        return max(free, key=key)

    @staticmethod
    def _reusable(n: int, job: Job) -> int:
        """Of a slot's ``n`` matching items, what it would save ``job``, if worth the cache it overwrites.

        A match of under a tenth of the prompt (a BOS, a template's first tokens) counts
        as none, so a new conversation takes the least recently used slot (an empty one
        first) instead of wiping an idle chat to save a few tokens; llama-server's
        default slot-prompt similarity is the same 0.1.
        """
        return n if n * 10 >= len(job.items) else 0

    @staticmethod
    def _worth_restoring(slot: _Slot, common: int) -> bool:
        """Copying KV back costs a small fraction of prefilling it (~10 us against ~3 ms a
        token on a 2-core CPU): worth it for a match of 1% of the parked history."""
        return 100 * common >= len(slot.history)

    def _restores(self, job: Job) -> bool:
        """Whether starting ``job`` copies its slot's parked KV back into the pool."""
        slot = job.slot
        return (slot is not None and slot.parked is not None
                and self._worth_restoring(slot, _common_prefix(slot.history, job.items)))

    def _start(self, job: Job) -> None:
        slot = job.slot
        assert slot is not None
        if not job.preemptions:
            job.t_admit = time.perf_counter()
        if job.cancelled:
            self._finish(job, reason="cancelled")
            return
        rec = job.req.record
        common = _common_prefix(slot.history, job.items)
        if slot.parked is not None:
            if self._worth_restoring(slot, common) and self._unpark(slot):
                rec.restored_tokens = len(slot.history)
            else:
                slot.truncate(0)
                common = 0
        reuse = self._resume_point(job, common)
        if reuse < len(slot.history):
            if not llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.pos_at(reuse), -1):
                llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
                reuse = 0
            slot.truncate(reuse)
        own = reuse
        reuse = self._share_cached_prefix(job, reuse)
        job.cursor = reuse
        slot.prompt_end = len(job.prompt_items)
        if job.n_prompt - reuse >= PARK_MIN_PREFILL:
            self._park_idle()
        rec.slot = slot.seq_id
        if job.preemptions:
            rec.middleware["engine.preemptions"] = job.preemptions
            return  # sampler, text state and first-admission figures carry on
        rec.cached_tokens = reuse
        rec.shared_tokens = reuse - own
        rec.prefilled_tokens = job.n_prompt - reuse
        rec.input_tokens = job.n_prompt
        rec.queue_ms = (job.t_admit - job.t_submit) * 1000.0
        if job.req.sampling.plain_greedy:
            return  # _sample takes the argmax itself
        try:
            job.sampler = build_sampler(job.req.sampling, self.vocab)
        except Exception as exc:
            self._finish(job, error=EngineError(str(exc), code="invalid_sampling", status=400))

    @staticmethod
    def _resume_point(job: Job, common: int) -> int:
        """Where prefill starts given ``common`` cached items: never past the last prompt
        token (its logits are needed) nor in the middle of an image."""
        reuse = min(common, job.n_prompt - 1)
        if reuse > 0:
            start, _end, seg = job.segment_at(reuse)
            if isinstance(seg, ImageSegment) and start < reuse:
                reuse = start
        return reuse

    def _share_cached_prefix(self, job: Job, reuse: int) -> int:
        """Extend the job's ``reuse`` cached items with a longer prefix another slot holds.

        In the unified pool ``llama_memory_seq_cp`` only tags the source's cells with this
        sequence too: no copy, no compute. The shared system prompt of several operators,
        or a second question about a photo someone else asked about, is prefilled once.
        """
        slot = job.slot
        assert slot is not None
        best, source = reuse, None
        for other in self._slots:
            if other is slot or other.parked is not None or len(other.history) <= best:
                continue
            n = _common_prefix(other.history, job.items)
            if n > best:
                best, source = n, other
        if source is None:
            return reuse
        n = self._resume_point(job, best)
        if n <= reuse:
            return reuse
        llama_cpp.llama_memory_seq_cp(self.mem, source.seq_id, slot.seq_id,
                                      source.pos_at(reuse), source.pos_at(n))
        slot.borrow(source, reuse, n)
        return n

    def _join_prefills(self, started: list[Job], running: list[Job]) -> None:
        """Let requests that start together prefill their common next tokens once.

        A follower's rows ride on a leader's batch rows (one row, both sequence ids) from
        the point where both caches end, which llama.cpp requires to be the same, up to
        the last token they share; neither's final prompt token is shared, so each gets
        its own logits. Text only: image rows and shifted M-RoPE positions stay apart.
        """
        for job in started:
            if job.done or job.preemptions or job.followers or job.lead is not None:
                continue
            best, lead = job.cursor, None
            for other in running:
                if (other is job or other.done or other.slot is None or other.lead is not None
                        or other.preemptions or other.cursor != job.cursor
                        or other.slot.marks != job.slot.marks):
                    continue
                end = min(_common_prefix(other.items, job.items), job.n_prompt - 1, other.n_prompt - 1)
                if end > best:
                    best, lead = end, other
            if lead is None:
                continue
            end = job.cursor
            while end < best and isinstance(job.items[end], int):
                end += 1
            if end > job.cursor:
                job.lead, job.lead_end = lead, end
                lead.followers.append(job)
                job.slot.seal(lead.slot.tail)  # the rows it gets lie in the leader's cells

    @staticmethod
    def _detach(job: Job) -> None:
        """End joint prefill for ``job`` as leader or follower; followers go on alone."""
        if job.lead is not None:
            job.lead.followers.remove(job)
            job.lead = None
            if job.slot is not None:
                job.slot.seal()  # its own rows from here on
        for follower in job.followers:
            follower.lead = None
            if follower.slot is not None:
                follower.slot.seal()
        job.followers = []

    def _park_idle(self) -> None:
        """Move every idle slot's KV to host RAM; at most ``n_ctx`` tokens stay parked (LRU)."""
        for slot in self._slots:
            if slot.job is not None or not slot.spans:
                continue
            size = llama_cpp.llama_state_seq_get_size(self.ctx, slot.seq_id)
            blob = np.empty(size, dtype=np.uint8)
            got = llama_cpp.llama_state_seq_get_data(self.ctx, _bytes_ptr(blob), size, slot.seq_id)
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
            if got == size:
                slot.parked = blob
            else:
                slot.truncate(0)
        parked = sorted((s for s in self._slots if s.parked is not None), key=lambda s: s.last_used)
        total = sum(len(s.history) for s in parked)
        while total > self.n_ctx:
            victim = parked.pop(0)
            total -= len(victim.history)
            victim.truncate(0)

    def _unpark(self, slot: _Slot) -> bool:
        """Put a parked slot's KV back into the pool (any free cells will do)."""
        blob, slot.parked = slot.parked, None
        assert blob is not None
        if llama_cpp.llama_state_seq_set_data(self.ctx, _bytes_ptr(blob), blob.nbytes, slot.seq_id) == blob.nbytes:
            slot.refill()
            return True
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        log.warning("could not restore a parked KV cache of %s; prefilling it again", self.config.model_id)
        return False

    def _step(self, running: list[Job]) -> None:
        for job in running:
            if job.cancelled and not job.done:
                self._finish(job, reason="cancelled")
        live = [j for j in running if not j.done]
        if not live:
            return
        self._ensure_room(live, sum(1 for j in live if j.next_token is not None and j.cursor >= j.n_prompt))
        live = [j for j in live if not j.done and j.slot is not None]
        decoding = [j for j in live if j.next_token is not None and j.cursor >= j.n_prompt]
        prefilling = [j for j in live if j.cursor < j.n_prompt]

        batch = self._batch
        n = 0
        outputs: list[tuple[int, Job]] = []
        # (job, history length, cursor, generated length) before this step, to undo a failed decode
        undo: list[tuple[Job, int, int, int]] = []
        for job in decoding:
            slot = job.slot
            undo.append((job, len(slot.history), job.cursor, len(job.generated)))
            self._put(batch, n, job.next_token, len(slot.history) + slot.shift, slot.seq_id, True)
            slot.history.append(job.next_token)
            job.generated.append(job.next_token)
            outputs.append((n, job))
            n += 1
        budget = self.n_batch - n
        if decoding:
            budget = min(budget, PREFILL_CHUNK_WHILE_DECODING)
        image_job: Job | None = None
        followers = [j for j in prefilling if j.lead is not None]
        # Leaders first: a follower whose shared part ends in this step goes on alone after them.
        for job in [j for j in prefilling if j.lead is None] + followers:
            if budget <= 0:
                break
            if job.lead is not None:
                if job.cursor < job.lead_end:
                    continue  # its leader carries its rows
                self._detach(job)
            start, end, seg = job.segment_at(job.cursor)
            if isinstance(seg, ImageSegment):
                if image_job is None:
                    image_job = job
                continue
            take = min(end - job.cursor, budget)
            n = self._put_prompt(job, take, n, outputs, undo)
            budget -= take
        if n:
            batch.n_tokens = n
            self._flush()
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                self._decode_failed(rc, undo, live)
                return
            n_seqs = len(decoding) + sum(1 for j in prefilling if j.cursor > 0)
            greedy = self._greedy_tokens(outputs)
            for row, (idx, job) in enumerate(outputs):
                job.batch_sum += n_seqs
                job.batch_steps += 1
                self._sample(job, idx, None if greedy is None else int(greedy[row]))
        if image_job is not None and not image_job.done:
            self._prefill_image(image_job)

    def _put_prompt(self, job: Job, take: int, n: int, outputs: list[tuple[int, Job]],
                    undo: list[tuple[Job, int, int, int]]) -> int:
        """Add ``take`` prompt tokens of ``job`` at batch row ``n``; returns the next row.

        Rows its followers share carry their sequence ids too, and advance them.
        """
        batch = self._batch
        slot = job.slot
        start = job.cursor
        # each follower rides on the first ``k`` rows, the longest riders first
        riders = sorted(((f, min(take, f.lead_end - start)) for f in job.followers
                         if f.cursor == start and f.cursor < f.lead_end), key=lambda fk: -fk[1])
        for f in [job] + [f for f, _ in riders]:
            undo.append((f, len(f.slot.history), f.cursor, len(f.generated)))
        last_prompt = start + take == job.n_prompt and not job.resuming
        base = len(slot.history) + slot.shift
        width = len(riders)
        for k in range(take):
            tok = job.items[start + k]
            want = last_prompt and k == take - 1
            self._put(batch, n, tok, base + k, slot.seq_id, want)
            if riders:
                while width and riders[width - 1][1] <= k:
                    width -= 1
                for i in range(width):
                    batch.seq_id[n][i + 1] = riders[i][0].slot.seq_id
                batch.n_seq_id[n] = 1 + width
            if want:
                outputs.append((n, job))
            n += 1
        slot.history.extend(job.items[start:start + take])
        job.cursor += take
        for f, k in riders:
            f.slot.history.extend(job.items[start:start + k])
            f.cursor += k
            f.req.record.shared_tokens += k
            f.req.record.prefilled_tokens -= k
        return n

    def _put(self, batch: llama_cpp.llama_batch, i: int, token: int, pos: int, seq: int,
             logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _prefill_image(self, job: Job) -> None:
        start, end, seg = job.segment_at(job.cursor)
        assert isinstance(seg, ImageSegment)
        slot = job.slot
        take = min(end - job.cursor, self.n_batch)
        rows = seg.embeddings[job.cursor - start: job.cursor - start + take]
        batch = self._embd_batch
        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        last_prompt = job.cursor + take == job.n_prompt and not job.resuming
        if self.mrope:
            # Follow mtmd-helper: rows at (n_past + t, n_past + y, n_past + x, z) with
            # n_past the image's first position (set_position_mrope_2d), section-major.
            img_base = start + slot.shift
            off = job.cursor - start
            if seg.positions is not None:
                pos4 = np.array(seg.positions[:, off: off + take], dtype=np.int32)
                pos4[:3] += img_base
            else:  # set_position_mrope_1d
                pos4 = np.broadcast_to(np.arange(img_base + off, img_base + off + take, dtype=np.int32),
                                       (4, take)).copy()
            ctypes.memmove(self._mrope_pos, pos4.ctypes.data, pos4.nbytes)
            for k in range(take):
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = slot.seq_id
                batch.logits[k] = last_prompt and k == take - 1
        else:
            base = len(slot.history)
            for k in range(take):
                batch.pos[k] = base + k
                batch.n_seq_id[k] = 1
                batch.seq_id[k][0] = slot.seq_id
                batch.logits[k] = last_prompt and k == take - 1
        batch.n_tokens = take
        if seg.non_causal:
            llama_cpp.llama_set_causal_attn(self.ctx, False)
        try:
            self._flush()
            rc = llama_cpp.llama_decode(self.ctx, batch)
        finally:
            if seg.non_causal:
                llama_cpp.llama_set_causal_attn(self.ctx, True)
        if rc != 0:
            self._finish(job, error=EngineError(f"image prefill failed (llama_decode={rc})"))
            return
        slot.history.extend(job.items[job.cursor: job.cursor + take])
        job.cursor += take
        if self.mrope and job.cursor == end:
            # After an image n_past advances by n_pos (max(nx, ny)), not by its rows.
            slot.shift = start + slot.shift + seg.mrope_advance - end
            slot.marks.append((end, slot.shift))
        if last_prompt:
            self._sample(job, take - 1)

    def _ensure_room(self, live: list[Job], n_new: int) -> None:
        """Free KV cells before a step: idle caches first, then preempt the youngest request."""
        used = pool_cells(self._slots)
        # Cells this step may add: a token per decoding sequence, the step's prompt chunk
        # (shared by all prefilling jobs) and possibly one image chunk of up to n_batch rows.
        remaining = sum(j.n_prompt - j.cursor for j in live if j.cursor < j.n_prompt)
        chunk = PREFILL_CHUNK_WHILE_DECODING if n_new else self.n_batch
        need = n_new + min(remaining, chunk + self.n_batch)
        used -= self._evict_idle(used + need - self.n_ctx)
        # Still short: the most recently admitted job gives its cells back and waits at the
        # head of the queue, resuming later exactly where it was; a running stream is
        # never cut short for a newcomer. A job alone at the limit ends with "length".
        while used + need > self.n_ctx:
            holders = [j for j in live if not j.done and j.slot is not None]
            if len(holders) <= 1:
                for j in holders:
                    if j.next_token is not None:
                        self._finish(j, reason="length")
                break
            youngest = max(holders, key=lambda j: (j.t_admit, j.t_submit))
            if youngest.next_token is not None and not youngest.resuming:
                n_new -= 1
            else:
                remaining -= youngest.n_prompt - youngest.cursor
            need = n_new + min(remaining, chunk + self.n_batch)
            self._preempt(youngest)
            used = pool_cells(self._slots)  # its cells that others share stay

    def _clear(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, -1, -1)
        slot.truncate(0)

    def _evict_idle(self, excess: int, keep: _Slot | None = None) -> int:
        """Drop idle caches in the pool, least recently used first, until ``excess`` cells are free."""
        if excess <= 0:
            return 0
        idle = sorted((s for s in self._slots if s.job is None and s is not keep and s.spans),
                      key=lambda s: s.last_used)
        before = used = pool_cells(self._slots)
        for victim in idle:
            if before - used >= excess:
                break
            self._clear(victim)
            used = pool_cells(self._slots)  # cells another slot shares stay in the pool
        return before - used

    def _preempt(self, job: Job) -> None:
        slot = job.slot
        self._detach(job)
        self._clear(slot)
        slot.job = None
        slot.last_used = time.monotonic()
        job.requeue()
        with self._cond:
            self._waiting.appendleft(job)
        log.info("preempted a request of %s to free KV cells; it resumes when room frees up",
                 self.config.model_id)

    def _decode_failed(self, rc: int, undo: list[tuple[Job, int, int, int]], live: list[Job]) -> None:
        """Undo what the failed batch added; on "no KV room" free some and retry next step."""
        for job, *_ in undo:
            self._detach(job)  # followers go on alone: their undone rows were the leader's
        for job, n_hist, cursor, n_gen in undo:
            slot = job.slot
            llama_cpp.llama_memory_seq_rm(self.mem, slot.seq_id, slot.pos_at(n_hist), -1)
            slot.truncate(n_hist)
            job.cursor = cursor
            del job.generated[n_gen:]
        if rc == 1:  # llama.cpp found no room in the KV cache for this batch: recoverable
            holders = [j for j in live if not j.done and j.slot is not None]
            if len(holders) > 1:
                self._preempt(max(holders, key=lambda j: (j.t_admit, j.t_submit)))
                return
            for job in holders:
                self._finish(job, reason="length")
            return
        for job, *_ in undo:
            self._finish(job, error=EngineError(f"llama_decode failed with status {rc}"))

    def _greedy_tokens(self, outputs: list[tuple[int, Job]]) -> np.ndarray | None:
        """Argmax of every output row in one call, when any plain-greedy job wants one.

        Rows of ``llama_get_logits`` follow the batch order of the rows that asked for
        logits, which is the order of ``outputs``. One vectorised argmax replaces a
        ctypes lookup, an array view and an argmax per sequence each step.
        """
        if not any(job.sampler is None for _, job in outputs):
            return None
        logits = llama_cpp.llama_get_logits(self.ctx)
        if not logits:
            return None
        # A view is costlier to make than the argmax; the buffer moves only when
        # llama.cpp grows it, so views are kept per (address, rows).
        key = (ctypes.cast(logits, ctypes.c_void_p).value, len(outputs))
        view = self._logit_views.get(key)
        if view is None:
            if len(self._logit_views) >= 16:
                self._logit_views.clear()
            view = self._logit_views[key] = np.ctypeslib.as_array(logits, shape=(len(outputs), self.n_vocab))
        return view.argmax(axis=1)

    def _sample(self, job: Job, idx: int, greedy: int | None = None) -> None:
        if job.sampler is None:
            # Plain greedy: the first maximal logit, exactly what llama.cpp's greedy sampler
            # picks, without copying 49k candidates into a token-data array each step.
            if greedy is not None:
                tok = greedy
            else:
                row = llama_cpp.llama_get_logits_ith(self.ctx, idx)
                if not row:
                    self._finish(job, error=EngineError(f"llama.cpp returned no logits for batch row {idx}"))
                    return
                tok = int(np.ctypeslib.as_array(row, shape=(self.n_vocab,)).argmax())
        else:
            tok = int(llama_cpp.llama_sampler_sample(job.sampler, self.ctx, idx))
        now = time.perf_counter()
        rec = job.req.record
        if job.n_generated == 0 and not job.t_first:
            job.t_first = now
            rec.ttft_ms = (now - job.req.arrival) * 1000.0
            rec.prefill_ms = (now - job.t_admit) * 1000.0
        job.t_last = now
        if not job.req.ignore_eos and llama_cpp.llama_vocab_is_eog(self.vocab, tok):
            self._finish(job, reason="stop")
            return
        job.n_generated += 1
        job.sampled.append(tok)
        text, stopped = job.text.push(self.token_bytes(tok))
        if text:
            self._emit(job, TextDelta(text))
        if stopped:
            self._finish(job, reason="stop")
        elif job.n_generated >= job.req.max_tokens:
            self._finish(job, reason="length")
        elif job.slot is not None and len(job.slot.history) + 1 >= self.n_ctx:
            self._finish(job, reason="length")
        else:
            job.next_token = tok

    def _finish(self, job: Job, *, reason: str | None = None, error: Exception | None = None) -> None:
        if job.done:
            return
        job.done = True
        job.next_token = None
        self._detach(job)
        if job.sampler is not None:
            llama_cpp.llama_sampler_free(job.sampler)
            job.sampler = None
        if job.slot is not None:
            job.slot.job = None
            job.slot.last_used = time.monotonic()
        rec = job.req.record
        rec.output_tokens = job.n_generated
        if job.t_first:
            rec.decode_ms = (job.t_last - job.t_first) * 1000.0
        if job.batch_steps:
            rec.batch_size_mean = job.batch_sum / job.batch_steps
        if error is not None:
            rec.error_type = getattr(error, "code", type(error).__name__)
            self._emit(job, Failed(error))
            return
        tail = job.text.flush() if reason != "cancelled" else ""
        if tail:
            self._emit(job, TextDelta(tail))
        rec.finish_reason = reason
        self._emit(job, Finished(reason or "stop"))


def default_parallel() -> int:
    """Slots for an edge box: 4 (llama-server's default), fewer on 1 core or < 4 GiB free.

    Batching pays off once two sequences can share each weight read, so one physical
    core gets 2 slots; each slot's working set (sampler, logits, KV of its share of the
    context) is small next to 1 GiB, which bounds the count on tiny boards.
    """
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    free_gib = psutil.virtual_memory().available / 2**30
    return max(1, min(4, 2 * cores, int(free_gib)))


def _choose_fast_paths(config: EngineConfig, n_threads: int) -> cpu_paths.Verdict:
    """The self-tested fast paths; a file the self-test cannot read gets the plain path
    (its load then fails with llama.cpp's own clear error)."""
    if config.repack not in cpu_paths.REPACK_MODES:
        raise EngineError(f"repack must be one of {', '.join(cpu_paths.REPACK_MODES)}, not {config.repack!r}",
                          code="invalid_config")
    try:
        return cpu_paths.choose(config.path, config.repack, n_threads)
    except Exception as exc:  # unreadable or not GGUF: nothing to test
        return cpu_paths.Verdict(config.repack, (), (), f"not self-tested ({exc})")


def default_threads() -> int:
    """Physical cores (hyper-threads slow llama.cpp's matmuls down), at least 1."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
