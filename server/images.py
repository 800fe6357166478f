"""Images of a chat request: load safely, decide resolution and pruning, encode.

The policy (how many tokens each image is worth, how many rows to keep) is decided
here; the mechanisms (resize, libmtmd encode, prune) live in ``models``.

Per image, in order (DESIGN.md, request path steps 2-5):

1. ``models.images.load_image`` (size caps, bomb guard, EXIF, RGB) -> 400 on bad input;
2. ``policy.resolution.decide_budget`` picks a token budget (request > detail >
   profile, and a TTFT budget may lower a profile's budget);
3. ``models.reduce.plan_resize`` / ``resize_to_plan`` shrink the image to it on the
   projector grid (never upscaling; fixed projectors are left alone; a tiling
   projector's size is planned on the tokens libmtmd makes of it, ``plan_resize_tiling``);
   a zoomed image is cropped first, or, on a tiling projector, becomes several image
   parts (``policy.zoom.zoom_parts``: overview + relevant tiles, one media marker each);
4. ``VisionEncoder.tokenize`` encodes (with its embedding cache) in a worker thread,
   and ``models.reduce.prune`` keeps the rows ``policy.pruning.decide_prune`` asked for
   over all of an image's chunks (a tiling projector's overview and slices, zoom's parts);
5. the result is a list of engine segments, and one ``ImageRecord`` per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from fastapi import FastAPI, Request
from PIL import Image
from starlette.concurrency import run_in_threadpool

from models.engine import ImageSegment, Segment
from models.images import ImageError, ImageLimits, LoadedImage, load_image
from models.clip import tile_grid
from models.reduce import (ResizePlan, plan_resize, plan_resize_tiling, positions_mrope, prune, relevance_for_tokens,
                           resize_to_plan)
from models.registry import LoadedModel
from models.vision import ImageChunk, TextChunk, VisionError, check_image_size
from server.clip import CLIP_NOT_CONFIGURED
from server.errors import APIError
from server.policy.budget import BudgetPlan, CostModel, ImageSpec, plan_for_budget
from server.policy.extension import EdgeVLMExtension
from server.policy.profiles import ProfileSet
from server.policy.pruning import PruneDecision, decide_prune
from server.policy.resolution import BudgetDecision, ContentClass, decide_budget
from server.policy.routing import CONTENT_LABELS, route_content
from server.policy.zoom import ZOOM_MAX_TILES, ZOOM_TILE_PX, ZoomDecision, ZoomParts, decide_zoom, zoom_parts
from server.prompt import RenderedChat
from server.settings import Settings
from telemetry.record import ImageRecord, RequestRecord

__all__ = ["TTFT_BUDGET_HEADER", "cost_model_for", "cost_observer", "image_limits", "prepare_images",
           "segments_from_chunks"]

TTFT_BUDGET_HEADER = "X-EdgeVLM-TTFT-Budget-Ms"
MIN_PREFILL_TOKENS_TO_LEARN = 32
# Budget sources that are the client's own choice for an image (see policy.resolution).
EXPLICIT_SOURCES = ("request", "detail")
# ``relevant`` pruning scores the encoded region on a grid of at most this many tiles
# (about 4 x 4): fine enough to tell a corner from the centre, one small CLIP batch.
RELEVANCE_MAX_TILES = 16


# --------------------------------------------------------------------------- helpers


def image_limits(settings: Settings) -> ImageLimits:
    return ImageLimits(
        max_bytes=settings.max_image_bytes,
        max_pixels=settings.max_image_pixels,
        max_images=max(1, settings.max_images),
        allow_file_dirs=tuple(settings.allow_file_dirs),
        allow_http=settings.allow_http_images,
        allow_hosts=tuple(settings.allow_image_hosts),
        http_timeout_s=settings.http_image_timeout_s,
        http_max_bytes=settings.max_image_bytes,
    )


def cost_model_for(app: FastAPI, model_id: str) -> CostModel:
    """The per-model TTFT cost model kept on the app (created on first use)."""
    models: dict[str, CostModel] = app.state.cost_models
    cm = models.get(model_id)
    if cm is None:
        cm = models[model_id] = CostModel()
    return cm


def cost_observer(app: FastAPI, model: LoadedModel) -> Callable[[RequestRecord], None]:
    """Callback for ``Prepared.on_done``: teach the model's cost model one request's phases."""
    cm = cost_model_for(app, model.spec.id)

    def observe(rec: RequestRecord) -> None:
        if rec.error_type is not None or rec.input_tokens <= 0:
            return
        encoded = sum(im.tokens_before - im.cached_tokens for im in rec.images)
        overhead = rec.ttft_ms - rec.queue_ms - rec.encode_ms - rec.prefill_ms
        # A request that waited for its model to load carries the load and the model's
        # first-use costs (template compile, cold caches) in its TTFT: none of that is a
        # per-request cost, so only its measured encode and prefill rates are learned.
        fresh = rec.load_ms > 0
        # A short prefill (a follow-up turn over a reused prefix) is mostly the fixed cost
        # of one decode call; as a per-token rate it would make every prediction pessimistic.
        prefilled = rec.prefilled_tokens if rec.prefilled_tokens >= MIN_PREFILL_TOKENS_TO_LEARN else 0
        cm.observe(
            rec.encode_ms, encoded, rec.prefill_ms, prefilled,
            overhead_ms=max(0.0, overhead) if rec.ttft_ms > 0 and not fresh else None,
            request_ms=max(0.0, rec.e2e_ms - rec.queue_ms) if rec.e2e_ms > 0 and not fresh else None,
        )

    return observe


def _ttft_budget(extension: EdgeVLMExtension | None, request: Request, settings: Settings) -> tuple[float | None, str | None]:
    if extension is not None and extension.ttft_budget_ms is not None:
        return float(extension.ttft_budget_ms), "request"
    raw = request.headers.get(TTFT_BUDGET_HEADER)
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value <= 0:
            raise APIError(400, f"Header {TTFT_BUDGET_HEADER} must be a positive number of milliseconds, "
                           f"got {raw!r}.", param=TTFT_BUDGET_HEADER, code="invalid_value")
        return value, "header"
    if settings.ttft_budget_ms is not None:
        return float(settings.ttft_budget_ms), "server"
    return None, None


def _image_error(err: ImageError) -> APIError:
    return APIError(400, f"Invalid image: {err}", param="messages", code=err.code)


@dataclass
class _ClipLook:
    """What CLIP saw in one image before the VLM: type label, zoom choice, region relevance."""

    region: Image.Image  # the part of the image to encode (the zoom crop, or all of it)
    label: tuple[str, ContentClass] | None = None
    zoom: ZoomDecision | None = None
    relevance: Any = None  # (rows, cols) scores of the region, for ``relevant`` pruning
    parts: ZoomParts | None = None  # what zoom sends (set once the image's budget is known)
    ms: float = 0.0
    attributes: dict[str, Any] | None = None


def _clip_look(clip: Any, im: LoadedImage, prompt: str, *, route: bool, zoom: bool,
               relevance: bool, tiling: bool = False) -> _ClipLook:
    """Run the CLIP look-ahead one image needs (worker thread; results cached by CLIP).

    On a ``tiling`` projector zoom does not crop: the image is split into parts once
    its budget is known, and each part's relevance is scored then (``_zoom_tiles``).
    """
    look = _ClipLook(region=im.image, attributes={})
    if route:
        probs, ms, _ = clip.classify(im.image, list(CONTENT_LABELS), image_key=im.sha256)
        label, content, attrs = route_content(probs)
        look.label, look.ms = (label, content), look.ms + ms
        look.attributes.update(attrs)
    key = im.sha256
    if zoom:
        cols, rows = tile_grid(im.width, im.height, ZOOM_TILE_PX, ZOOM_MAX_TILES)
        tiles = clip.score_tiles(im.image, prompt, cols, rows, image_key=key)
        look.ms += tiles.ms
        look.zoom = decide_zoom(tiles.scores, im.width, im.height)
        look.attributes.update(look.zoom.attributes())
        if tiling:
            return look
        if look.zoom.crops:
            look.region = im.image.crop(look.zoom.box)
            key = f"{im.sha256}:{look.zoom.box}"
    if relevance:
        look.relevance, ms = _region_relevance(clip, look.region, prompt, key)
        look.ms += ms
    return look


def _region_relevance(clip: Any, region: Image.Image, prompt: str, key: str) -> tuple[Any, float]:
    """CLIP's (rows, cols) scores of ``region`` for ``relevant`` pruning, and their ms."""
    w, h = region.size
    tile = max(1, round(max(w, h) / 4))
    cols, rows = tile_grid(w, h, tile, RELEVANCE_MAX_TILES)
    scores = clip.score_tiles(region, prompt, cols, rows, image_key=key)
    return scores.scores, scores.ms


