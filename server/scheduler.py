"""The front door between HTTP requests and engine workers.

Each loaded model has one engine worker with a bounded wait queue (``max_queue``); a
full queue is refused at once with 429 and ``Retry-After`` instead of growing without
bound. Engine events arrive on the worker thread and are handed to the request's
event loop, which copies the engine's figures from the final event into the
request's telemetry record (the worker never writes the record); a client that goes away cancels its job, which frees the slot within one
decode step.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from dataclasses import dataclass, field
from typing import AsyncIterator

from starlette.requests import Request

from models.engine import Event, Failed, Finished, GenerationRequest, Job, TextDelta
from models.registry import LoadedModel
from telemetry.record import RequestRecord


@dataclass
class Generation:
    """One submitted job, seen from asyncio."""

    job: Job | None = None
    record: RequestRecord | None = None  # filled from the final event, on the event loop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    finish_reason: str | None = None
    error: Exception | None = None
    text_parts: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    async def deltas(self) -> AsyncIterator[str]:
        """Yield text as it arrives; sets ``finish_reason`` or raises the engine's error."""
        held: Event | None = None
        while True:
            event: Event = held if held is not None else await self.queue.get()
            held = None
            if isinstance(event, TextDelta):
                # Deltas that piled up while the loop was busy go out as one chunk.
                text = event.text
                while not self.queue.empty():
                    nxt = self.queue.get_nowait()
                    if not isinstance(nxt, TextDelta):
                        held = nxt
                        break
                    text += nxt.text
                self.text_parts.append(text)
                yield text
            elif isinstance(event, Finished):
                if self.record is not None:
                    event.figures.fill(self.record)
                    self.record.finish_reason = event.reason
                self.finish_reason = event.reason
                return
            elif isinstance(event, Failed):
                if self.record is not None:
                    event.figures.fill(self.record)
                    self.record.error_type = getattr(event.error, "code", type(event.error).__name__)
                    self.record.runner_exit = getattr(event.error, "exit_reason", None)
                self.error = event.error
                raise event.error

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def ended(self) -> bool:
        """Whether the engine's final event (and so its figures) has been taken."""
        return self.finish_reason is not None or self.error is not None


class _Mailbox:
    """Engine events bound for one event loop, delivered with one wake-up per batch.

    A decode step emits a token for every running stream at once; waking the loop once
    for all of them, instead of once each, leaves the cores to the next step.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = weakref.ref(loop)  # a strong one would keep its _mailboxes entry alive
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Event]] = []

    def post(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._items.append((queue, event))
            if len(self._items) > 1:
                return  # a delivery is already scheduled and will take this one too
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the request's event loop is gone")
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is left to deliver to
            with self._lock:
                self._items.clear()
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, event in items:
            queue.put_nowait(event)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()


def _mailbox_for(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's one mailbox, shared by every request on it (and gone with the loop)."""
    mailbox = _mailboxes.get(loop)
    if mailbox is None:
        mailbox = _mailboxes[loop] = _Mailbox(loop)
    return mailbox


def submit(model: LoadedModel, request: GenerationRequest, *, max_queue: int,
           record: RequestRecord | None = None) -> Generation:
    """Queue ``request`` on the model's worker; raises QueueFull/PromptTooLong at once.

    ``record`` gets the engine's figures when ``Generation.deltas`` takes the final event.
    """
    mailbox = _mailbox_for(asyncio.get_running_loop())
    gen = Generation(record=record)

    def sink(event: Event) -> None:
        mailbox.post(gen.queue, event)

    gen.job = model.engine.submit(request, sink, max_queue=max_queue)
    return gen


async def watch_disconnect(request: Request, gen: Generation) -> None:
    """Cancel the generation when the client disconnects (non-streaming requests)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            gen.cancel()
            return
