"""llama.cpp set-up and the small direct uses of its C API shared across edgevlm.

llama.cpp needs one backend initialisation per process and routes its (very chatty)
log output through a single C callback; both belong in one place. So do tokenizing,
and evaluating one sequence outside the serving engine (the fast-path self-test,
calibration, quality scoring and benchmarks): one place fills a batch correctly.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Callable, TypeVar

import llama_cpp
import numpy as np

log = logging.getLogger("edgevlm.llama")

_init_lock = threading.Lock()
_initialised = False

T = TypeVar("T")


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's INFO/DEBUG output is noise for a server; keep warnings and errors.
    if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        msg = text.decode("utf-8", errors="replace").rstrip()
        if msg:
            log.log(logging.WARNING if level == 3 else logging.ERROR, msg)


def ensure_backend() -> None:
    """Initialise the llama.cpp backend once and silence its info logging."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


def on_own_thread(call: Callable[[], T], name: str = "ggml-compute") -> T:
    """Run ``call`` on a new thread that ends with it; return its result or raise its error.

    For native calls that compute a ggml graph anywhere but on the engine's worker thread
    (the vision projector's warm-up and encodes). In an OpenMP build of llama.cpp every
    thread that computes a graph gets an OpenMP team of its own, kept until that thread
    exits. Once a process has more such threads than CPUs, libgomp spins only about 100
    times before sleeping between a graph's operations, so each decode step waits on
    wake-ups: measured on 2 cores with SmolLM2-135M, a decode step took 10.5 instead of
    8.0 ms while a second computing thread lived, and a server with an mmproj loaded
    (warmed up on its loading thread) decoded text at ~66 instead of ~103 tok/s. A thread
    that has ended frees its team, so the worker's stays the only one.
    """
    outcome: list[tuple[bool, object]] = []

    def run() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as exc:  # handed to the caller
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]


def load_vocab(path: str) -> llama_cpp.llama_model_p | None:
    """The file's vocabulary and metadata without its weights (None if llama.cpp cannot
    read it): enough to tokenize or read a header, at a few MB and no compute threads.
    The caller frees it with ``llama_model_free``."""
    ensure_backend()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    return llama_cpp.llama_model_load_from_file(str(path).encode(), params) or None


def meta_str(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """Read one string metadata value from a loaded model (None when absent)."""
    size = 1 << 12
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1


def tokenize(vocab: llama_cpp.llama_vocab_p, text: str, *, add_special: bool = False,
             parse_special: bool = False) -> list[int]:
    """``llama_tokenize`` with a buffer that grows when the first guess is too small."""
    data = text.encode("utf-8")
    n_max = len(data) + 8
    buf = (llama_cpp.llama_token * n_max)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    if n < 0:
        n_max = -n
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
    return list(buf[:max(n, 0)])


def token_piece(vocab: llama_cpp.llama_vocab_p, token: int, *, special: bool = True) -> bytes:
    """One token's bytes (``llama_token_to_piece`` with a buffer that grows when needed)."""
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[:max(n, 0)]


def decode_rows(ctx: llama_cpp.llama_context_p, batch: llama_cpp.llama_batch,
                rows: list[tuple[int, int, int, bool]]) -> int:
    """Decode (token, position, sequence, logits) rows in ``batch`` (one sequence id per
    row); llama_decode's code (0 = done)."""
    for i, (token, pos, seq, logits) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
        batch.seq_id[i][0] = seq
    batch.n_tokens = len(rows)
    return int(llama_cpp.llama_decode(ctx, batch))


def bytes_ptr(buf: np.ndarray) -> ctypes._Pointer:
    """A byte array's data as the ``uint8_t *`` llama.cpp's state calls take."""
    return buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))


def copy_seq_state(ctx: llama_cpp.llama_context_p, seq: int) -> np.ndarray | None:
    """Sequence ``seq``'s state (its KV cells) copied to host RAM, or None if llama.cpp fails."""
    size = llama_cpp.llama_state_seq_get_size(ctx, seq)
    blob = np.empty(size, dtype=np.uint8)
    got = llama_cpp.llama_state_seq_get_data(ctx, bytes_ptr(blob), size, seq)
    return blob if got == size else None


