"""Several models on one server: does a second loaded model slow the first?

    python -m bench.multimodel [--runs 3] [--tokens 200] [--modes on,off] [--threads N]

Three models are served from one ``--models-dir``: two byte-for-byte copies of the
default model (``main`` and ``second``) and the tiny test VLM (``vlm``, asked about an
image). For each runner mode (``--runners on``: one process per model; ``off``: every
model in the server process) the benchmark runs two servers side by side:

* **alone**: ``--max-loaded-models 1``, so each model is measured with nothing else
  loaded (asking for the next model evicts the previous one);
* **together**: ``--max-loaded-models 3``; all three stay loaded (the others idle
  while one decodes), and ``main`` and ``second`` also decode at the same time (both
  busy, sharing the cores).

Each model's two figures are taken back to back, in an order that flips every
repetition, so the drift of a shared machine (often larger than what is measured)
hits both alike. Per mode it prints decode tok/s (medians of ``--runs`` streamed
requests of ``--tokens`` tokens at temperature 0) alone and together and the median of
the paired ratios; for both busy at once, each repetition's sum against the mean of
``main`` and ``second`` alone in that repetition. Then the start-up time (``edgevlm
serve`` launch to ``/health`` 200 with the default model, median of 3) and, with
runners, the resident memory each runner process holds.

Targets (runner mode): each model together >= 0.95x alone; both busy at once combined
>= 0.9x of one model alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.client import BenchClient, fmt, print_table
from bench.edgevlm_server import edgevlm_server, health_models
from bench.harness import write_json
from bench.model_files import require_default_model
from bench.process import RunningServer, default_threads
from bench.prompts import chat_prompt, new_salt
from bench.vision import data_uri, noise_image

MODELS = ("main", "second", "vlm")
CTX_SIZE = 2048
ALONE_TARGET = 0.95
COMBINED_TARGET = 0.9


def model_dir(root: Path) -> Path:
    """``main.gguf`` and ``second.gguf`` (copies of the default model) and the tiny VLM with its projector."""
    from bench.tinymodels import tiny_vlm

    d = root / "models"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("main", "second"):
        shutil.copyfile(require_default_model(), d / f"{name}.gguf")
    llm, mmproj = tiny_vlm(root / "tiny", "mlp")
    shutil.copyfile(llm, d / "vlm.gguf")
    shutil.copyfile(mmproj, d / "mmproj-vlm.gguf")
    return d


def messages(name: str, nonce: str) -> list[dict[str, Any]]:
    """A short chat prompt; the VLM's also carries an image (its encoder runs too)."""
    msgs = chat_prompt(40, nonce)
    if name == "vlm":
        image = {"type": "image_url", "image_url": {"url": data_uri(noise_image(96, seed=len(nonce)))}}
        msgs[-1] = {"role": "user", "content": [image, {"type": "text", "text": msgs[-1]["content"]}]}
    return msgs


class Session:
    """One client per model on one server."""

    def __init__(self, server: RunningServer, tokens: int):
        self.server = server
        self.tokens = tokens
        self.clients = {n: BenchClient(server.base_url, n) for n in MODELS}
        self.salt = new_salt()
        self.count = 0

    async def decode_tps(self, name: str, tokens: int | None = None) -> float:
        self.count += 1
        result = await self.clients[name].chat(messages(name, f"{self.salt}-{self.count}"),
                                               max_tokens=tokens or self.tokens)
        if result.decode_tps is None:
            raise RuntimeError(f"{name}: no decode figure (got {result.completion_tokens} tokens)")
        return result.decode_tps

    async def aclose(self) -> None:
        for c in self.clients.values():
            await c.aclose()


@contextlib.contextmanager
def serving(mode: str, models: Path, threads: int, max_loaded: int) -> Iterator[RunningServer]:
    args = ["--models-dir", str(models), "--max-loaded-models", str(max_loaded), "--runners", mode]
    with edgevlm_server(threads=threads, ctx_size=CTX_SIZE, parallel=1, extra_args=args) as server:
        yield server


def startup_s(mode: str, threads: int, starts: int = 3) -> float:
    """Median launch to ``/health`` 200 (the default model loaded) of ``edgevlm serve``,
    after one start not counted (it may run the fast-path self-test; later ones reuse
    the verdict)."""
    times = []
    for i in range(starts + 1):
        start = time.perf_counter()
        with edgevlm_server(threads=threads, ctx_size=CTX_SIZE, parallel=1, extra_args=["--runners", mode]):
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


