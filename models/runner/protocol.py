"""The messages between the HTTP process and a runner, over one socket pair.

Each message is a tuple whose first item names it, framed and pickled by
``multiprocessing.connection.Connection`` (a length prefix, then the pickle). Token
events are tiny, so one message per event costs a syscall and a small pickle; images
(later) belong in shared memory instead.

HTTP process -> runner:
  (LOAD, EngineConfig, thresholds)      first message; answered by READY or LOAD_FAILED
                                        (thresholds: logger name -> level, see ``logs``)
  (SUBMIT, job_id, GenerationRequest, max_queue)
  (CANCEL, job_id)
  (PREPARING, +1 | -1)                  a request is being prepared for this engine
  (CLOSE,)                              unload: pending jobs end with EngineClosed

runner -> HTTP process:
  (READY, Facts) | (LOAD_FAILED, EngineError)
  (EVENT, job_id, TextDelta | Finished | Failed, n_generated)
  (CLOSED,)
  (LOG, level, logger name, text, pid)  a log record, at any time (also before READY)
"""

from __future__ import annotations

from dataclasses import dataclass

from models.cpu_paths import Verdict
from models.engine.validation import Limits
from telemetry.record import ModelInfo

LOAD = "load"
READY = "ready"
LOAD_FAILED = "load_failed"
SUBMIT = "submit"
CANCEL = "cancel"
PREPARING = "preparing"
EVENT = "event"
CLOSE = "close"
CLOSED = "closed"
LOG = "log"


@dataclass(frozen=True)
class Facts:
    """What the HTTP process needs to know of the loaded model, sent once it is ready."""

    info: ModelInfo
    limits: Limits
    n_threads: int
    n_parallel: int
    fast_paths: Verdict
