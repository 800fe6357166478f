"""server.policy: the per-request decisions, exercised the way a route would call them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from models.reduce import ProjectorGrid, plan_resize
from server.policy import (
    DEFAULT_PROFILES,
    CostModel,
    ImageSpec,
    ProfileSet,
    PromptTooLongError,
    decide_budget,
    decide_prune,
    image_stats,
    parse_extension,
    plan_for_budget,
    truncate_messages,
)
from server.policy.resolution import classify_content, prompt_text_cue

QWEN_MAX = 1280  # a dynamic projector's max tokens
QWEN2VL = ProjectorGrid(patch_size=14, merge=2, min_tokens=4, max_tokens=QWEN_MAX)
GEMMA3 = ProjectorGrid(patch_size=14, merge=4, fixed_tokens=256, image_size=896)


def text_image(size: tuple[int, int] = (800, 600), font_size: int = 16) -> Image.Image:
    """A label / document: black text lines on white."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    line = "SERIAL NO 4711-XZ 0815  PRESSURE 12.5 BAR  LOT 22/07 " * 2
    for y in range(10, size[1] - font_size, int(font_size * 1.6)):
        draw.text((10, y), line, fill="black", font_size=font_size)
    return img


def gradient_scene(size: tuple[int, int] = (800, 600)) -> Image.Image:
    """A smooth sky-like colour gradient with nothing to read."""
    w, h = size
    g = np.linspace(0, 1, w)[None, :] * np.linspace(0.3, 1, h)[:, None]
    rgb = np.stack([0.2 + 0.5 * g, 0.4 + 0.4 * g, 1 - 0.3 * g], axis=-1)
    return Image.fromarray((rgb * 255).astype(np.uint8))


# --------------------------------------------------------------------------- extension


def test_extension_accepts_documented_shape() -> None:
    ext = parse_extension(
        {
            "profile": "fast",
            "max_image_tokens": 256,
            "prune": {"method": "diverse", "keep": 0.5},
            "ttft_budget_ms": 800,
            "truncate": True,
        }
    )
    assert ext is not None and ext.profile == "fast" and ext.prune is not None
    assert ext.prune.keep == 0.5 and ext.ttft_budget_ms == 800.0 and ext.truncate is True
    assert parse_extension({"prune": {"method": "uniform", "keep": 100}}).prune.keep == 100  # type: ignore[union-attr]
    assert parse_extension(None) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"profile": "turbo"},
        {"max_image_tokens": 0},
        {"max_image_tokens": 12.5},
        {"max_image_tokens": True},
        {"prune": {"method": "random", "keep": 0.5}},
        {"prune": {"method": "diverse", "keep": 1.5}},
        {"prune": {"method": "diverse", "keep": 0}},
        {"prune": {"method": "diverse", "keep": True}},
        {"prune": {"method": "diverse", "keep": 0.5, "extra": 1}},
        {"ttft_budget_ms": -5},
        {"ttft_budget_ms": float("inf")},
        {"truncate": "yes"},
        {"unknown_knob": 1},
        "fast",
    ],
)
def test_extension_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValidationError):
        parse_extension(bad)


# --------------------------------------------------------------------------- profiles


def test_fast_profile_cuts_image_tokens_at_least_4x_vs_quality() -> None:
    q = DEFAULT_PROFILES.quality.image_tokens(QWEN_MAX)
    b = DEFAULT_PROFILES.balanced.image_tokens(QWEN_MAX)
    f = DEFAULT_PROFILES.fast.image_tokens(QWEN_MAX)
    assert q == QWEN_MAX and b == QWEN_MAX // 2
    assert q / f >= 4
    assert DEFAULT_PROFILES.fast.image_tokens(100) == 64  # min 64 for small models
    # ... and after resizing a real photo size to those budgets, too.
    assert plan_resize(4032, 3024, q, QWEN2VL).tokens / plan_resize(4032, 3024, f, QWEN2VL).tokens >= 4