def _zoom_tiles(im: LoadedImage, parts: ZoomParts, side: int, clip: Any, prompt: str,
                relevance: bool) -> tuple[list[Image.Image], list[Any], float]:
    """The part images of a zoomed image on a tiling projector, their relevance, CLIP ms.

    Each part is shrunk to at most ``side`` (the projector's tile) per side, so libmtmd
    encodes it as one chunk instead of tiling it again; relevance is scored on the
    source pixels of each part.
    """
    images: list[Image.Image] = []
    scores: list[Any] = []
    ms = 0.0
    for box in parts.boxes:
        part = im.image.crop(box)
        if relevance:
            rel, t = _region_relevance(clip, part, prompt, f"{im.sha256}:{box}")
            scores.append(rel)
            ms += t
        scale = min(1.0, side / max(part.size))
        if scale < 1.0:
            size = (max(1, round(part.width * scale)), max(1, round(part.height * scale)))
            part = part.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        images.append(part)
    return images, scores, ms


def _expand_markers(text: str, marker: str, counts: list[int]) -> str:
    """``text`` with its i-th media marker repeated ``counts[i]`` times (one per image part)."""
    pieces = text.split(marker)
    if len(pieces) != len(counts) + 1:
        raise ValueError(f"prompt has {len(pieces) - 1} media markers for {len(counts)} images")
    out = [pieces[0]]
    for n, piece in zip(counts, pieces[1:]):
        out.append(marker * n + piece)
    return "".join(out)


