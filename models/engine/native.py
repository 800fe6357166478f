"""The llama.cpp side of a loaded model: weights, context, batches and tokenizer.

The CPU fast paths are the ones ``models.cpu_paths`` self-tested on this machine (its
``load_model`` applies the choice), and the attention kernel the one ``models.attention``
timed faster here; nothing here assumes a CPU feature works or is fast.
"""

from __future__ import annotations

import ctypes
import logging
import os

import llama_cpp
import numpy as np
import psutil

from models import attention, cpu_info, cpu_paths, gguf_info
from models.engine.draft import DraftModel
from models.engine.types import EngineConfig, EngineError, resolve_stream_interval
from models.engine.tokenizer import Tokenizer
from models.llama_lib import ensure_backend, free_loaded, on_own_thread
from telemetry.record import ModelInfo

log = logging.getLogger("edgevlm.engine")


class NativeModel(Tokenizer):
    """Loads the model and context (tokenizer included); frees them in ``_free_native``."""

    def _load(self, config: EngineConfig) -> None:
        """Load weights and set up the context; on failure nothing native is left behind."""
        ensure_backend()
        self.config = config
        rss_before = psutil.Process().memory_info().rss
        n_threads = config.n_threads or default_threads()
        self.fast_paths = choose_fast_paths(config.path, config.repack, n_threads)
        log.info("model %s: %s", config.model_id, self.fast_paths.describe())
        warning = cpu_info.threads_warning(n_threads)
        if warning:
            log.warning("model %s: %s", config.model_id, warning)
        model = cpu_paths.load_model(config.path, self.fast_paths.allowed, gpu_layers=gpu_layers())
        if not model:
            raise EngineError(f"could not load model file {config.path}", code="model_load_failed")
        self.model = model
        self.ctx = None
        self._drafter: DraftModel | None = None
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

    def _init_context(self, config: EngineConfig, rss_before: int) -> None:
        """Context, template and batches; any failure is cleaned up by the caller."""
        model = self.model
        self._init_tokenizer(model, config.chat_template)
        n_threads = config.n_threads or default_threads()  # as chosen in _load
        n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        n_ctx = config.n_ctx or min(n_ctx_train, 4096)
        n_batch = max(32, min(config.n_batch, n_ctx))
        n_seqs = config.n_parallel if config.n_parallel > 0 else default_parallel()
        self.attention = choose_attention(model, config.path, config.flash_attn, n_threads, self.fast_paths.allowed)
        log.info("model %s: %s", config.model_id, self.attention.describe())
        cparams = llama_cpp.llama_context_default_params()
        cparams.flash_attn_type = self.attention.flash_attn_type
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seqs
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        # One shared KV pool across slots, so a long prompt may use any free cell instead
        # of a fixed 1/n share; or one stream per slot (types.KV_LAYOUTS). A single slot
        # is both.
        cparams.kv_unified = cparams.n_seq_max > 1 and config.kv_layout == "shared"
        cparams.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise EngineError(f"could not create a context of {n_ctx} tokens", code="context_failed")
        self.ctx = ctx
        self.mem = llama_cpp.llama_get_memory(ctx)
        self.per_slot = cparams.n_seq_max > 1 and not cparams.kv_unified
        # What one request may hold: the whole pool, or its slot's stream.
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(ctx))
        self.n_batch = n_batch
        self.n_embd = int(llama_cpp.llama_model_n_embd_inp(model))
        self.n_threads = n_threads
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
            kv_layout="per-slot" if self.per_slot else "shared",
            flash_attn=self.attention.flash,
            # from the configured threads, once: a runner's share of the cores shrinks
            # only while other models compute, and their threads then take the CPUs left
            stream_interval=resolve_stream_interval(config.stream_interval, n_threads,
                                                    cpu_info.cpu_budget().usable),
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
        self.n_parallel = int(cparams.n_seq_max)
        self._logit_views: dict[tuple[int | None, int], np.ndarray] = {}
        size = int(llama_cpp.llama_model_size(model))
        if config.draft_path:
            self._drafter = self._load_draft(config, n_threads)
            size += int(llama_cpp.llama_model_size(self._drafter.model))
        self._load_bytes = max(psutil.Process().memory_info().rss - rss_before, size)

    def _load_draft(self, config: EngineConfig, n_threads: int) -> DraftModel:
        """The draft model beside the target: a context as large, a sequence per slot."""
        assert config.draft_path is not None
        verdict = choose_fast_paths(config.draft_path, config.repack, n_threads)
        log.info("model %s: draft model %s: %s", config.model_id, config.draft_path, verdict.describe())
        drafter = DraftModel(config.draft_path, target_path=config.path, target_vocab=self.vocab,
                             n_ctx=int(llama_cpp.llama_n_ctx(self.ctx)),
                             n_batch=self.n_batch, n_parallel=self.n_parallel, n_threads=n_threads,
                             allowed=verdict.allowed, gpu_layers=gpu_layers(),
                             attention=lambda model: choose_attention(model, config.draft_path or "", config.flash_attn,
                                                                      n_threads, verdict.allowed))
        log.info("model %s: draft model: %s", config.model_id, drafter.attention.describe())
        return drafter

    def _free_native(self) -> None:
        if self._drafter is not None:
            self._drafter.close()
            self._drafter = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._embd_batch is not None:
            if self._embd_pos_orig is not None:
                # free() what llama_batch_init allocated, not our ctypes array
                self._embd_batch.pos = ctypes.cast(self._embd_pos_orig, ctypes.POINTER(llama_cpp.llama_pos))
            llama_cpp.llama_batch_free(self._embd_batch)
            self._embd_batch = None
        free_loaded(self)