def load_seq_state(ctx: llama_cpp.llama_context_p, blob: np.ndarray, seq: int) -> bool:
    """Copy a state from ``copy_seq_state`` into sequence ``seq`` (cells of its own, no
    compute); False if llama.cpp could not (no room, or another context's layout)."""
    return llama_cpp.llama_state_seq_set_data(ctx, bytes_ptr(blob), blob.nbytes, seq) == blob.nbytes


def free_loaded(owner: object) -> None:
    """Free ``owner.ctx``, then ``owner.model`` (a context needs its model until freed).

    Each is set to None, so a second call (a failed load, then close) frees nothing twice.
    """
    if getattr(owner, "ctx", None):
        llama_cpp.llama_free(owner.ctx)  # type: ignore[attr-defined]
        owner.ctx = None  # type: ignore[attr-defined]
    if getattr(owner, "model", None):
        llama_cpp.llama_model_free(owner.model)  # type: ignore[attr-defined]
        owner.model = None  # type: ignore[attr-defined]


class OneSequence:
    """A context and batch for evaluating one sequence of tokens outside the engine.

    With ``n_embd`` it also holds an embedding batch, so projector output (image rows
    from ``models.vision``) can be decoded into the sequence as the engine prefills it.
    """

    def __init__(self, model: llama_cpp.llama_model_p, *, n_ctx: int, n_batch: int, n_threads: int,
                 cb_eval: object = None, n_embd: int = 0, flash_attn: bool | None = None) -> None:
        cparams = llama_cpp.llama_context_default_params()
        if flash_attn is not None:  # None: llama.cpp's choice
            cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        if cb_eval is not None:
            cparams.cb_eval = cb_eval
        self.ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not self.ctx:
            raise RuntimeError(f"could not create a context of {n_ctx} tokens")
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model)))
        self.n_batch = n_batch
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self.embd_batch = llama_cpp.llama_batch_init(n_batch, n_embd, 1) if n_embd > 0 else None
        self.n_embd = n_embd

    def clear(self) -> None:
        """Forget every cell (the next decode starts a new sequence)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int], start: int, logits: bool | Callable[[int], bool] = True) -> int:
        """Decode ``tokens`` at positions ``start...``; ``logits`` says which rows to output
        (all, none, or by row index). Returns llama_decode's code (0 = done)."""
        batch = self.batch
        batch.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = logits(i) if callable(logits) else logits
        return int(llama_cpp.llama_decode(self.ctx, batch))

    def decode_embeddings(self, rows: np.ndarray, start: int, *, non_causal: bool = False) -> int:
        """Decode embedding rows ``(n, n_embd)`` at positions ``start...`` (1-D RoPE), no logits.

        ``non_causal`` images (Gemma 3) attend both ways inside the image, so the rows go
        in one decode with causal attention off, as the engine prefills them. Returns
        llama_decode's code (0 = done).
        """
        if self.embd_batch is None:
            raise RuntimeError("this sequence was made without n_embd: it cannot take embeddings")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd or not 0 < rows.shape[0] <= self.n_batch:
            raise ValueError(f"embeddings must be (1..{self.n_batch}, {self.n_embd}), got {rows.shape}")
        batch = self.embd_batch
        ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        for i in range(rows.shape[0]):
            batch.pos[i], batch.n_seq_id[i], batch.logits[i] = start + i, 1, False
            batch.seq_id[i][0] = 0
        batch.n_tokens = rows.shape[0]
        if non_causal:
            llama_cpp.llama_set_causal_attn(self.ctx, False)
        try:
            return int(llama_cpp.llama_decode(self.ctx, batch))
        finally:
            if non_causal:
                llama_cpp.llama_set_causal_attn(self.ctx, True)

    def logits(self, row: int) -> np.ndarray:
        """The logits of an output row of the last decode (a view: copy to keep it)."""
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,))

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        if self.embd_batch is not None:
            llama_cpp.llama_batch_free(self.embd_batch)
        llama_cpp.llama_free(self.ctx)

    def __enter__(self) -> "OneSequence":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