@dataclass
class _ImageWork:
    """One image between policy and encoder."""

    loaded: LoadedImage
    budget: BudgetDecision
    plan: ResizePlan
    encoder_inputs: list[LoadedImage | Image.Image]  # one, or zoom's parts on a tiling projector


# --------------------------------------------------------------------------- request path


async def prepare_images(rendered: RenderedChat, model: LoadedModel, body: Any,
                         extension: EdgeVLMExtension | None, request: Request,
                         record: RequestRecord) -> list[Segment]:
    """The prompt as engine segments: token runs and (pruned) image embeddings."""
    if not rendered.images:
        return [model.engine.tokenize(rendered.text)]
    vision = model.vision
    assert vision is not None, "render_chat refuses images for models without a projector"
    app = request.app
    settings: Settings = app.state.settings
    profiles: ProfileSet = app.state.profiles
    clip = app.state.clip  # models.clip.ClipScorer or None
    limits = image_limits(settings)

    # 2. safe loading (decode and file/http reads off the event loop)
    loaded: list[LoadedImage] = []
    for ref in rendered.images:
        try:
            loaded.append(await run_in_threadpool(load_image, ref.url, ref.index, limits))
            # Judged as the client sent it: the resize below never makes it invalid.
            check_image_size(loaded[-1].width, loaded[-1].height, ref.index)
        except ImageError as err:
            raise _image_error(err) from None
        except ValueError as exc:
            raise APIError(400, f"Invalid image: {exc}", param="messages", code="invalid_image") from None

    facts = vision.projector
    grid = facts.grid()
    model_max = facts.fixed_tokens or facts.max_tokens or 1024
    model_min = 1 if facts.fixed_tokens else (facts.min_tokens or 1)
    profile_name = (extension.profile if extension else None) or settings.profile
    prof = profiles.get(profile_name)
    mw = record.middleware

    # 2b. CLIP look-ahead: zoom, relevance for pruning, image type for auto detail
    mode = (extension.resolution if extension else None) or prof.resolution
    if mode == "zoom" and clip is None:
        if extension is not None and extension.resolution == "zoom":
            raise APIError(400, f"edgevlm.resolution 'zoom' needs CLIP. {CLIP_NOT_CONFIGURED}.",
                           param="edgevlm.resolution", code="clip_not_configured")
        mw["zoom_fallback"] = f"profile {profile_name} prefers zoom but CLIP is not configured: plain resize"
        mode = "resize"
    asked_prune = extension.prune.method if extension is not None and extension.prune is not None else None
    if asked_prune == "relevant" and clip is None:
        raise APIError(400, f"edgevlm.prune method 'relevant' needs CLIP. {CLIP_NOT_CONFIGURED}.",
                       param="edgevlm.prune", code="clip_not_configured")
    wants_relevance = clip is not None and (asked_prune or prof.prune_method) == "relevant"
    route = (clip is not None and prof.content_aware
             and not (extension is not None and extension.max_image_tokens is not None))
    tiling = mode == "zoom" and facts.tiling
    looks: list[_ClipLook] = []
    for ref, im in zip(rendered.images, loaded):
        if clip is None:
            looks.append(_ClipLook(region=im.image))
            continue
        looks.append(await run_in_threadpool(
            _clip_look, clip, im, rendered.prompt_cue, route=route and ref.detail in (None, "auto"),
            zoom=mode == "zoom", relevance=wants_relevance, tiling=tiling))
    sizes = [lk.region.size for lk in looks]
    # M-RoPE models (Qwen2-VL) are causal over image rows; pruning is safe there because
    # kept rows keep their original (t, y, x) positions (engine ImageSegment.positions).
    causal = not vision.uses_non_causal and (not vision.uses_mrope or getattr(model.engine, "mrope", False))

    def budget_for(i: int, ttft_tokens: int | None = None) -> BudgetDecision:
        ref = rendered.images[i]
        try:
            return decide_budget(model_max_tokens=model_max, model_min_tokens=model_min, extension=extension,
                                 detail=ref.detail, profiles=profiles, server_profile=settings.profile,
                                 ttft_tokens=ttft_tokens, image=loaded[i].image, prompt=rendered.prompt_cue,
                                 clip_label=looks[i].label)
        except ValueError as exc:
            raise APIError(400, f"image {ref.index}: {exc}", param="messages", code="invalid_value") from exc

    def plan_for(size: tuple[int, int], tokens: int) -> ResizePlan:
        # A tiling projector's tokens are what libmtmd makes of the size (overview + slices).
        if facts.tiling and facts.image_size:
            return plan_resize_tiling(size[0], size[1], tokens, vision.count_tokens, facts.image_size)
        return plan_resize(size[0], size[1], tokens, grid)

    # 3. resolution: first without the TTFT budget ... (worker thread: counting a tiling
    # projector's tokens asks libmtmd, which may be busy encoding another request)
    budgets = [budget_for(i) for i in range(len(loaded))]
    plans = await run_in_threadpool(lambda: [plan_for(sz, b.tokens) for sz, b in zip(sizes, budgets)])

    # ... then let a TTFT budget lower it (and ask for pruning) where the policy allows.
    budget_ms, budget_from = _ttft_budget(extension, request, settings)
    # One snapshot of the rates for the whole request, so plan and final prediction agree.
    rates = cost_model_for(app, model.spec.id).snapshot()
    engine = model.engine
    queue_depth = engine.queue_depth
    marker = vision.media_marker
    text_tokens = len(engine.tokenize(rendered.text.replace(marker, "")))
    ttft_plan: BudgetPlan | None = None
    # Explicit client choices (max_image_tokens, detail low/high) are final: the budget
    # plans around them and neither lowers nor prunes those images.
    locked = [b.source in EXPLICIT_SOURCES for b in budgets]
    if budget_ms is not None:
        # A tiling projector's floor is one tile (a single chunk).
        spec_grid = replace(grid, min_tokens=facts.tile_tokens) if facts.tiling and facts.tile_tokens else grid
        specs = [ImageSpec(max_tokens=p.tokens, grid=spec_grid, locked=lk) for p, lk in zip(plans, locked)]
        ttft_plan = plan_for_budget(budget_ms, text_tokens, specs, queue_depth, rates, allow_prune=causal)
        for i, ip in enumerate(ttft_plan.images):
            if ip.tokens < plans[i].tokens and not facts.is_fixed and not locked[i]:
                b = budget_for(i, ttft_tokens=ip.tokens)
                if b.tokens != budgets[i].tokens:
                    budgets[i] = b
                    plans[i] = await run_in_threadpool(plan_for, sizes[i], b.tokens)
    ttft_keep = ttft_plan.keep_ratio if ttft_plan is not None else None

    def prune_for(keep: float | None) -> PruneDecision:
        try:
            return decide_prune(extension=extension, profiles=profiles, server_profile=settings.profile,
                                ttft_keep=keep if keep is not None and keep < 1.0 else None,
                                causal_image_attention=causal, relevance_available=clip is not None)
        except ValueError as exc:
            raise APIError(400, f"Invalid pruning request: {exc}", param="edgevlm.prune",
                           code="invalid_value") from exc

    budget_prune, chosen_prune = prune_for(ttft_keep), prune_for(None)
    decisions = [chosen_prune if lk else budget_prune for lk in locked]
    prune_decision = chosen_prune if all(locked) else budget_prune

    work: list[_ImageWork] = []
    relevance: dict[int, Any] = {}  # per encoder input
    owners: list[int] = []  # encoder input -> request image
    for i, (im, b, p, look) in enumerate(zip(loaded, budgets, plans, looks)):
        if look.zoom is not None:
            look.parts = zoom_parts(look.zoom, tiling=tiling, budget_tokens=b.tokens,
                                    part_tokens=facts.tile_tokens, part_px=facts.image_size)
            look.attributes = {**(look.attributes or {}), **look.parts.attributes()}
        if tiling and look.parts is not None:  # zoomed on a tiling projector: overview + tiles
            parts, scores, ms = await run_in_threadpool(_zoom_tiles, im, look.parts, facts.image_size, clip,
                                                        rendered.prompt_cue, wants_relevance)
            look.ms += ms
            relevance.update({len(owners) + j: r for j, r in enumerate(scores)})
            inputs: list[LoadedImage | Image.Image] = list(parts)
        elif look.region is not im.image:  # zoomed: encode the crop at the budget
            inputs = [await run_in_threadpool(resize_to_plan, look.region, p)]
        elif (p.width, p.height) == (im.width, im.height) or facts.is_fixed:
            inputs = [im]  # keeps its pixel hash: no rehash
        else:
            inputs = [await run_in_threadpool(resize_to_plan, im.image, p)]
        if look.relevance is not None:
            relevance[len(owners)] = look.relevance
        owners.extend([i] * len(inputs))
        work.append(_ImageWork(im, b, p, inputs))
    text = _expand_markers(rendered.text, marker, [len(w.encoder_inputs) for w in work])

    # 4. encode (embedding cache inside) and prune, off the event loop
    try:
        chunks, pruned = await run_in_threadpool(_encode_and_prune, vision, text,
                                                 [x for w in work for x in w.encoder_inputs], decisions,
                                                 relevance, grid.align, owners)
    except VisionError as exc:
        raise APIError(exc.status, f"The images could not be encoded: {exc}",
                       param="messages" if exc.status == 400 else None, code=exc.code) from exc
    except ValueError as exc:
        raise APIError(400, f"Invalid image: {exc}", param="messages", code="invalid_image") from exc

    # 5. segments + records
    segments = segments_from_chunks(chunks, engine, pruned)
    parts_of: dict[int, list[ImageChunk]] = {}
    for chunk in chunks:
        if isinstance(chunk, ImageChunk):
            parts_of.setdefault(owners[chunk.index], []).append(chunk)
    for i, parts in parts_of.items():  # one record per request image, over all its parts
        w, look, first = work[i], looks[i], parts[0]
        before = sum(c.n_tokens for c in parts)
        kept_each = [int(pruned[c.index, c.part][0].shape[0]) for c in parts]
        kept = sum(kept_each)
        methods = {pruned[c.index, c.part][1] for c in parts} - {"none"}
        if "relevant" in methods:  # a tiled image's slices fall back to diversity
            methods = {"relevant"}
        if decisions[i].method == "relevant" and decisions[i].active:
            look.attributes = {**(look.attributes or {}),
                               "relevance_parts": _relevance_parts(len(parts), len(w.encoder_inputs))}
        if look.parts is not None:
            look.attributes = {**(look.attributes or {}), "zoom_part_tokens": [c.n_tokens for c in parts],
                               "zoom_part_kept": kept_each}
        record.images.append(ImageRecord(
            index=i, source_width=w.loaded.width, source_height=w.loaded.height,
            encoded_width=first.width, encoded_height=first.height,
            tokens_before=before, tokens_after=kept, encode_ms=sum(c.encode_ms for c in parts),
            cache_hit=all(c.cache_hit for c in parts),
            cached_tokens=sum(c.n_tokens for c in parts if c.cache_hit),
            budget_tokens=w.budget.tokens, budget_source=w.budget.source,
            resize_note=look.parts.reason if look.parts is not None and look.parts.mode == "tiles" else w.plan.note,
            prune_method=methods.pop() if methods else "none",
            prune_keep=round(kept / before, 6) if before else 1.0,
            prune_ms=sum(pruned[c.index, c.part][2] for c in parts),
            clip_ms=round(look.ms, 3), zoom_tiles=list(look.parts.tiles) if look.parts else None,
            zoom_grid=f"{look.zoom.cols}x{look.zoom.rows}" if look.zoom else None,
            zoom_mode=look.parts.mode if look.parts else None,
            zoom_parts=len(parts) if look.parts else None,
            clip_label=look.label[0] if look.label else None,
        ))
    record.encode_ms = sum(im.encode_ms for im in record.images)

    mw["profile"] = profile_name
    mw["resolution_mode"] = mode
    mw.update(prune_decision.attributes())
    mw["images"] = {str(i): {**b.attributes(), **(looks[i].attributes or {})} for i, b in enumerate(budgets)}
    if budget_ms is not None:
        mw["budget_ttft_ms"] = budget_ms
        mw["budget_ttft_source"] = budget_from
    if ttft_plan is not None:
        mw.update(ttft_plan.attributes())
        mw["predicted_ttft_ms"] = round(ttft_plan.predicted_ttft_ms, 3)
    # What the cost model predicts for what is actually prefilled (cache hits encode nothing).
    final = rates.predict_ttft_ms(
        text_tokens, [r.tokens_before - r.cached_tokens for r in record.images], queue_depth,
        [r.tokens_after for r in record.images])
    mw["predicted_ttft_final_ms"] = round(final, 3)
    mw.setdefault("predicted_ttft_ms", round(final, 3))
    if facts.is_fixed:
        mw["resize_note"] = "fixed projector: resizing saves nothing, pruning is the lever"
    return segments