def default_parallel() -> int:
    """Slots for an edge box: 4 (llama-server's default), fewer on 1 core or < 4 GiB free.

    Batching pays off once two sequences can share each weight read, so one physical
    core gets 2 slots; each slot's working set (sampler, logits, KV of its share of the
    context) is small next to 1 GiB, which bounds the count on tiny boards.
    """
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    free_gib = psutil.virtual_memory().available / 2**30
    return max(1, min(4, 2 * cores, int(free_gib)))


def gpu_layers() -> int:
    """Layers to offload: all of them, unless EDGEVLM_CPU_ONLY is set."""
    return 0 if os.environ.get("EDGEVLM_CPU_ONLY") else 999


def offloads() -> bool:
    """Whether layers go to a GPU: this build has a GPU backend and EDGEVLM_CPU_ONLY is unset."""
    return gpu_layers() > 0 and bool(llama_cpp.llama_supports_gpu_offload())


def choose_fast_paths(path: str, repack: str, n_threads: int) -> cpu_paths.Verdict:
    """The self-tested fast paths; a file the self-test cannot read gets the plain path
    (its load then fails with llama.cpp's own clear error)."""
    if repack not in cpu_paths.REPACK_MODES:
        raise EngineError(f"repack must be one of {', '.join(cpu_paths.REPACK_MODES)}, not {repack!r}",
                          code="invalid_config")
    try:
        return cpu_paths.choose(path, repack, n_threads)
    except Exception as exc:  # unreadable or not GGUF: nothing to test
        return cpu_paths.Verdict(repack, (), (), f"not self-tested ({exc})")


def choose_attention(model: llama_cpp.llama_model_p, path: str, mode: str, n_threads: int,
                     fast_paths: tuple[str, ...] | None) -> attention.AttentionVerdict:
    """The timed attention kernel (``models.attention``); if the probe itself fails,
    llama.cpp's own choice, said so. The probe computes graphs, so it runs on a thread of
    its own (``on_own_thread``): the loading thread keeps no OpenMP team."""
    if mode not in attention.FLASH_ATTN_MODES:
        raise EngineError(f"flash_attn must be one of {', '.join(attention.FLASH_ATTN_MODES)}, not {mode!r}",
                          code="invalid_config")
    try:
        return on_own_thread(lambda: attention.choose(model, path, mode, n_threads, fast_paths, gpu=offloads()),
                             name="attention-probe")
    except Exception as exc:  # a context the probe could not create: not the model's fault
        return attention.AttentionVerdict(mode, None, f"not timed ({exc})")


def default_threads() -> int:
    """Physical cores (hyper-threads slow llama.cpp's matmuls down), at least 1."""
    return max(1, psutil.cpu_count(logical=False) or os.cpu_count() or 1)
