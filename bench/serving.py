"""Single-stream serving benchmark: edgevlm vs llama-server on the same model and threads.

    python -m bench.serving [--threads N] [--model PATH_OR_ID] [--runs 10] [--skip-llama-server]

Both servers get one slot. Per repetition, in alternating server order:

* TTFT for a ~40-token and a ~1000-token chat prompt (median of ``--runs``); every
  prompt carries a fresh nonce up front, so no prompt-cache hits,
* decode tokens/s over 256 tokens (median of ``--decode-runs``),
* wall time for 4 concurrent 64-token requests (median of ``--concurrent-runs``;
  with one slot they queue, so this measures scheduling overhead);
* with ``--mmproj`` (both servers load the projector; ``tiny`` makes one that fits the
  model): the same text figures with a vision model loaded, plus TTFT and decode tok/s
  of a 256-token answer about a fresh image (median of ``--decode-runs``).

Targets: decode tok/s within 5% of llama-server; short-prompt TTFT within 15 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
from collections.abc import Sequence

from bench.client import BenchClient, median, run_concurrent
from bench.harness import EDGEVLM_INPROC, LLAMA_SERVER, RUNNER_SPEED, RUNNER_TTFT, Results, Target, add_common_args, alternate, start_servers, write_json
from bench.process import RunningServer
from bench.prompts import chat_prompt
from bench.vision import data_uri, noise_image

SHORT_PROMPT_TOKENS = 40
LONG_PROMPT_TOKENS = 1000
TTFT_MAX_TOKENS = 4
DECODE_TOKENS = 256
CONCURRENT_REQUESTS = 4
CONCURRENT_TOKENS = 64
CTX_SIZE = 4096


def define_metrics(results: Results, vision: bool = False) -> None:
    results.metric("ttft_short_ms", f"TTFT ~{SHORT_PROMPT_TOKENS}-tok prompt (ms)",
                   target=Target("<= llama +15 ms", lambda e, l: e - l <= 15.0), runner_target=RUNNER_TTFT)
    results.metric("ttft_long_ms", f"TTFT ~{LONG_PROMPT_TOKENS}-tok prompt (ms)", runner_target=RUNNER_TTFT)
    results.metric("decode_tps", f"decode tok/s ({DECODE_TOKENS} tok)",
                   target=Target(">= 0.95x llama", lambda e, l: e >= 0.95 * l), runner_target=RUNNER_SPEED)
    if vision:
        results.metric("image_ttft_ms", "TTFT with a fresh 64-token image (ms)")
        results.metric("image_decode_tps", f"decode tok/s after an image ({DECODE_TOKENS} tok)",
                       target=Target(">= 0.95x llama", lambda e, l: e >= 0.95 * l), runner_target=RUNNER_SPEED)
    results.metric("concurrent_wall_s", f"{CONCURRENT_REQUESTS}x{CONCURRENT_TOKENS}-tok concurrent wall (s)", ".2f")
    results.metric("prompt_tokens_short", "  prompt tokens (short)", ".0f")
    results.metric("prompt_tokens_long", "  prompt tokens (long)", ".0f")
    results.metric("decode_tokens", "  completion tokens (decode)", ".0f")
    results.metric("server_decode_tps", "  server-reported decode tok/s")


async def measure_repetition(
    server: RunningServer, client: BenchClient, rep: int, salt: str, args: argparse.Namespace, results: Results
) -> None:
    name = server.name
    short = await client.chat(chat_prompt(SHORT_PROMPT_TOKENS, f"{salt}-s{rep}"), max_tokens=TTFT_MAX_TOKENS)
    results.add("ttft_short_ms", name, short.ttft_s * 1e3 if short.ttft_s is not None else None)
    results.add("prompt_tokens_short", name, short.prompt_tokens)

    long = await client.chat(chat_prompt(LONG_PROMPT_TOKENS, f"{salt}-l{rep}"), max_tokens=TTFT_MAX_TOKENS)
    results.add("ttft_long_ms", name, long.ttft_s * 1e3 if long.ttft_s is not None else None)
    results.add("prompt_tokens_long", name, long.prompt_tokens)

    if rep < args.decode_runs:
        dec = await client.chat(chat_prompt(SHORT_PROMPT_TOKENS, f"{salt}-d{rep}"), max_tokens=DECODE_TOKENS)
        results.add("decode_tps", name, dec.decode_tps)
        results.add("decode_tokens", name, dec.completion_tokens)
        timings = dec.server_timings or {}
        results.add("server_decode_tps", name,
                    timings.get("predicted_per_second") or timings.get("decode_tokens_per_s"))

    if args.mmproj and rep < args.decode_runs:
        image = [{"role": "user", "content": [
            {"type": "text", "text": f"Session {salt}-i{rep}. Describe this image in detail."},
            {"type": "image_url", "image_url": {"url": data_uri(noise_image(64, seed=rep))}}]}]
        img = await client.chat(image, max_tokens=DECODE_TOKENS)
        results.add("image_ttft_ms", name, img.ttft_s * 1e3 if img.ttft_s is not None else None)
        results.add("image_decode_tps", name, img.decode_tps)

    if rep < args.concurrent_runs:
        conc = await run_concurrent(
            client.chat(chat_prompt(SHORT_PROMPT_TOKENS, f"{salt}-c{rep}-{i}"), max_tokens=CONCURRENT_TOKENS)
            for i in range(CONCURRENT_REQUESTS)
        )
        results.add("concurrent_wall_s", name, conc.wall_s)


async def run(args: argparse.Namespace, servers: list[RunningServer]) -> Results:
    results = Results()
    define_metrics(results, vision=bool(args.mmproj))
    await alternate(servers, args.runs,
                    lambda s, client, rep, salt: measure_repetition(s, client, rep, salt, args, results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, runs_default=10)
    parser.add_argument("--decode-runs", type=int, default=5, help="256-token decodes (default: %(default)s)")
    parser.add_argument("--concurrent-runs", type=int, default=3,
                        help="4x64 concurrent rounds (default: %(default)s)")
    args = parser.parse_args(argv)
    args.decode_runs = max(1, min(args.decode_runs, args.runs))
    args.concurrent_runs = max(1, min(args.concurrent_runs, args.runs))

    with start_servers(args, parallel=1, ctx_size=CTX_SIZE) as servers:
        results = asyncio.run(run(args, servers))
        names = [s.name for s in servers]

    title = (f"bench.serving — 1 slot, {args.threads} threads, {platform.machine()}; medians of "
             f"{args.runs} (TTFT), {args.decode_runs} (decode), {args.concurrent_runs} (concurrent)")
    if args.mmproj:
        title += f"; vision projector {args.mmproj}"
    results.print(title, names, reducers={}, default_reducer=median)
    if LLAMA_SERVER not in names:
        print("(no llama-server figures: comparison skipped)")
    if EDGEVLM_INPROC in names:
        print(results.paired_summary("decode_tps", "decode tok/s per repetition", reference=EDGEVLM_INPROC))
    write_json(args.json, {"benchmark": "serving", "threads": args.threads, "model": args.model,
                           "runs": args.runs, "metrics": results.to_json()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