def segments_from_chunks(chunks: list[Any], engine: Any,
                         pruned: dict[tuple[int, int], tuple[Any, str, float, Any]] | None = None) -> list[Segment]:
    """Engine segments from libmtmd chunks (the one place that turns chunks into a prompt).

    The template's BOS is not doubled (as ``engine.tokenize`` does), and each image's
    rows are the kept ones from ``pruned`` (``_encode_and_prune``; all rows when absent)
    with their M-RoPE positions, the image still advancing by its full ``n_pos``.
    """
    segments: list[Segment] = []
    first_text = True
    for chunk in chunks:
        if isinstance(chunk, TextChunk):
            tokens = list(chunk.tokens)
            if first_text and engine.add_bos and len(tokens) > 1 and tokens[0] == tokens[1] == engine.bos_id:
                tokens.pop(0)  # the template wrote a BOS already (as engine.tokenize does)
            first_text = False
            if tokens:
                segments.append(tokens)
            continue
        first_text = False
        emb, method, _, positions = (pruned[chunk.index, chunk.part] if pruned is not None
                                     else (chunk.embeddings, "none", 0.0, chunk.positions))
        part = f"/{chunk.part}" if chunk.part else ""  # a tiled image's slices differ
        segments.append(ImageSegment(
            embeddings=emb, key=f"{chunk.image_hash}:{chunk.width}x{chunk.height}{part}:{method}:{int(emb.shape[0])}",
            non_causal=chunk.non_causal, positions=positions,
            n_pos=chunk.n_pos if positions is not None else None,
        ))
    return segments