def test_profiles_are_configurable_and_strict() -> None:
    ps = ProfileSet.model_validate({"fast": {"image_budget": 100, "prune_method": "uniform"}, "default": "fast"})
    assert ps.get(None).image_tokens(QWEN_MAX) == 100
    with pytest.raises(ValidationError):
        ProfileSet.model_validate({"fast": {"image_budget": 2.0}})
    with pytest.raises(ValidationError):
        ProfileSet.model_validate({"turbo": {}})


# --------------------------------------------------------------------------- resolution


def test_budget_precedence_request_over_detail_over_profile_over_ttft() -> None:
    fast = parse_extension({"profile": "fast"})
    explicit = parse_extension({"profile": "fast", "max_image_tokens": 300})

    d = decide_budget(model_max_tokens=QWEN_MAX, extension=explicit, detail="high", ttft_tokens=50)
    assert (d.tokens, d.source) == (300, "request")

    d = decide_budget(model_max_tokens=QWEN_MAX, extension=fast, detail="low", ttft_tokens=10)
    assert (d.tokens, d.source) == (64, "detail")
    d = decide_budget(model_max_tokens=QWEN_MAX, extension=fast, detail="high")
    assert (d.tokens, d.source) == (QWEN_MAX, "detail")

    d = decide_budget(model_max_tokens=QWEN_MAX, extension=fast, detail="auto")
    assert (d.tokens, d.source, d.profile) == (213, "profile", "fast")
    d = decide_budget(model_max_tokens=QWEN_MAX, server_profile="balanced")
    assert (d.tokens, d.profile) == (640, "balanced")
    d = decide_budget(model_max_tokens=QWEN_MAX)  # server default: quality
    assert (d.tokens, d.source) == (QWEN_MAX, "profile")

    # The TTFT budget only lowers a profile budget ...
    d = decide_budget(model_max_tokens=QWEN_MAX, ttft_tokens=400)
    assert (d.tokens, d.source) == (400, "ttft_budget")
    d = decide_budget(model_max_tokens=QWEN_MAX, extension=fast, ttft_tokens=900)
    assert (d.tokens, d.source) == (213, "profile")


def test_budget_is_clamped_to_model_limits() -> None:
    d = decide_budget(model_max_tokens=QWEN_MAX, extension=parse_extension({"max_image_tokens": 99999}))
    assert d.tokens == QWEN_MAX
    d = decide_budget(model_max_tokens=32, detail="low")  # a small model: low can't exceed max
    assert d.tokens == 32
    with pytest.raises(ValueError):
        decide_budget(model_max_tokens=QWEN_MAX, detail="ultra")


def test_image_statistics_separate_text_from_smooth_scene() -> None:
    text, scene = image_stats(text_image()), image_stats(gradient_scene())
    assert max(text.thumb_width, text.thumb_height) <= 128
    assert text.edge_density > 5 * max(scene.edge_density, 0.01)
    assert classify_content(text) == "text"
    assert classify_content(scene) == "plain"
    assert classify_content(image_stats(text_image(font_size=12))) == "text"
    assert classify_content(image_stats(text_image(font_size=40))) == "text"


def test_prompt_cues() -> None:
    assert prompt_text_cue("What does it say on the sign?") == "what does it say"
    assert prompt_text_cue("Read the gauge please") == "read"
    assert prompt_text_cue("what's the SERIAL on the plate") == "serial"
    assert prompt_text_cue("Describe the landscape.") is None
    assert prompt_text_cue("a thread of bread") is None  # whole words only
    assert classify_content(image_stats(gradient_scene()), prompt_text_cue("read the digits")) == "text"


