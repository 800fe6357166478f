"""The messages between the HTTP process and a runner, over one socket pair.

Each message is a tuple whose first item names it, pickled by ``models.runner.shm``
and framed by ``multiprocessing.connection.Connection`` (a length prefix, then the
pickle). Token events are tiny: one step's events, of every request, go as one EVENTS
message, so the HTTP process wakes once per step rather than once per stream. Large
arrays (an image's pixels, its embeddings in a SUBMIT or a RESULT) cross through
shared memory, the pickle holding only their names.

HTTP process -> runner:
  (LOAD, EngineConfig, VisionConfig | None, thresholds)  first message; answered by READY or
                                        LOAD_FAILED (thresholds: logger name -> level, see ``logs``)
  (SUBMIT, job_id, GenerationRequest, max_queue)
  (CANCEL, job_id)
  (PREPARING, +1 | -1)                  a request is being prepared for this engine
  (THREADS, n)                          compute with n threads from the next step (``cpu_share``)
  (CALL, call_id, method, args, kwargs) a vision call (``VISION_CALLS``), answered by RESULT
  (CLOSE,)                              unload: pending jobs end with EngineClosed

runner -> HTTP process:
  (READY, Facts) | (LOAD_FAILED, EngineError)
  (EVENTS, [(job_id, TextDelta | Finished | Failed, n_generated), ...])  one engine step's events
  (EVENT, job_id, TextDelta | Finished | Failed, n_generated)   one event outside a step
  (RESULT, call_id, ok, value | exception)   the call's return value, or what it raised
  (CLOSED,)
  (LOG, level, logger name, text, pid)  a log record, at any time (also before READY)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from models.attention import AttentionVerdict
from models.cpu_paths import Verdict
from models.engine.validation import Limits
from telemetry.record import ModelInfo

if TYPE_CHECKING:
    from models.vision import ProjectorFacts

LOAD = "load"
READY = "ready"
LOAD_FAILED = "load_failed"
SUBMIT = "submit"
CANCEL = "cancel"
PREPARING = "preparing"
EVENT = "event"
EVENTS = "events"
CALL = "call"
THREADS = "threads"
RESULT = "result"
CLOSE = "close"
CLOSED = "closed"
LOG = "log"

# What the HTTP process may call on a runner's ``VisionEncoder``: tokenize and
# count_tokens run on a worker thread (an encode takes long; CANCEL and SUBMIT must still
# be read), cache_stats answers at once (a /metrics scrape must not wait for encodes).
VISION_CALLS = frozenset({"tokenize", "count_tokens", "cache_stats"})


def channel_tag(runner_pid: int) -> str:
    """The tag in the names of the shared-memory blocks sent over runner ``runner_pid``'s socket."""
    return f"r{runner_pid}"


@dataclass(frozen=True)
class VisionFacts:
    """What the HTTP side reads of a runner's vision encoder without a round trip."""

    projector: ProjectorFacts
    media_marker: str
    uses_mrope: bool
    uses_non_causal: bool
    n_embd: int


@dataclass(frozen=True)
class Facts:
    """What the HTTP process needs to know of the loaded model, sent once it is ready."""

    info: ModelInfo
    limits: Limits
    n_threads: int
    n_parallel: int
    fast_paths: Verdict
    attention: AttentionVerdict
    vision: VisionFacts | None = None  # set when the model has a vision projector
