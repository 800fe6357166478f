"""``RunnerEngine``: a model served by a runner process, with an ``Engine``'s front door.

The HTTP process holds one per loaded model in runner mode. Requests go to the runner
over a socket; a reader thread hands the runner's events to each request's sink, as the
in-process engine's worker thread does. Tokenizing and chat templates run here, over a
vocab-only llama.cpp load (vocabulary and metadata: no weights, no context, no compute
threads), so preparing a prompt costs no round trip. A vision model's encoder lives in
the runner too: ``call`` runs one of its methods there (``models.runner.vision``), the
images and embeddings crossing through shared memory (``models.runner.shm``).

When the runner dies, its requests end with ``ModelCrashed`` (503 ``model_crashed``,
naming the signal) and the runner restarts after a backoff; after too many crashes in a
short time the model is marked failed (``failure``) until it is loaded again.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import threading
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Iterator

import llama_cpp
import psutil

from models.engine import EngineClosed, EngineConfig, EngineError, Event, Failed, GenerationRequest, Sink, TextDelta
from models.engine.tokenizer import Tokenizer
from models.engine.types import JobFigures
from models.engine.validation import check_queue, check_request
from models.isolation import exit_reason, module_command
from models.llama_lib import load_vocab
from models.runner import logs, protocol as p
from models.runner.shm import Channel, remove_blocks
from models.runner.cpu_share import CPU_SHARE
from models.runner.supervisor import CrashLog, RestartPolicy

if TYPE_CHECKING:
    from models.vision import VisionConfig

log = logging.getLogger("edgevlm.runner")

CLOSE_TIMEOUT_S = 60.0


class ModelCrashed(EngineError):
    """The runner serving the request died; ``exit_reason`` says how (``SIGSEGV``...)."""

    code = "model_crashed"
    status = 503

    def __init__(self, model_id: str, reason: str):
        super().__init__(f"the runner process of model {model_id} died ({reason}); "
                         "the model is restarting, retry shortly")
        self.exit_reason = reason


class ModelFailed(EngineError):
    """The model's runner crashed too often; it stays down until loaded again."""

    code = "model_failed"
    status = 503


class RemoteJob:
    """A request submitted to a runner; ``cancel()`` is safe from any thread."""

    def __init__(self, job_id: int, sink: Sink, engine: RunnerEngine, conn: Channel):
        self.id = job_id
        self.sink = sink
        self.n_generated = 0
        self.figures = JobFigures()  # the final event's figures, once it came
        self.done = False
        self._engine = engine
        self._conn = conn
        self._cancelled = False

    def cancel(self) -> None:
        if not self.done and not self._cancelled:
            self._cancelled = True
            self._engine._send(self._conn, p.CANCEL, self.id)

    @property
    def cancelled(self) -> bool:
        return self._cancelled