def test_content_aware_profile_gives_text_more_and_plain_scenes_fewer_tokens() -> None:
    ext = parse_extension({"profile": "balanced"})
    base = DEFAULT_PROFILES.balanced.image_tokens(QWEN_MAX)
    t = decide_budget(model_max_tokens=QWEN_MAX, extension=ext, image=text_image(), prompt="describe")
    s = decide_budget(model_max_tokens=QWEN_MAX, extension=ext, image=gradient_scene(), prompt="describe")
    cue = decide_budget(model_max_tokens=QWEN_MAX, extension=ext, image=gradient_scene(), prompt="Read the label")
    assert t.content == "text" and t.tokens == min(QWEN_MAX, 2 * base)
    assert s.content == "plain" and s.tokens == base // 2
    assert cue.content == "text" and cue.prompt_cue == "read" and cue.tokens == 2 * base
    assert t.stats is not None and "stats.edge_density" in t.attributes()
    # quality is not content-aware: always the model max, no stats computed.
    q = decide_budget(model_max_tokens=QWEN_MAX, image=gradient_scene())
    assert q.tokens == QWEN_MAX and q.stats is None and q.content is None


# --------------------------------------------------------------------------- pruning


def test_prune_precedence_request_over_profile_over_ttft() -> None:
    req = parse_extension({"profile": "fast", "prune": {"method": "merge", "keep": 0.8}})
    d = decide_prune(extension=req, ttft_keep=0.3, causal_image_attention=True)
    assert (d.method, d.keep, d.source) == ("merge", 0.8, "request")
    assert d.keep_for(100) == 80

    d = decide_prune(extension=parse_extension({"profile": "fast"}), causal_image_attention=True)
    assert (d.method, d.keep, d.source) == ("diverse", 0.5, "profile")
    d = decide_prune(extension=parse_extension({"profile": "fast"}), ttft_keep=0.3, causal_image_attention=True)
    assert (d.method, d.keep, d.source) == ("diverse", 0.3, "ttft_budget")
    d = decide_prune(extension=parse_extension({"profile": "fast"}), ttft_keep=0.9, causal_image_attention=True)
    assert d.keep == 0.5  # the TTFT budget never raises keep

    d = decide_prune(causal_image_attention=True)  # quality: no pruning
    assert not d.active and d.keep_for(576) == 576 and d.refused_reason is None
    d = decide_prune(ttft_keep=0.4, causal_image_attention=True)  # ... unless the budget needs it
    assert d.method == "diverse" and d.keep_for(576) == round(576 * 0.4)

    d = decide_prune(extension=parse_extension({"prune": {"method": "uniform"}}), server_profile="balanced",
                     causal_image_attention=True)
    assert (d.method, d.keep) == ("uniform", 0.75)  # keep omitted -> profile's keep
    d = decide_prune(extension=parse_extension({"prune": {"method": "uniform", "keep": 64}}),
                     causal_image_attention=True)
    assert d.keep_for(576) == 64 and d.keep_for(10) == 10


def test_prune_refused_for_non_causal_or_unknown_models() -> None:
    ext = parse_extension({"prune": {"method": "diverse", "keep": 0.5}})
    gemma = decide_prune(extension=ext, causal_image_attention=False)
    assert not gemma.active and gemma.keep_for(256) == 256
    assert gemma.refused_reason and "non-causal" in gemma.refused_reason
    unknown = decide_prune(extension=ext, causal_image_attention=None)
    assert not unknown.active and unknown.refused_reason and "unknown" in unknown.refused_reason
    assert "prune_refused" in unknown.attributes()
    none = decide_prune(extension=parse_extension({"prune": {"method": "none", "keep": 0.5}}))
    assert not none.active and none.refused_reason is None


# --------------------------------------------------------------------------- TTFT budget