def _encode_and_prune(vision: Any, text: str, images: list[Any], decisions: list[PruneDecision],
                      relevance: dict[int, Any] | None = None, align: int = 1,
                      owners: list[int] | None = None,
                      ) -> tuple[list[Any], dict[tuple[int, int], tuple[Any, str, float, Any]]]:
    """Tokenize + encode (worker thread), then keep the rows each image's decision asked for.

    Per image chunk, keyed by (encoder input, part): (embeddings, method, prune ms,
    M-RoPE positions or None). Kept
    rows keep their original M-RoPE positions (``positions_mrope``); the image still
    advances by the full grid's ``n_pos``. ``owners[j]`` is the request image input
    ``j`` belongs to (zoom on a tiling projector sends one image as several parts, and
    libmtmd cuts one input into several chunks there: both are parts of the image);
    ``decisions`` are per request image, and an image's kept count is decided over
    all its parts (``PruneDecision.keep_for_parts``). ``relevance`` holds CLIP's region
    scores per input for ``relevant`` pruning, mapped onto the input's token grid.
    """
    chunks = vision.tokenize(text, images)
    owners = owners if owners is not None else list(range(len(images)))
    groups: dict[int, list[ImageChunk]] = {}
    for chunk in chunks:
        if isinstance(chunk, ImageChunk):
            groups.setdefault(owners[chunk.index], []).append(chunk)
    facts = getattr(vision, "projector", None)
    square = facts is not None and (facts.is_fixed or facts.tiling)
    per_input: dict[int, int] = {}
    for chunk in chunks:
        if isinstance(chunk, ImageChunk):
            per_input[chunk.index] = per_input.get(chunk.index, 0) + 1
    pruned: dict[tuple[int, int], tuple[Any, str, float, Any]] = {}
    for owner, parts in groups.items():
        decision = decisions[owner]
        keeps = decision.keep_for_parts([c.n_tokens for c in parts])
        for chunk, keep in zip(parts, keeps):
            if decision.active and keep < chunk.n_tokens:
                method, rel = decision.method, None
                if method == "relevant":
                    if relevance is not None and chunk.index in relevance and _covers_whole_input(
                            chunk, per_input[chunk.index], facts):
                        nx, ny = _token_grid(chunk, align, square)
                        rel = relevance_for_tokens(relevance[chunk.index], nx, ny, chunk.n_tokens)
                    else:  # a slice of a tiled input: its region is not known, stay question-blind
                        method = "diverse"
                res = prune(chunk.embeddings, keep, method, rel)  # type: ignore[arg-type]
                pos = positions_mrope(chunk.positions, res.indices) if chunk.positions is not None else None
                pruned[chunk.index, chunk.part] = (res.embeddings, method, res.ms, pos)
            else:
                pruned[chunk.index, chunk.part] = (chunk.embeddings, "none", 0.0, chunk.positions)
    return chunks, pruned


