"""``POST /v1/completions`` (legacy text completions)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from models.registry import LoadedModel
from server.auth import check_api_key
from server.errors import GENERATION_ERRORS, APIError
from server.generation import (Prepared, check_unsupported, execute, max_new_tokens, model_for,
                               new_id, sampling_params)
from server.protocol.common import NOT_IN_CHUNKS
from server.protocol.completions import Completion, CompletionChoice, CompletionRequest
from telemetry.record import RequestRecord

router = APIRouter()


@router.post("/v1/completions", response_model=Completion, dependencies=[Depends(check_api_key)],
             responses=GENERATION_ERRORS)
async def completions(body: CompletionRequest, request: Request) -> Any:
    check_unsupported(body)
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported.", param="suffix",
                       code="unsupported_value")
    if body.best_of not in (None, 1):
        raise APIError(400, "Only best_of=1 is supported.", param="best_of", code="unsupported_value")
    # Held until the request is submitted; from then on the busy engine cannot be evicted.
    async with model_for(request, "text_completion", body.model) as (model, load_ms):
        return await _run_completion(body, request, model, load_ms)


async def _run_completion(body: CompletionRequest, request: Request, model: LoadedModel,
                          load_ms: float) -> Any:
    prompt = body.prompt
    engine = model.engine
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        n_vocab = engine.n_vocab
        if any(p < 0 or p >= n_vocab for p in prompt):
            raise APIError(400, f"Token ids must be in [0, {n_vocab}).", param="prompt",
                           code="invalid_value")
        tokens = list(prompt)
        text = engine.detokenize(tokens)
    else:
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, "Send one prompt per request (a list of several prompts is "
                               "not supported).", param="prompt", code="unsupported_value")
            prompt = prompt[0]
        text = str(prompt)
        tokens = await run_in_threadpool(engine.tokenize, text)
    record = RequestRecord(
        operation="text_completion", model=engine.info, request_id=new_id("cmpl"),
        stream=body.stream, max_tokens=body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, load_ms=load_ms,
        profile=request.app.state.settings.profile,
    )
    async def prepare() -> Prepared:
        return Prepared(segments=[tokens], sampling=sampling_params(body, None),
                        max_tokens=max_new_tokens(body.max_tokens, model, len(tokens)),
                        stop=body.stop_list(), ignore_eos=body.ignore_eos, prompt_text=text,
                        speculative=not (body.edgevlm is not None and body.edgevlm.speculative is False))

    created = int(time.time())
    model_id = model.spec.id
    echo = text if body.echo else ""

    def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
        piece = delta if delta is not None else (echo if finish is None else "")
        # A streamed piece is a text_completion object too (OpenAI's legacy stream).
        return Completion(id=record.request_id, created=created, model=model_id,
                          choices=[CompletionChoice(text=piece, finish_reason=finish)]
                          ).model_dump(exclude=set(NOT_IN_CHUNKS))

    def final(out: str, finish: str | None, usage: Any, timings: dict) -> dict[str, Any]:
        return Completion(id=record.request_id, created=created, model=model_id,
                          choices=[{"index": 0, "text": echo + out, "finish_reason": finish}],
                          usage=usage, timings=timings).model_dump()

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await execute(request, record, model, prepare, stream=body.stream,
                         include_usage=include_usage, chunk=chunk, final=final)