def test_cost_model_learns_from_observations() -> None:
    cm = CostModel(encode_ms_per_token=8.0, prefill_ms_per_token=4.0, overhead_ms=20.0)
    before = cm.snapshot().predict_ttft_ms(100, [500])
    assert before == pytest.approx(20 + 8 * 500 + 4 * 600)
    for _ in range(30):  # the device is really 2 ms/token encode, 1 ms/token prefill
        cm.observe(encode_ms=1000.0, image_tokens=500, prefill_ms=600.0, prefill_tokens=600)
    est = cm.snapshot()
    assert est.encode_ms_per_token == pytest.approx(2.0)
    assert est.prefill_ms_per_token == pytest.approx(1.0)
    assert est.observations == 30
    # Cache hit / text-only requests leave the encode rate alone.
    cm.observe(encode_ms=0.0, image_tokens=0, prefill_ms=50.0, prefill_tokens=50)
    assert cm.snapshot().encode_ms_per_token == pytest.approx(2.0)
    # Pruning shrinks only the prefill term; queue depth adds waiting time.
    assert cm.snapshot().predict_ttft_ms(100, [500], kept_tokens_each=[250]) < cm.snapshot().predict_ttft_ms(100, [500])
    assert cm.snapshot().predict_ttft_ms(100, [500], queue_depth=2) > cm.snapshot().predict_ttft_ms(100, [500])


def test_cost_model_from_warmup_and_thread_safety() -> None:
    cm = CostModel.from_warmup(encode_ms=300.0, image_tokens=100, prefill_ms=150.0, prefill_tokens=150)
    assert cm.snapshot().encode_ms_per_token == pytest.approx(3.0)

    def worker() -> None:
        for _ in range(200):
            cm.observe(300.0, 100, 150.0, 150)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cm.snapshot().observations == 800


def test_budget_plan_meets_budget_and_tightens_with_queue() -> None:
    cm = CostModel(encode_ms_per_token=2.0, prefill_ms_per_token=1.0, overhead_ms=20.0, request_ms=500.0)
    images = [ImageSpec(QWEN_MAX, QWEN2VL), ImageSpec(QWEN_MAX, QWEN2VL)]

    full = plan_for_budget(10_000, 50, images, 0, cm.snapshot())
    assert full.achievable and [im.tokens for im in full.images] == [QWEN_MAX, QWEN_MAX]

    plan = plan_for_budget(2000, 50, images, 0, cm.snapshot())
    assert plan.achievable and plan.predicted_ttft_ms <= 2000
    assert all(64 <= im.tokens < QWEN_MAX for im in plan.images)
    assert plan.predicted_ttft_ms == pytest.approx(
        cm.snapshot().predict_ttft_ms(50, [im.tokens for im in plan.images], 0, [im.keep_tokens for im in plan.images])
    )

    queued = plan_for_budget(2000, 50, images, 2, cm.snapshot())
    assert queued.achievable and queued.predicted_ttft_ms <= 2000
    assert sum(im.tokens for im in queued.images) < sum(im.tokens for im in plan.images)
    assert queued.queue_wait_ms == 1000.0

    # At floor resolution the planner prunes.
    pruned = plan_for_budget(20 + 50 + 2 * 64 * 2 + 64 + 20, 50, images, 0, cm.snapshot())
    assert pruned.achievable and [im.tokens for im in pruned.images] == [64, 64]
    assert pruned.keep_ratio < 1.0 and pruned.predicted_ttft_ms <= pruned.budget_ms

    text_only = plan_for_budget(100, 50, [], 0, cm.snapshot())
    assert text_only.achievable and text_only.images == () and text_only.predicted_ttft_ms == 70.0

    hopeless = plan_for_budget(100, 50, images, 5, cm.snapshot())
    assert not hopeless.achievable and hopeless.predicted_ttft_ms > 100
    assert hopeless.keep_ratio == pytest.approx(0.25)  # the cheapest plan allowed
    assert "not achievable" in hopeless.reason


def test_budget_plan_for_fixed_projector_only_prunes() -> None:
    cm = CostModel(encode_ms_per_token=2.0, prefill_ms_per_token=1.0, overhead_ms=0.0)
    plan = plan_for_budget(2 * 256 + 100 + 128, 100, [ImageSpec(256, GEMMA3)], 0, cm.snapshot())
    assert plan.images[0].tokens == 256 and plan.images[0].keep_tokens == 128
    assert plan.achievable and plan.predicted_ttft_ms <= plan.budget_ms
    # The plan's keep ratio, fed to the pruning policy, keeps no more than planned.
    d = decide_prune(ttft_keep=plan.keep_ratio, causal_image_attention=True)
    assert d.keep_for(256) <= plan.images[0].keep_tokens