def _covers_whole_input(chunk: ImageChunk, n_chunks: int, facts: Any) -> bool:
    """Whether ``chunk`` shows all of the encoder input CLIP scored (so its relevance maps onto it).

    An input libmtmd did not tile is one chunk. A tiled one is an overview (the whole
    input, first or last by projector: ``ProjectorFacts.overview_part``) plus slices
    of a resized, maybe padded copy whose regions libmtmd does not report: only the
    overview qualifies, and the slices are pruned by question-blind diversity.
    """
    if n_chunks == 1:
        return True
    if facts is None:
        return False
    return chunk.part == facts.overview_part % n_chunks


def _relevance_parts(n_chunks: int, n_inputs: int) -> str:
    """What ``relevant`` pruning scored of one image, for the span: whole / parts / overview."""
    if n_inputs > 1:
        return "each zoom part on its own region"
    if n_chunks > 1:
        return "overview only (slice regions unknown); slices pruned by diversity"
    return "whole image"


def _token_grid(chunk: ImageChunk, align: int, square: bool) -> tuple[int, int]:
    """(columns, rows) of an image chunk's tokens, for mapping CLIP's region scores onto them.

    libmtmd reports a real grid only for M-RoPE projectors; for the others its nx is
    the token count and ny is 1. Fixed projectors and the parts a tiling projector
    encodes see the image resized to a square, so a square token count is that grid;
    otherwise the encoded size in ``align`` px cells is (Pixtral's row breaks are
    handled by ``relevance_for_tokens``).
    """
    if chunk.positions is not None and chunk.nx and chunk.ny:
        return chunk.nx, chunk.ny
    side = math.isqrt(chunk.n_tokens)
    if square and side * side == chunk.n_tokens:
        return side, side
    return max(1, chunk.width // align), max(1, chunk.height // align)
