"""``POST /v1/chat/completions``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from models.grammars import GrammarError, json_grammar
from models.engine import segment_tokens
from models.registry import LoadedModel
from models.templates import ChatTemplateError
from server.auth import check_api_key
from server.errors import GENERATION_ERRORS, APIError
from server.generation import (Prepared, check_unsupported, execute, max_new_tokens, model_for,
                               new_id, sampling_params)
from server.images import cost_observer, prepare_images
from server.policy.extension import EdgeVLMExtension
from server.prompt import refuse_images_without_projector, render_chat
from server.protocol.chat import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChoiceDelta,
                                  ChunkChoice)
from server.protocol.common import NOT_IN_CHUNKS
from telemetry.record import RequestRecord

router = APIRouter()


def grammar_for(body: ChatCompletionRequest) -> str | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return json_grammar()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise APIError(400, "response_format json_schema needs a 'json_schema.schema' object.",
                       param="response_format", code="invalid_value")
    try:
        return json_grammar(fmt.json_schema.schema_)
    except GrammarError as exc:
        raise APIError(400, f"Unsupported JSON schema: {exc}", param="response_format",
                       code="invalid_value") from exc


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             dependencies=[Depends(check_api_key)], responses=GENERATION_ERRORS)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    check_unsupported(body)
    if body.tools:
        raise APIError(400, "Tool calling is not supported.", param="tools", code="unsupported_value")
    extension = body.edgevlm
    grammar = grammar_for(body)
    # Held until the request is submitted; from then on the busy engine cannot be evicted.
    async with model_for(request, "chat", body.model,
                         lambda spec: refuse_images_without_projector(spec, body.messages)) as (model, load_ms):
        return await _run_chat(body, request, model, extension, grammar, load_ms)


async def _run_chat(body: ChatCompletionRequest, request: Request, model: LoadedModel,
                    extension: EdgeVLMExtension | None, grammar: str | None, load_ms: float) -> Any:
    state = request.app.state
    engine = model.engine
    record = RequestRecord(
        operation="chat", model=engine.info, request_id=new_id("chatcmpl"), stream=body.stream,
        max_tokens=body.max_completion_tokens or body.max_tokens, temperature=body.temperature,
        top_p=body.top_p, seed=body.seed, load_ms=load_ms,
        profile=(extension.profile if extension else None) or state.settings.profile,
    )

    async def prepare() -> Prepared:
        try:
            rendered = await run_in_threadpool(render_chat, body.messages, model, extension=extension,
                                   settings=state.settings, record=record)
        except ChatTemplateError as exc:
            raise APIError(400, f"The messages cannot be formatted for this model: {exc}",
                           param="messages", code="invalid_messages") from exc
        segments = await prepare_images(rendered, model, body, extension, request, record)
        n_prompt = segment_tokens(segments)
        if rendered.images and n_prompt >= engine.n_ctx and rendered.truncate:
            # Images are only sized once encoded: count them exactly and truncate again
            # (the kept images come back from the embedding cache).
            encoded = {rendered.images[im.index].index: im.tokens_after for im in record.images}
            record.images.clear()
            rendered = await run_in_threadpool(render_chat, body.messages, model, extension=extension,
                                   settings=state.settings, record=record, image_tokens=encoded)
            segments = await prepare_images(rendered, model, body, extension, request, record)
            n_prompt = segment_tokens(segments)
        max_tokens = max_new_tokens(body.max_completion_tokens or body.max_tokens, model, n_prompt)
        return Prepared(segments=segments, sampling=sampling_params(body, grammar),
                        max_tokens=max_tokens, stop=body.stop_list(),
                        ignore_eos=body.ignore_eos, prompt_text=rendered.text,
                        speculative=not (extension is not None and extension.speculative is False),
                        on_done=cost_observer(request.app, model))

    created = int(time.time())
    model_id = model.spec.id

    def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
        # Built a few times per stream only: each token reuses a serialised template.
        delta = ChoiceDelta()
        if text is None and finish is None:
            delta = ChoiceDelta(role="assistant", content="")
        elif text is not None:
            delta = ChoiceDelta(content=text)
        return ChatCompletionChunk(id=record.request_id, created=created, model=model_id,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)]
                                   ).model_dump(exclude=set(NOT_IN_CHUNKS))

    def final(text: str, finish: str | None, usage: Any, timings: dict) -> dict[str, Any]:
        return ChatCompletion(
            id=record.request_id, created=created, model=model_id,
            choices=[{"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": finish}],
            usage=usage, timings=timings,
        ).model_dump()

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await execute(request, record, model, prepare, stream=body.stream,
                         include_usage=include_usage, chunk=chunk, final=final)