# --------------------------------------------------------------------------- truncation


def _count(messages: list) -> int:
    return sum(len(str(m["content"]).split()) + 3 for m in messages)


def test_truncation_keeps_system_and_last_user_turn() -> None:
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one " * 50},
        {"role": "assistant", "content": "reply one " * 10},
        {"role": "user", "content": "two " * 50},
        {"role": "assistant", "content": "reply two"},
        {"role": "user", "content": "three"},
    ]
    full = _count(msgs)
    assert truncate_messages(msgs, _count, full) == (msgs, 0)

    kept, dropped = truncate_messages(msgs, _count, full - 10)
    assert kept == [msgs[0], *msgs[3:]]  # the oldest whole turn (user + reply) went
    assert dropped == full - _count(kept)

    kept, dropped = truncate_messages(msgs, _count, 20)
    assert kept == [msgs[0], msgs[5]]
    assert dropped == full - _count(kept)

    with pytest.raises(PromptTooLongError) as err:
        truncate_messages(msgs, _count, 5)
    assert err.value.minimum_tokens == _count([msgs[0], msgs[5]])


def test_truncation_keeps_system_messages_in_the_middle_and_tool_turns_whole() -> None:
    msgs = [
        {"role": "user", "content": "a " * 30},
        {"role": "assistant", "content": "calling", "tool_calls": []},
        {"role": "tool", "content": "result " * 30},
        {"role": "system", "content": "late instruction"},
        {"role": "user", "content": "b"},
    ]
    kept, dropped = truncate_messages(msgs, _count, 20)
    assert kept == [msgs[3], msgs[4]]
    assert dropped == _count(msgs) - _count(kept)


def test_budget_plan_keeps_locked_images_as_the_client_chose() -> None:
    cm = CostModel(encode_ms_per_token=2.0, prefill_ms_per_token=1.0, overhead_ms=20.0)
    chosen, free = ImageSpec(QWEN_MAX, QWEN2VL, locked=True), ImageSpec(QWEN_MAX, QWEN2VL)
    plan = plan_for_budget(50, 50, [chosen, free], 0, cm.snapshot())
    assert plan.images[0].tokens == plan.images[0].keep_tokens == QWEN_MAX
    assert plan.images[1].tokens == 64 and plan.images[1].keep_tokens < 64
    only = plan_for_budget(50, 50, [chosen], 0, cm.snapshot())
    assert only.keep_ratio == 1.0 and not only.achievable and "explicit" in only.reason


def test_cost_model_is_not_swung_by_an_outlier() -> None:
    cm = CostModel.from_warmup(encode_ms=300.0, image_tokens=100, prefill_ms=150.0, prefill_tokens=150)
    before = cm.snapshot().predict_ttft_ms(100, [500])
    # A single 20x slower request right after the warm-up (a page-in, a burst elsewhere) ...
    cm.observe(encode_ms=6000.0, image_tokens=100, prefill_ms=3000.0, prefill_tokens=150)
    assert cm.snapshot().predict_ttft_ms(100, [500]) == pytest.approx(before)
    # ... or later, among ordinary ones.
    for _ in range(4):
        cm.observe(encode_ms=310.0, image_tokens=100, prefill_ms=155.0, prefill_tokens=150, overhead_ms=20.0)
    steady = cm.snapshot().predict_ttft_ms(100, [500])
    cm.observe(encode_ms=6000.0, image_tokens=100, prefill_ms=3000.0, prefill_tokens=150, overhead_ms=5000.0)
    assert cm.snapshot().predict_ttft_ms(100, [500]) == pytest.approx(steady, rel=0.05)
    # A lasting change takes over once it is most of what was seen recently.
    for _ in range(15):
        cm.observe(encode_ms=600.0, image_tokens=100, prefill_ms=300.0, prefill_tokens=150)
    assert cm.snapshot().encode_ms_per_token == pytest.approx(6.0)
