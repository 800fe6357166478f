"""Image TTFT on the tiny pixtral VLM: first request vs cached repeat, per image size.

    python -m bench.vision [--model GGUF --mmproj MMPROJ] [--sizes 128 384 768] [--runs 3]

Starts edgevlm in-process (uvicorn on 127.0.0.1, a free port) and reports, per image
size, the median TTFT, encode ms and image tokens of a first (uncached) request and of
a repeat of the same image (embedding cache + KV prefix hit).
"""

from __future__ import annotations

import argparse
import base64
import io
import socket
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import uvicorn
from PIL import Image

from models.registry import model_id_for


@contextmanager
def inprocess_server(model: Path, mmproj: Path, **settings: Any) -> Iterator[tuple[str, str]]:
    """``(base_url, model_id)`` of an edgevlm app served by uvicorn in a thread."""
    from server.app import create_app
    from server.settings import Settings

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings.setdefault("traces", "none")
    settings.setdefault("energy", False)
    app = create_app(Settings(model=str(model), mmproj=str(mmproj), **settings))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("server did not become healthy")
        time.sleep(0.05)
    try:
        yield base, model_id_for(model)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def default_vlm() -> tuple[Path, Path]:
    from bench.tinymodels import tiny_vlm

    return tiny_vlm(Path(tempfile.gettempdir()) / "edgevlm-bench-models", "pixtral")


def data_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def noise_image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    # smooth structure + noise: not "plain" for the content-aware profiles
    y, x = np.mgrid[0:size, 0:size] / max(size, 1)
    base = (np.stack([np.sin(7 * x), np.cos(5 * y), np.sin(3 * (x + y))], -1) + 1) * 100
    arr = np.clip(base + rng.integers(0, 55, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def chat(client: httpx.Client, model_id: str, url: str, prompt: str = "Describe the image.",
         **edgevlm: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model_id, "max_tokens": 1, "temperature": 0,
                            "messages": [{"role": "user", "content": [
                                {"type": "text", "text": prompt},
                                {"type": "image_url", "image_url": {"url": url}}]}]}
    if edgevlm:
        body["edgevlm"] = edgevlm
    r = client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model")
    ap.add_argument("--mmproj")
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 384, 768])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    model, mmproj = (Path(args.model), Path(args.mmproj)) if args.model else default_vlm()
    rows = []
    with inprocess_server(model, mmproj, ctx_size=4096, threads=args.threads) as (base, mid), \
            httpx.Client(base_url=base, timeout=300) as client:
        chat(client, mid, data_uri(noise_image(64, 999)))  # warm-up: first encode allocates graphs
        for size in args.sizes:
            first, repeat = [], []
            for run in range(args.runs):
                url = data_uri(noise_image(size, seed=size * 100 + run))
                first.append(chat(client, mid, url)["timings"])
                repeat.append(chat(client, mid, url)["timings"])
            for label, ts in (("first", first), ("cached", repeat)):
                rows.append((size, label, statistics.median(t["ttft_ms"] for t in ts),
                             statistics.median(t["encode_ms"] for t in ts),
                             statistics.median(t["prefill_ms"] for t in ts),
                             ts[0]["images"][0]["tokens_after"],
                             all(t["images"][0]["cache_hit"] for t in ts),
                             statistics.median(t["prompt_cached_tokens"] for t in ts)))
    print(f"model {model.name}  mmproj {mmproj.name}  (median of {args.runs} runs)")
    print(f"{'size':>5} {'request':>7} {'ttft_ms':>9} {'encode_ms':>9} {'prefill_ms':>10} {'img_tok':>7} "
          f"{'cache_hit':>9} {'kv_cached':>9}")
    for size, label, ttft, enc, pre, tok, hit, kv in rows:
        print(f"{size:>5} {label:>7} {ttft:>9.1f} {enc:>9.2f} {pre:>10.1f} {tok:>7} {str(hit):>9} {kv:>9.0f}")


if __name__ == "__main__":
    main()
