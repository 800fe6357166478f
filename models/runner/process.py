"""A runner: one model's llama.cpp ``Engine`` (and vision encoder) in its own process.

Started by ``models.runner.client`` as ``python -m models.runner.process FD``, where FD
is this end of a socket pair. The main thread reads requests; the engine's worker
thread sends each step's events back in one message; vision calls (tokenize and
encode images) run on a small pool so the main thread still reads CANCEL and SUBMIT
meanwhile. When the HTTP process goes away (the socket reaches EOF) the runner closes
its engine and exits, so no runner outlives its server; it then removes the
shared-memory blocks nobody will read.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

from models.engine import Engine, EngineConfig, EngineError, Event, Failed, Job, TextDelta
from models.engine.types import JobFigures
from models.runner import logs, protocol as p
from models.runner.shm import Channel, remove_blocks
from models.vision import VisionConfig, VisionEncoder, VisionError
from telemetry.record import peak_rss_bytes

# Vision calls at once: encodes serialize on the encoder's lock, but a tiling
# projector's token counts (placeholder tokenizes) need not queue behind one.
VISION_WORKERS = 4

log = logging.getLogger("edgevlm.runner")


class Runner:
    """Serves one connection: requests in, events out."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.server_pid = os.getppid()  # now: once the server is gone the runner is reparented
        self.engine: Engine | None = None
        self.vision: VisionEncoder | None = None
        self.jobs: dict[int, Job] = {}
        self._step_events: list[tuple[int, Event, int]] = []  # the engine worker's, until it flushes
        self._preparing: list[contextlib.AbstractContextManager] = []
        self._calls = ThreadPoolExecutor(VISION_WORKERS, thread_name_prefix="vision")

    def send(self, *message: Any) -> None:
        self.channel.send(message)

    def load(self, config: EngineConfig, vision: VisionConfig | None) -> bool:
        try:
            self.engine = Engine(config)
            self.engine.flushed = self.send_step_events
            if vision is not None:
                self.vision = vision.load(self.engine.model, self.engine.n_threads)
        except Exception as exc:
            if self.engine is not None:
                self.engine.close()
            error = exc if isinstance(exc, (EngineError, VisionError)) else EngineError(
                f"could not load model {config.model_id}: {exc}", code="model_load_failed")
            self.send(p.LOAD_FAILED, error)
            return False
        e, v = self.engine, self.vision
        vision_facts = None if v is None else p.VisionFacts(
            projector=v.projector, media_marker=v.media_marker, uses_mrope=v.uses_mrope,
            uses_non_causal=v.uses_non_causal, n_embd=v.n_embd)
        self.send(p.READY, p.Facts(info=e.info, limits=e.limits, n_threads=e.n_threads,
                                   n_parallel=e.n_parallel, fast_paths=e.fast_paths, attention=e.attention,
                                   vision=vision_facts))
        return True

    def call(self, call_id: int, method: str, args: tuple, kwargs: dict[str, Any]) -> None:
        """Run one vision call and send its RESULT (the exception it raised, as is)."""
        try:
            if self.vision is None or method not in p.VISION_CALLS:
                raise VisionError(f"this runner has no vision call {method!r}", code="vision_error")
            value = self.vision.cache.stats() if method == "cache_stats" else getattr(self.vision, method)(*args, **kwargs)
            result: tuple = (p.RESULT, call_id, True, value)
        except Exception as exc:
            result = (p.RESULT, call_id, False, _portable(exc))
        self.channel.send(result)

    def sink_for(self, job_id: int) -> Any:
        def sink(event: Event) -> None:
            job = self.jobs.get(job_id)
            n_generated = job.n_generated if job is not None else 0
            if not isinstance(event, TextDelta):
                self.jobs.pop(job_id, None)
                # the model's memory: the server's own peak no longer holds it
                event.figures.runner_peak_rss_bytes = peak_rss_bytes()
            self._step_events.append((job_id, event, n_generated))
        return sink

    def send_step_events(self) -> None:
        """The engine handed over a step's events (its worker thread): send them as one message.

        Four streams' tokens in four messages woke the HTTP process's reader thread and
        event loop four times a step, on the cores llama.cpp's threads compute on.
        """
        if self._step_events:
            events, self._step_events = self._step_events, []
            self.send(p.EVENTS, events)

    def serve(self) -> None:
        """Handle messages until CLOSE or the HTTP process goes away."""
        assert self.engine is not None
        engine = self.engine
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                log.warning("the server went away; runner for %s exits", engine.config.model_id)
                # Nobody reads what this runner sent, or what was sent to it, any more.
                remove_blocks(os.getpid())
                remove_blocks(self.server_pid, self.channel.tag)
                break
            kind = message[0]
            if kind == p.SUBMIT:
                _, job_id, request, max_queue = message
                try:
                    self.jobs[job_id] = engine.submit(request, self.sink_for(job_id), max_queue=max_queue)
                except EngineError as exc:  # refused here although the client's checks passed
                    self.send(p.EVENT, job_id, Failed(exc, JobFigures()), 0)
            elif kind == p.THREADS:
                engine.set_threads(message[1])
            elif kind == p.CANCEL:
                job = self.jobs.get(message[1])
                if job is not None:
                    job.cancel()
            elif kind == p.PREPARING:
                if message[1] > 0:
                    cm = engine.preparing()
                    cm.__enter__()
                    self._preparing.append(cm)
                elif self._preparing:
                    self._preparing.pop().__exit__(None, None, None)
            elif kind == p.CALL:
                _, call_id, method, args, kwargs = message
                if method == "cache_stats":
                    self.call(call_id, method, args, kwargs)
                else:
                    self._calls.submit(self.call, call_id, method, args, kwargs)
            elif kind == p.CLOSE:
                break
        self._calls.shutdown(wait=True, cancel_futures=True)  # no encode may outlive the encoder
        if self.vision is not None:
            self.vision.close()
        engine.close()  # pending jobs end with EngineClosed, sent before CLOSED
        with contextlib.suppress(OSError):
            self.send(p.CLOSED)


def _portable(exc: Exception) -> Exception:
    """``exc`` if it survives a pickle round trip (the HTTP side re-raises it as is), else a
    ``VisionError`` with its text: one that fails to unpickle there would stop the reader."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return VisionError(f"{type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s runner %(process)d %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the server decides when runners stop (it
    # closes them, or its exit ends the socket), and a runner that died of the key
    # press would be taken for a crash and restarted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = Channel(Connection(int(argv[0])), p.channel_tag(os.getpid()))
    try:
        message = channel.recv()
    except EOFError:
        return 1
    if message[0] != p.LOAD:
        return 2
    runner = Runner(channel)
    # From here on records go to the HTTP process's logging, under its thresholds.
    logs.apply_thresholds(message[3])
    logs.forward_records(runner.send)
    if runner.load(message[1], message[2]):
        runner.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
