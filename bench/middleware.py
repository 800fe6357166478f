"""Accuracy for speed: image tokens, encode/prefill ms and TTFT per middleware setting.

    python -m bench.middleware [--model GGUF --mmproj MMPROJ] [--size 768] [--runs 5]

For profiles quality / balanced / fast and prune keep ratios 1.0 / 0.5 / 0.25 (quality
resolution, diverse pruning) this prints the median image tokens, encode ms, prefill ms
and TTFT over ``--runs`` requests (each run changes one pixel, so neither the embedding
cache nor the KV prefix can serve it), plus accuracy on a procedurally generated visual
QA set (coloured shapes, counts, printed digits and words; ground truth known).

With CLIP (the clip extra; a tiny random-weight open_clip model unless --clip-model,
--clip-checkpoint and --clip-config name one) it adds ``zoom`` and ``relevant`` pruning,
the CLIP stage's ms per image, and a CLIPScore column: image vs the generated answer, a
reference-free *proxy* for caption quality, not accuracy.

With the default tiny random-weight VLM the accuracy column is meaningless (the model
has never seen an image); it becomes meaningful with a real VLM (--model/--mmproj).
Finally it checks that ``fast`` cuts image tokens >= 4x and TTFT >= 2x vs ``quality``.
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image, ImageDraw, ImageFont

from bench.vision import chat, data_uri, default_vlm, inprocess_server, noise_image

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (235, 200, 20)}
SHAPES = ("circle", "square", "triangle")
WORDS = ("PUMP", "VALVE", "MOTOR", "STOP", "LINE")


@dataclass(frozen=True)
class QAItem:
    image: Image.Image
    question: str
    answer: str  # lower-case; correct when it appears as a word in the reply


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _shape(draw: ImageDraw.ImageDraw, kind: str, box: tuple[int, int, int, int], fill: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse(box, fill=fill)
    elif kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def visual_qa(n: int, size: int, seed: int = 0) -> list[QAItem]:
    """``n`` questions cycling through colour, shape, count, digits and word reading."""
    rng = random.Random(seed)
    items: list[QAItem] = []
    for i in range(n):
        img = Image.new("RGB", (size, size), (245, 245, 240))
        d = ImageDraw.Draw(img)
        kind = i % 5
        s = size // 3
        if kind in (0, 1):
            colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            c = size // 2
            _shape(d, shape, (c - s, c - s, c + s, c + s), COLOURS[colour])
            q, a = (("What colour is the shape? Answer with one word.", colour) if kind == 0 else
                    ("Is the shape a circle, a square or a triangle? Answer with one word.", shape))
        elif kind == 2:
            count = rng.randint(1, 5)
            r = size // 14
            for j in range(count):
                x = (j + 1) * size // (count + 1)
                d.ellipse((x - r, size // 2 - r, x + r, size // 2 + r), fill=COLOURS["blue"])
            q, a = "How many blue dots are there? Answer with a digit.", str(count)
        elif kind == 3:
            digits = "".join(rng.choice("0123456789") for _ in range(3))
            d.text((size // 6, size // 3), digits, fill=(0, 0, 0), font=_font(size // 4))
            q, a = "What number is printed? Answer with the digits only.", digits
        else:
            word = rng.choice(WORDS)
            d.text((size // 8, size // 3), word, fill=(0, 0, 0), font=_font(size // 6))
            q, a = "What word is printed? Answer with one word.", word.lower()
        items.append(QAItem(img, q, a))
    return items


SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("profile=quality", {"profile": "quality"}),
    ("profile=balanced", {"profile": "balanced"}),
    ("profile=fast", {"profile": "fast"}),
    ("prune keep=1.0", {"profile": "quality", "prune": {"method": "diverse", "keep": 1.0}}),
    ("prune keep=0.5", {"profile": "quality", "prune": {"method": "diverse", "keep": 0.5}}),
    ("prune keep=0.25", {"profile": "quality", "prune": {"method": "diverse", "keep": 0.25}}),
]
# Question-aware settings (need CLIP): compare with the question-blind lines above.
CLIP_SETTINGS: list[tuple[str, dict[str, Any]]] = [
    ("zoom", {"profile": "quality", "resolution": "zoom"}),
    ("relevant keep=0.5", {"profile": "quality", "prune": {"method": "relevant", "keep": 0.5}}),
    ("relevant keep=0.25", {"profile": "quality", "prune": {"method": "relevant", "keep": 0.25}}),
]


def accuracy(client: httpx.Client, model_id: str, qa: list[QAItem], ext: dict[str, Any],
             scorer: Any = None) -> tuple[float, float | None]:
    """Share of correct answers, and the mean CLIPScore of the answers (``scorer`` given)."""
    correct = 0
    scores: list[float] = []
    for item in qa:
        body = {"model": model_id, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_uri(item.image)}},
                    {"type": "text", "text": item.question}]}], "edgevlm": ext}
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        reply = (r.json()["choices"][0]["message"]["content"] or "").lower()
        correct += bool(re.search(rf"\b{re.escape(item.answer)}\b", reply))
        if scorer is not None:
            scores.append(scorer.clip_score(item.image, reply))
    return (correct / len(qa) if qa else 0.0), (statistics.mean(scores) if scores else None)


def clip_options(args: argparse.Namespace) -> dict[str, str]:
    """Server settings for CLIP: the named model, or a tiny random one; {} without the extra."""
    if args.no_clip:
        return {}
    if args.clip_model:
        return {k: v for k, v in (("clip_model", args.clip_model), ("clip_checkpoint", args.clip_checkpoint),
                                  ("clip_config", args.clip_config)) if v}
    try:
        from bench.tinyclip import TINY_CLIP_NAME, tiny_clip
    except ImportError:
        return {}
    try:
        config, checkpoint = tiny_clip(Path(tempfile.gettempdir()) / "edgevlm-bench-clip")
    except ImportError:
        return {}
    return {"clip_model": TINY_CLIP_NAME, "clip_checkpoint": str(checkpoint), "clip_config": str(config)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--size", type=int, default=768, help="source image side (px)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--qa", type=int, default=10, help="visual QA items per setting")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clip-model", help="open_clip model name (default: a tiny random one)")
    ap.add_argument("--clip-checkpoint")
    ap.add_argument("--clip-config")
    ap.add_argument("--no-clip", action="store_true", help="skip the CLIP lines")
    args = ap.parse_args(argv)
    tiny = not args.model
    model, mmproj = (Path(args.model), Path(args.mmproj)) if args.model else default_vlm()
    qa = visual_qa(args.qa, 384)
    results: dict[str, dict[str, Any]] = {}
    clip = clip_options(args)
    settings = SETTINGS + (CLIP_SETTINGS if clip else [])
    with inprocess_server(model, mmproj, ctx_size=4096, threads=args.threads, **clip) as (base, mid), \
            httpx.Client(base_url=base, timeout=600) as client:
        scorer = None
        if clip:
            from models.clip import ClipScorer, ClipSpec

            scorer = ClipScorer.load(ClipSpec(clip["clip_model"], clip.get("clip_checkpoint"),
                                              clip.get("clip_config")))
        chat(client, mid, data_uri(noise_image(64, 12345)))  # warm-up
        base_img = noise_image(args.size, seed=7)
        n = 0
        for label, ext in settings:
            ts = []
            for run in range(args.runs):
                n += 1
                img = base_img.copy()
                step = max(1, args.size // 8)  # cache-buster in every region, so zoom crops miss too
                for y in range(step // 2, args.size, step):
                    for x in range(step // 2, args.size, step):
                        img.putpixel((x, y), (n * 37 % 256, 0, 255))
                ts.append(chat(client, mid, data_uri(img), **ext)["timings"])
            im = [t["images"][0] for t in ts]
            results[label] = {
                "tokens_before": statistics.median(i["tokens_before"] for i in im),
                "tokens": statistics.median(i["tokens_after"] for i in im),
                "encode_ms": statistics.median(t["encode_ms"] for t in ts),
                "prefill_ms": statistics.median(t["prefill_ms"] for t in ts),
                "ttft_ms": statistics.median(t["ttft_ms"] for t in ts),
                "hits": sum(i["cache_hit"] for i in im),
                "clip_ms": statistics.median(i.get("clip_ms", 0.0) for i in im),
            }
            results[label]["acc"], results[label]["clipscore"] = accuracy(client, mid, qa, ext, scorer)
    print(f"model {model.name}  mmproj {mmproj.name}  source {args.size}x{args.size}  "
          f"median of {args.runs} runs  visual QA n={len(qa)}")
    if clip:
        print(f"CLIP {clip['clip_model']}" + ("  (tiny, random weights)" if not args.clip_model else ""))
    print(f"{'setting':<19} {'clip_ms':>7} {'enc_tok':>7} {'img_tok':>7} {'encode_ms':>9} {'prefill_ms':>10} "
          f"{'ttft_ms':>8} {'accuracy':>8} {'clipscore*':>10}")
    for label, r in results.items():
        cs = f"{r['clipscore']:>10.3f}" if r["clipscore"] is not None else f"{'-':>10}"
        print(f"{label:<19} {r['clip_ms']:>7.1f} {r['tokens_before']:>7.0f} {r['tokens']:>7.0f} {r['encode_ms']:>9.1f} "
              f"{r['prefill_ms']:>10.1f} {r['ttft_ms']:>8.1f} {r['acc']:>8.2f} {cs}")
    if clip:
        print("* clipscore: CLIPScore(image, answer), a reference-free PROXY for answer quality"
              + (" (MEANINGLESS with the tiny random CLIP)" if not args.clip_model else ""))
    if any(r["hits"] for r in results.values()):
        print("warning: some runs hit the embedding cache")
    if tiny:
        print("accuracy: MEANINGLESS here (random-weight tiny VLM); meaningful with a real VLM via --model/--mmproj")
    q, f = results["profile=quality"], results["profile=fast"]
    tok_x = q["tokens"] / max(f["tokens"], 1)
    ttft_x = q["ttft_ms"] / max(f["ttft_ms"], 1e-9)
    print(f"fast vs quality: image tokens {tok_x:.1f}x fewer ({'PASS' if tok_x >= 4 else 'FAIL'} >= 4x), "
          f"TTFT {ttft_x:.1f}x lower ({'PASS' if ttft_x >= 2 else 'FAIL'} >= 2x)")


if __name__ == "__main__":
    main()
