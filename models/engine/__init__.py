"""A continuous-batching llama.cpp engine that owns the prefill/decode loop.

One worker thread per loaded model drives one llama.cpp context holding ``n_parallel``
sequences over a unified KV cache (or, with ``kv_layout="per-slot"``, one KV stream per
sequence: see ``types.KV_LAYOUTS``). Every step runs a single ``llama_decode`` over the
next token of every generating sequence plus a chunk of any prompt still being
prefilled, so concurrent requests share the matrix multiplications instead of taking
turns, and a long prompt never stalls running streams for more than one chunk. Each
slot remembers what its KV holds, so a request that repeats a prompt prefix held by
any slot (the next turn of a chat, a shared system prompt, the same photo) prefills
only what is new, and requests that start together prefill their common prefix once;
shared cells are counted once when deciding what fits. Before a long prompt
prefills, idle slots' KV moves to host RAM so the prompt attends over its own cells
only; it comes back on that conversation's next turn. A slot's KV that another
conversation displaces waits in a host-RAM prompt cache until its prompt returns.
Running requests are never interrupted by new ones.

One concept per module: ``types`` (errors, config, requests, events), ``detok`` (text
and stop strings), ``job``, ``slots`` (KV slot and cell accounting), ``native``
(llama.cpp model, context, tokenizer), ``admission``, ``prefix`` (sharing, parking
and the prompt cache's copies), ``prompt_cache`` (what is kept, matched and dropped),
``batch`` (building each step's batch) and ``worker`` (the ``Engine``).
"""

from models.engine.job import GENERATION_RESERVE, Job
from models.engine.native import default_parallel, default_threads
from models.engine.prefix import PARK_MIN_PREFILL
from models.engine.slots import KV_WINDOW_PAD
from models.engine.types import (EngineClosed, EngineConfig, EngineError, Event, Failed, Finished,
                                 GenerationRequest, ImageSegment, KV_LAYOUTS, PromptTooLong, QueueFull,
                                 STREAM_INTERVAL_AUTO, Segment, Sink, TextDelta, kv_layout_problem,
                                 resolve_stream_interval, segment_tokens, stream_interval_problem)
from models.engine.worker import Engine

__all__ = [
    "GENERATION_RESERVE", "KV_WINDOW_PAD", "PARK_MIN_PREFILL", "Engine", "EngineClosed", "EngineConfig",
    "EngineError", "Event", "Failed", "Finished", "GenerationRequest", "ImageSegment", "Job", "KV_LAYOUTS",
    "PromptTooLong", "QueueFull", "STREAM_INTERVAL_AUTO", "Segment", "Sink", "TextDelta", "default_parallel",
    "default_threads", "kv_layout_problem", "resolve_stream_interval", "segment_tokens", "stream_interval_problem",
]
