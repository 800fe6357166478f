"""Running one inference request end to end: submit, stream or collect, record.

Chat and text completions differ only in how the prompt is built and how chunks are
shaped; everything else (queueing, cancellation, usage, timings, the telemetry span
ended in the stream's ``finally``) lives here once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from models.engine import EngineError, GenerationRequest, Segment
from models.registry import LoadedModel, ModelSpec
from models.sampling import SamplingParams
from server.errors import APIError, from_engine_error
from server.protocol.common import PromptTokensDetails, SamplingFields, Usage
from server.scheduler import Generation, submit, watch_disconnect
from telemetry.record import ModelInfo, RequestRecord

log = logging.getLogger("edgevlm.generation")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# Shapes one streamed text delta (or the final empty delta) into a response chunk.
ChunkBuilder = Callable[[str | None, str | None], dict[str, Any]]


@dataclass
class Prepared:
    """A request ready to run: what to prefill and how to sample."""

    segments: list[Segment]
    sampling: SamplingParams
    max_tokens: int
    stop: tuple[str, ...]
    prompt_text: str | None = None
    ignore_eos: bool = False
    speculative: bool = True  # the request allows drafting (``edgevlm.speculative``)
    # Called with the finished record (e.g. to teach the TTFT cost model); errors ignored.
    on_done: Callable[[RequestRecord], None] | None = None


class ClientDisconnected(Exception):
    """The client closed the connection; recorded on the span, never sent anywhere."""


def trace_refusal(request: Request, operation: str, model_id: str | None,
                  exc: EngineError | APIError) -> None:
    """A span for a request refused before its model was ready (unknown model, failed load)."""
    record = RequestRecord(operation=operation, model=ModelInfo(model_id=model_id or "default"),
                           error_type=exc.code)
    started = getattr(request.state, "arrival", time.perf_counter())
    record.e2e_ms = (time.perf_counter() - started) * 1000.0
    request.app.state.telemetry.begin(operation, record.model.model_id, request.headers).finish(record, exc)


@asynccontextmanager
async def model_for(request: Request, operation: str, model_id: str | None,
                    check: Callable[[ModelSpec], None] | None = None
                    ) -> AsyncIterator[tuple[LoadedModel, float]]:
    """The request's model, held until submit, and the ms spent waiting for it to load.

    ``check`` may refuse the request from the model's spec before anything is loaded
    (a load can evict a model in use). A refusal here (unknown model, failed load,
    ``check``) leaves a span, as no other exists yet. The wait is reported as
    ``load_ms`` apart from TTFT's phases, so the cost model does not learn a load as
    per-request overhead.
    """
    registry = request.app.state.registry
    try:
        spec = registry.resolve(model_id)
        if check is not None:
            check(spec)
        was_loaded = registry.is_loaded(spec.id)
        started = time.perf_counter()
        model = await registry.acquire(spec.id)
    except (EngineError, APIError) as exc:
        trace_refusal(request, operation, model_id, exc)
        raise
    try:
        yield model, 0.0 if was_loaded else (time.perf_counter() - started) * 1000.0
    finally:
        registry.release(model)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def check_unsupported(body: SamplingFields) -> None:
    """Known OpenAI parameters we cannot honour are a 400, never silently ignored.

    Fields we do not know at all are ignored (``extra="ignore"`` in
    ``server.protocol.common``): newer OpenAI clients send new parameters, and an
    OpenAI-compatible server must not refuse them.
    """
    if body.n != 1:
        raise APIError(400, "Only n=1 is supported; send several requests instead.",
                       param="n", code="unsupported_value")
    if body.logprobs:
        raise APIError(400, "logprobs are not supported.", param="logprobs", code="unsupported_value")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported.", param="logit_bias", code="unsupported_value")


def sampling_params(body: SamplingFields, grammar: str | None) -> SamplingParams:
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=body.seed, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repeat_penalty=body.repeat_penalty,
        grammar=grammar,
    )


def max_new_tokens(requested: int | None, model: LoadedModel, n_prompt: int) -> int:
    room = model.engine.n_ctx - n_prompt
    return max(1, min(requested, room) if requested else room)


def _usage(rec: RequestRecord) -> Usage:
    return Usage(prompt_tokens=rec.input_tokens, completion_tokens=rec.output_tokens,
                 total_tokens=rec.input_tokens + rec.output_tokens,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=rec.cached_tokens))


async def execute(request: Request, record: RequestRecord, model: LoadedModel,
                  prepare: Callable[[], Awaitable[Prepared]], *, stream: bool, include_usage: bool,
                  chunk: ChunkBuilder, final: Callable[[str, str | None, Usage, dict], Any]) -> Any:
    """Prepare (images, prompt), submit, and answer as a stream or a single body.

    The span opens before ``prepare`` so image loading and encoding are inside it, and a
    request refused at any point (bad image, full queue, too long) still leaves a span.
    Until it is submitted the request counts as arriving on the model's engine, so
    requests that come in together share the idle engine's first step.
    """
    app = request.app
    rec = record
    started = time.perf_counter()
    trace = app.state.telemetry.begin(rec.operation, rec.model.model_id, request.headers)
    engine = model.engine
    with engine.preparing():
        try:
            prepared = await prepare()
        except BaseException as exc:
            if rec.error_type is None:
                rec.error_type = getattr(exc, "code", None) or type(exc).__name__
            rec.e2e_ms = (time.perf_counter() - started) * 1000.0
            trace.finish(rec, exc)
            if isinstance(exc, EngineError):
                raise from_engine_error(exc) from exc
            raise
        if app.state.settings.capture_content:
            rec.prompt_text = prepared.prompt_text
        gen_request = GenerationRequest(
            segments=prepared.segments, sampling=prepared.sampling, max_tokens=prepared.max_tokens,
            stop=prepared.stop, ignore_eos=prepared.ignore_eos, speculative=prepared.speculative,
            arrival=request.state.arrival,
        )
        try:
            gen = submit(model, gen_request, max_queue=app.state.settings.max_queue, record=rec)
        except EngineError as exc:
            if exc.status == 429:
                app.state.telemetry.rejected(rec.model.model_id)
            rec.error_type = exc.code
            rec.e2e_ms = (time.perf_counter() - started) * 1000.0
            trace.finish(rec, exc)
            raise from_engine_error(exc) from exc

    def close(error: BaseException | None) -> None:
        rec.e2e_ms = (time.perf_counter() - request.state.arrival) * 1000.0
        if app.state.settings.capture_content:
            rec.completion_text = gen.text
        if gen.finish_reason == "cancelled" and error is None:
            error = ClientDisconnected("the client went away before the answer was complete")
        if isinstance(error, (asyncio.CancelledError, GeneratorExit, ClientDisconnected)):
            rec.error_type = "client_disconnected"
            rec.finish_reason = "cancelled"
            if gen.job is not None:
                if not gen.ended:  # its final event comes later: take the figures so far
                    dataclasses.replace(gen.job.figures).fill(rec)
                rec.output_tokens = max(rec.output_tokens, gen.job.n_generated)
        elif error is not None and rec.error_type is None:
            rec.error_type = getattr(error, "code", type(error).__name__)
        if error is None and prepared.on_done is not None:
            try:
                prepared.on_done(rec)
            except Exception:  # learning must never fail a finished request
                log.warning("request completion hook failed", exc_info=True)
        trace.finish(rec, error)

    headers = {"traceparent": trace.traceparent}
    if stream:
        return StreamingResponse(
            _stream(gen, rec, include_usage, chunk, close),
            media_type="text/event-stream", headers={**SSE_HEADERS, **headers},
        )

    watcher = asyncio.create_task(watch_disconnect(request, gen))
    error: BaseException | None = None
    try:
        async for _ in gen.deltas():
            pass
    except EngineError as exc:
        error = exc
        raise from_engine_error(exc) from exc
    except BaseException as exc:
        error = exc
        gen.cancel()
        raise
    finally:
        watcher.cancel()
        close(error)
    return JSONResponse(final(gen.text, gen.finish_reason, _usage(rec), rec.timings()), headers=headers)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


_MARK = "\u0000edgevlm-delta\u0000"


def _delta_encoder(chunk: ChunkBuilder) -> Callable[[str], bytes]:
    """SSE bytes for one text delta without rebuilding and re-serialising the whole chunk.

    The chunk is serialised once around a marker; each token then costs one
    ``json.dumps`` of its text, which matters on a 2-core box where the event loop
    competes with the decode threads.
    """
    template = json.dumps(chunk(_MARK, None), separators=(",", ":"))
    head, _, tail = template.partition(json.dumps(_MARK))
    prefix, suffix = b"data: " + head.encode(), tail.encode() + b"\n\n"
    return lambda text: prefix + json.dumps(text).encode() + suffix


async def _stream(gen: Generation, rec: RequestRecord, include_usage: bool, chunk: ChunkBuilder,
                  close: Callable[[BaseException | None], None]) -> AsyncIterator[bytes]:
    error: BaseException | None = None
    encode = _delta_encoder(chunk)
    try:
        yield _sse(chunk(None, None))  # role announcement, sent at once
        async for text in gen.deltas():
            yield encode(text)
        last = chunk(None, gen.finish_reason)
        last["timings"] = rec.timings()
        yield _sse(last)
        if include_usage:
            tail = chunk(None, None)
            tail["choices"] = []
            tail["usage"] = _usage(rec).model_dump()
            yield _sse(tail)
        yield b"data: [DONE]\n\n"
    except EngineError as exc:
        error = exc
        yield _sse(from_engine_error(exc).body())
        yield b"data: [DONE]\n\n"
    except BaseException as exc:  # client went away (CancelledError/GeneratorExit)
        error = exc
        gen.cancel()
        raise
    finally:
        gen.cancel()  # no-op when finished; frees the slot when the client vanished
        close(error)