class RunnerEngine(Tokenizer):
    """One model in its own supervised process; see the module docstring."""

    def __init__(self, config: EngineConfig, policy: RestartPolicy | None = None,
                 vision: VisionConfig | None = None):
        self.config = config
        self.vision_config = vision
        self.policy = policy or RestartPolicy()
        self._crashes = CrashLog(self.policy)
        self._cond = threading.Condition()
        self._state = "starting"  # starting | ready | restarting | failed | closed
        self.failure: str | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self._jobs: dict[int, RemoteJob] = {}
        self._calls: dict[int, Future] = {}
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._conn: Channel | None = None
        self._reader: threading.Thread | None = None
        self._vocab_model = self._load_vocab(config)
        try:
            self._start()
        except BaseException:
            self._free_vocab()
            raise
        facts = self.facts
        self.info = facts.info
        self.limits = facts.limits
        self.n_ctx, self.n_embd, self.n_batch = facts.limits.n_ctx, facts.limits.n_embd, facts.limits.n_batch
        self.mrope = facts.limits.mrope
        self.n_threads = facts.n_threads
        self.n_parallel = facts.n_parallel
        self.fast_paths = facts.fast_paths
        self.attention = facts.attention

    # ----------------------------------------------------------- set-up
    def _load_vocab(self, config: EngineConfig) -> llama_cpp.llama_model_p:
        model = load_vocab(config.path)
        if model is None:
            raise EngineError(f"could not read the vocabulary of {config.path}", code="model_load_failed")
        try:
            self._init_tokenizer(model, config.chat_template)
        except BaseException:
            llama_cpp.llama_model_free(model)
            raise
        return model

    def _free_vocab(self) -> None:
        if self._vocab_model:
            llama_cpp.llama_model_free(self._vocab_model)
            self._vocab_model = None

    def _start(self) -> None:
        """Spawn a runner and wait until its model is loaded; raises what the load raised."""
        ours, theirs = socket.socketpair()
        cmd, env = module_command("models.runner.process", str(theirs.fileno()))
        with theirs:
            proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env)
        conn = Channel(Connection(ours.detach()), p.channel_tag(proc.pid))
        try:
            conn.send((p.LOAD, self.config, self.vision_config, logs.thresholds()))
            message = conn.recv()
            while message[0] == p.LOG:  # what the runner logged while loading
                logs.reemit(message)
                message = conn.recv()
        except (EOFError, OSError):
            conn.close()
            reason = exit_reason(proc.wait())
            raise EngineError(f"the runner of model {self.config.model_id} died while loading it ({reason})",
                              code="model_load_failed") from None
        if message[0] != p.READY:
            conn.close()
            _reap(proc)
            raise message[1]
        with self._cond:
            if self._state == "closed":  # unloaded while this runner was starting
                conn.close()
                _reap(proc)
                return
            self.facts = message[1]
            self._proc, self._conn, self._state = proc, conn, "ready"
            self._reader = threading.Thread(target=self._read, args=(conn, proc), daemon=True,
                                            name=f"runner-{self.config.model_id}")
            self._reader.start()
            self._cond.notify_all()
        log.info("model %s: runner pid %d ready", self.config.model_id, proc.pid)

    # ----------------------------------------------------------- events
    def _read(self, conn: Channel, proc: subprocess.Popen) -> None:
        """Deliver the runner's events until it closes or dies, then settle what is left."""
        try:
            while True:
                message = conn.recv()
                if message[0] == p.EVENTS:
                    for event in message[1]:
                        self._deliver(*event)
                elif message[0] == p.EVENT:
                    self._deliver(*message[1:])
                elif message[0] == p.LOG:
                    logs.reemit(message)
                elif message[0] == p.RESULT:
                    self._answer(*message[1:])
                elif message[0] == p.CLOSED:
                    break
        except (EOFError, OSError):
            pass
        conn.close()
        returncode = _reap(proc)
        # Blocks in flight either way are read by nobody now: what the runner made, and
        # what was sent to it and not yet taken.
        remove_blocks(proc.pid)
        remove_blocks(os.getpid(), conn.tag)
        self._ended(returncode)

    def _answer(self, call_id: int, ok: bool, value: Any) -> None:
        with self._cond:
            future = self._calls.pop(call_id, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def _deliver(self, job_id: int, event: Event, n_generated: int) -> None:
        with self._cond:
            job = self._jobs.get(job_id) if isinstance(event, TextDelta) else self._jobs.pop(job_id, None)
            idle = job is not None and not self._jobs
        if idle:  # its cores go back to the models still computing
            CPU_SHARE.update(self)
        if job is None:
            return
        job.n_generated = n_generated
        if not isinstance(event, TextDelta):
            job.figures = event.figures
            job.done = True
        try:
            job.sink(event)
        except Exception:  # e.g. the request's event loop is gone; others still get theirs
            log.warning("could not deliver a runner event", exc_info=True)

    def _ended(self, returncode: int | None) -> None:
        """The runner is gone: end its requests; restart it, or give up, after a crash."""
        reason = exit_reason(returncode)
        with self._cond:
            closing = self._state == "closed"
            pending = list(self._jobs.values())
            calls = list(self._calls.values())
            self._jobs.clear()
            self._calls.clear()
            self._conn = None
            self.last_exit = reason
            if not closing:
                self._crashes.record()
                self._give_up_or_restart_locked(reason)
            self._cond.notify_all()
        CPU_SHARE.forget(self)  # a new runner starts with its own thread count
        if not closing:
            log.error("the runner of model %s died (%s); %d requests failed", self.config.model_id,
                      reason, len(pending))
        error = EngineClosed("the model was unloaded") if closing else ModelCrashed(self.config.model_id, reason)
        for call in calls:
            call.set_exception(error)
        for job in pending:
            job.done = True
            try:
                job.sink(Failed(error, job.figures))
            except Exception:
                log.warning("could not deliver a runner failure", exc_info=True)

    def _give_up_or_restart_locked(self, reason: str) -> None:
        if self._crashes.given_up:
            self._state = "failed"
            self.failure = (f"its runner crashed {len(self._crashes.times)} times within "
                            f"{self.policy.window_s:g} s (last: {reason}); load it again to retry")
            log.error("model %s marked failed: %s", self.config.model_id, self.failure)
            return
        self._state = "restarting"
        threading.Thread(target=self._restart, args=(self._crashes.backoff_s,), daemon=True,
                         name=f"runner-restart-{self.config.model_id}").start()

    def _restart(self, delay: float) -> None:
        with self._cond:
            if self._cond.wait_for(lambda: self._state != "restarting", timeout=delay):
                return  # closed meanwhile
        try:
            self._start()
        except Exception as exc:
            log.error("restarting the runner of model %s failed: %s", self.config.model_id, exc)
            with self._cond:
                if self._state == "restarting":
                    self._crashes.record()
                    self._give_up_or_restart_locked(f"restart failed: {exc}")
                    self._cond.notify_all()
            return
        with self._cond:
            self.restarts += 1

    # ----------------------------------------------------------- front door
    def submit(self, req: GenerationRequest, sink: Sink, *, max_queue: int) -> RemoteJob:
        """Queue a request on the runner; raises at once rather than accept what it cannot serve."""
        check_request(req, self.limits)
        with self._cond:
            self._check_serving_locked()
            check_queue(self.config.model_id, len(self._jobs) - self.n_parallel, max_queue)
            assert self._conn is not None
            job = RemoteJob(next(self._ids), sink, self, self._conn)
            self._jobs[job.id] = job
            first = len(self._jobs) == 1
        if first:  # its share of the cores, told before the request it is for
            CPU_SHARE.update(self)
        self._send(job._conn, p.SUBMIT, job.id, req, max_queue)  # lost only if the runner died: then it fails
        return job

    def call(self, method: str, args: tuple = (), kwargs: dict[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """Run ``method`` (``protocol.VISION_CALLS``) on the runner's vision encoder; blocks.

        Raises what the call raised there (``VisionError``, ``ValueError``...),
        ``ModelCrashed`` when the runner dies meanwhile, ``TimeoutError`` after ``timeout``.
        """
        future: Future = Future()
        with self._cond:
            self._check_serving_locked()
            assert self._conn is not None
            conn, call_id = self._conn, next(self._ids)
            self._calls[call_id] = future
        self._send(conn, p.CALL, call_id, method, args, kwargs or {})  # lost only if the runner died: then it fails
        return future.result(timeout)

    def tell_threads(self, n: int) -> None:
        """Send the runner its share of the cores (``cpu_share``); it computes with ``n``
        threads from its next step on."""
        conn = self._conn
        if conn is not None:
            self._send(conn, p.THREADS, n)

    def _check_serving_locked(self) -> None:
        if self._state == "failed":
            raise ModelFailed(f"model {self.config.model_id} failed: {self.failure}")
        if self._state == "closed":
            raise EngineClosed("the model is being unloaded")
        if self._state != "ready":
            raise EngineError(f"model {self.config.model_id} is restarting after a crash; retry shortly",
                              code="model_restarting", status=503)

    def _send(self, conn: Channel, *message: Any) -> None:
        try:
            conn.send(message)
        except (OSError, ValueError):  # the runner is gone; its reader settles the jobs
            pass

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """As ``Engine.preparing``: the runner's idle engine holds its first step for this request."""
        with self._cond:
            conn = self._conn if self._state == "ready" else None
        if conn is not None:
            self._send(conn, p.PREPARING, 1)
        try:
            yield
        finally:
            if conn is not None:
                self._send(conn, p.PREPARING, -1)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait out a restart; False while it still restarts after ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: self._state not in ("starting", "restarting"), timeout)

    @property
    def state(self) -> str:
        return self._state

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and self._state == "ready" else None

    @property
    def queue_depth(self) -> int:
        return max(0, len(self._jobs) - self.n_parallel)

    @property
    def active(self) -> int:
        return min(len(self._jobs), self.n_parallel)

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    @property
    def memory_bytes(self) -> int:
        """The runner's resident memory: what unloading gives back to the OS."""
        pid = self.pid
        try:
            return psutil.Process(pid).memory_info().rss if pid is not None else 0
        except psutil.Error:
            return 0

    def supervision(self) -> dict[str, Any]:
        """The runner's row for /health: pid, RSS, restarts, last exit, state, and the
        compute threads it was last given (its share of the cores while others compute)."""
        return {"pid": self.pid, "rss_bytes": self.memory_bytes, "restarts": self.restarts,
                "last_exit": self.last_exit, "state": self._state, "failure": self.failure,
                "threads": CPU_SHARE.told(self)}

    def close(self) -> None:
        """Unload: the runner ends its requests (EngineClosed) and exits, freeing its memory."""
        with self._cond:
            if self._state == "closed":
                return
            self._state = "closed"
            conn, proc, reader = self._conn, self._proc, self._reader
            self._cond.notify_all()
        CPU_SHARE.forget(self)
        if conn is not None:
            self._send(conn, p.CLOSE)
        if proc is not None:
            try:
                proc.wait(timeout=CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("the runner of %s did not stop; killing it", self.config.model_id)
                proc.kill()
                proc.wait()
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=CLOSE_TIMEOUT_S)
        self._free_vocab()


def _reap(proc: subprocess.Popen) -> int | None:
    """Wait for a runner that is ending; kill one that does not end."""
    try:
        return proc.wait(timeout=CLOSE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