async def measure(alone: Session, together: Session, runs: int) -> dict[str, Any]:
    """Per repetition and model: its decode on the ``alone`` server (nothing else loaded:
    asking for it evicts the previous one) and on the ``together`` server (all three
    loaded), back to back in an order that flips every repetition, so the drift of a
    shared machine hits both figures of a pair alike; then ``main`` and ``second`` at
    once on the ``together`` server (their tok/s and its sum)."""
    for name in MODELS:
        await together.decode_tps(name, tokens=16)  # all three loaded and warm
    out: dict[str, Any] = {"alone": {n: [] for n in MODELS}, "together": {n: [] for n in MODELS},
                           "both_busy": [], "both_each": []}
    for rep in range(runs):
        for name in (MODELS if rep % 2 == 0 else tuple(reversed(MODELS))):
            await alone.decode_tps(name, tokens=16)  # loads it and warms it up
            pair = (alone, together) if rep % 2 == 0 else (together, alone)
            for session in pair:
                out["alone" if session is alone else "together"][name].append(await session.decode_tps(name))
        a, b = await asyncio.gather(together.decode_tps("main"), together.decode_tps("second"))
        out["both_busy"].append(a + b)
        out["both_each"].extend([a, b])
    return out


async def in_sessions(servers: tuple[RunningServer, RunningServer], tokens: int, runs: int) -> dict[str, Any]:
    """``measure`` with clients opened and closed in this event loop."""
    alone, together = Session(servers[0], tokens), Session(servers[1], tokens)
    try:
        return await measure(alone, together, runs)
    finally:
        await alone.aclose()
        await together.aclose()


def runner_rss(server: RunningServer) -> dict[str, int]:
    """Resident bytes of each model's runner process, from /health."""
    return {mid: row["runner"]["rss_bytes"] for mid, row in health_models(server).items() if row.get("runner")}


def server_rss(server: RunningServer) -> int:
    import psutil

    return psutil.Process(server.process.pid).memory_info().rss


def run_mode(mode: str, models: Path, args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {"mode": mode}
    figures["startup_s"] = startup_s(mode, args.threads)
    with serving(mode, models, args.threads, max_loaded=1) as alone, \
            serving(mode, models, args.threads, max_loaded=3) as together:
        figures.update(asyncio.run(in_sessions((alone, together), args.tokens, args.runs)))
        figures.update(runner_rss=runner_rss(together), server_rss=server_rss(together))
    return figures


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    med = statistics.median
    rows = []
    for r in results:
        for name in MODELS:
            alone, together = r["alone"][name], r["together"][name]
            ratio = med([t / a for a, t in zip(alone, together)])
            met = ("yes" if ratio >= ALONE_TARGET else "NO") if r["mode"] == "on" else "-"
            rows.append([r["mode"], name, fmt(med(alone)), fmt(med(together)), fmt(ratio, ".2f"), met])
        # each repetition's sum against the mean of its main and second alone
        singles = [(a + b) / 2 for a, b in zip(r["alone"]["main"], r["alone"]["second"])]
        combined = med([both / one for one, both in zip(singles, r["both_busy"])])
        met = ("yes" if combined >= COMBINED_TARGET else "NO") if r["mode"] == "on" else "-"
        rows.append([r["mode"], "main+second at once", fmt(med(singles)), fmt(med(r["both_busy"])),
                     fmt(combined, ".2f"), met])
    print_table(["runners", "model", "alone tok/s", "together tok/s", "paired ratio", "target met"], rows,
                title=(f"bench.multimodel — {args.threads} threads per model, {platform.machine()}, "
                       f"medians of {args.runs} x {args.tokens} tokens; targets (runners on): each >= "
                       f"{ALONE_TARGET}x alone, both busy combined >= {COMBINED_TARGET}x one alone"))
    rows = []
    for r in results:
        rss = ", ".join(f"{m} {v / 2**20:.0f} MiB" for m, v in sorted(r["runner_rss"].items())) or "-"
        rows.append([r["mode"], fmt(r["startup_s"], ".2f"), f"{r['server_rss'] / 2**20:.0f}", rss])
    print_table(["runners", "start-up to /health (s)", "server RSS (MiB)", "runner RSS, 3 models loaded"], rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.multimodel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="requests per figure (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=200, help="tokens per request (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads per model (default: all cores, %(default)s here)")
    parser.add_argument("--modes", default="on,off", help="runner modes to measure (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write every sample to this JSON file")
    args = parser.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        parser.error("--modes takes on, off or on,off")
    with tempfile.TemporaryDirectory(prefix="edgevlm-multimodel-") as tmp:
        models = model_dir(Path(tmp))
        results = [run_mode(mode, models, args) for mode in modes]
    report(results, args)
    write_json(args.json, {"benchmark": "multimodel", "threads": args.threads, "runs": args.runs,
                           "tokens": args.tokens, "modes": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
