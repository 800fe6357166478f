"""A runner: one model's llama.cpp ``Engine`` in its own process, driven over a socket.

Started by ``models.runner.client`` as ``python -m models.runner.process FD``, where FD
is this end of a socket pair. The main thread reads requests; the engine's worker
thread sends events back as it emits them. When the HTTP process goes away (the socket
reaches EOF) the runner closes its engine and exits, so no runner outlives its server.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from models.engine import Engine, EngineConfig, EngineError, Event, Failed, Job, TextDelta
from models.engine.types import JobFigures
from models.runner import logs, protocol as p

log = logging.getLogger("edgevlm.runner")


class Runner:
    """Serves one connection: requests in, events out."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self._send_lock = threading.Lock()
        self.engine: Engine | None = None
        self.jobs: dict[int, Job] = {}
        self._preparing: list[contextlib.AbstractContextManager] = []

    def send(self, *message: Any) -> None:
        with self._send_lock:
            self.conn.send(message)

    def load(self, config: EngineConfig) -> bool:
        try:
            self.engine = Engine(config)
        except Exception as exc:
            error = exc if isinstance(exc, EngineError) else EngineError(
                f"could not load model {config.model_id}: {exc}", code="model_load_failed")
            self.send(p.LOAD_FAILED, error)
            return False
        e = self.engine
        self.send(p.READY, p.Facts(info=e.info, limits=e.limits, n_threads=e.n_threads,
                                   n_parallel=e.n_parallel, fast_paths=e.fast_paths))
        return True

    def sink_for(self, job_id: int) -> Any:
        def sink(event: Event) -> None:
            job = self.jobs.get(job_id)
            n_generated = job.n_generated if job is not None else 0
            if not isinstance(event, TextDelta):
                self.jobs.pop(job_id, None)
            self.send(p.EVENT, job_id, event, n_generated)
        return sink

    def serve(self) -> None:
        """Handle messages until CLOSE or the HTTP process goes away."""
        assert self.engine is not None
        engine = self.engine
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                log.warning("the server went away; runner for %s exits", engine.config.model_id)
                break
            kind = message[0]
            if kind == p.SUBMIT:
                _, job_id, request, max_queue = message
                try:
                    self.jobs[job_id] = engine.submit(request, self.sink_for(job_id), max_queue=max_queue)
                except EngineError as exc:  # refused here although the client's checks passed
                    self.send(p.EVENT, job_id, Failed(exc, JobFigures()), 0)
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
            elif kind == p.CLOSE:
                break
        engine.close()  # pending jobs end with EngineClosed, sent before CLOSED
        with contextlib.suppress(OSError):
            self.send(p.CLOSED)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s runner %(process)d %(levelname)s %(name)s: %(message)s")
    # Ctrl-C reaches the whole process group: the server decides when runners stop (it
    # closes them, or its exit ends the socket), and a runner that died of the key
    # press would be taken for a crash and restarted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(int(argv[0]))
    try:
        message = conn.recv()
    except EOFError:
        return 1
    if message[0] != p.LOAD:
        return 2
    runner = Runner(conn)
    # From here on records go to the HTTP process's logging, under its thresholds.
    logs.apply_thresholds(message[2])
    logs.forward_records(runner.send)
    if runner.load(message[1]):
        runner.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
