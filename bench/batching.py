"""Batching benchmark: edgevlm vs llama-server, both with 4 parallel slots.

    python -m bench.batching [--threads N] [--model PATH_OR_ID] [--runs 5] [--rounds 1]
                             [--skip-llama-server]

Per repetition, each measurement below runs on one server and then at once on the
other (the order flips every time), so both figures of a pair see the same machine:

* 4 concurrent streaming clients x 64 tokens, ``--rounds`` times: useful tok/s (total
  completion tokens / wall time), median and max request latency,
* a 3-turn chat: a ~600-token first turn, then turns 2 and 3 append the assistant's
  reply and a short user message. TTFT of each turn; turns 2 and 3 should reuse the
  cached prefix (the prefix-reuse check). Each repetition's chat starts with a fresh
  nonce, so turn 1 never hits the cache.
* 4 operators at once with one new ~400-token system prompt (a fresh nonce per
  repetition, so no slot holds it yet) and their own short questions x 16 tokens:
  median and last TTFT, useful tok/s. No target: it shows what sharing a prefix
  between requests is worth, which llama-server does not do.

Targets: concurrent useful tok/s >= llama-server; turn-2/3 TTFT within 10%. Besides the
medians, the paired ratios (edgevlm/llama-server per round or repetition) are printed
with their geometric mean and how many pairs met the target.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
from collections.abc import Sequence
from typing import Any

from bench.client import BenchClient, maximum, median, run_concurrent
from bench.harness import (EDGEVLM, EDGEVLM_INPROC, LLAMA_SERVER, RUNNER_SPEED, RUNNER_TTFT, Results, Step, Target, add_common_args,
                           alternate, start_servers, write_json)
from bench.process import RunningServer
from bench.prompts import chat_prompt, follow_up, shared_system_prompt

PARALLEL = 4
CTX_PER_SLOT = 2048
CONCURRENT_TOKENS = 64
CONCURRENT_PROMPT_TOKENS = 40
CHAT_FIRST_TURN_TOKENS = 600
CHAT_REPLY_TOKENS = 32
CHAT_TURNS = 3
SHARED_PROMPT_TOKENS = 400
SHARED_REPLY_TOKENS = 16
QUESTIONS = ("The press stopped mid-cycle. What now?", "Can I clear a jam with the guard open?",
             "Where do I log a stop?", "Who may reset the light curtain?")

within_10pct = Target("<= 1.10x llama", lambda e, l: e <= 1.10 * l)


def define_metrics(results: Results) -> None:
    results.metric("useful_tps", f"{PARALLEL}x{CONCURRENT_TOKENS} useful tok/s (median)",
                   target=Target(">= llama", lambda e, l: e >= l), runner_target=RUNNER_SPEED)
    results.metric("useful_tps_max", f"{PARALLEL}x{CONCURRENT_TOKENS} useful tok/s (max)")
    results.metric("latency_median_s", "  request latency median (s)", ".2f")
    results.metric("latency_max_s", "  request latency max (s)", ".2f")
    for turn in range(1, CHAT_TURNS + 1):
        results.metric(f"turn{turn}_ttft_ms", f"chat turn {turn} TTFT (ms)",
                       target=within_10pct if turn > 1 else None, runner_target=RUNNER_TTFT)
    for turn in range(1, CHAT_TURNS + 1):
        results.metric(f"turn{turn}_prompt_tokens", f"  turn {turn} prompt tokens", ".0f")
    results.metric("shared_ttft_ms", f"{PARALLEL} operators, one new {SHARED_PROMPT_TOKENS}-token system prompt: TTFT (ms)")
    results.metric("shared_ttft_last_ms", "  last operator's TTFT (ms, median over repetitions)")
    results.metric("shared_tps", f"  useful tok/s ({PARALLEL}x{SHARED_REPLY_TOKENS})")


async def concurrent_round(client: BenchClient, nonce: str) -> Any:
    return await run_concurrent(
        client.chat(chat_prompt(CONCURRENT_PROMPT_TOKENS, f"{nonce}-{i}"), max_tokens=CONCURRENT_TOKENS)
        for i in range(PARALLEL)
    )


async def shared_prompt_burst(client: BenchClient, nonce: str) -> Any:
    return await run_concurrent(
        client.chat(shared_system_prompt(SHARED_PROMPT_TOKENS, nonce, q), max_tokens=SHARED_REPLY_TOKENS)
        for q in QUESTIONS[:PARALLEL]
    )


async def chat_session(client: BenchClient, nonce: str) -> list[Any]:
    """Three turns; each appends the previous reply and a short user message."""
    messages = chat_prompt(CHAT_FIRST_TURN_TOKENS, nonce)
    turns = []
    for turn in range(1, CHAT_TURNS + 1):
        if turn > 1:
            messages += [{"role": "assistant", "content": turns[-1].text}, follow_up(turn)]
        turns.append(await client.chat(messages, max_tokens=CHAT_REPLY_TOKENS))
    return turns


def concurrent_step(results: Results, rnd: int) -> Step:
    async def step(server: RunningServer, client: BenchClient, rep: int, salt: str) -> None:
        conc = await concurrent_round(client, f"{salt}-c{rep}.{rnd}")
        results.add("useful_tps", server.name, conc.useful_tps)
        results.add("useful_tps_max", server.name, conc.useful_tps)
        for latency in conc.latencies_s:
            results.add("latency_median_s", server.name, latency)
            results.add("latency_max_s", server.name, latency)
    return step


def chat_step(results: Results) -> Step:
    async def step(server: RunningServer, client: BenchClient, rep: int, salt: str) -> None:
        for turn, res in enumerate(await chat_session(client, f"{salt}-t{rep}"), start=1):
            results.add(f"turn{turn}_ttft_ms", server.name, res.ttft_s * 1e3 if res.ttft_s is not None else None)
            results.add(f"turn{turn}_prompt_tokens", server.name, res.prompt_tokens)
    return step


def shared_prompt_step(results: Results) -> Step:
    async def step(server: RunningServer, client: BenchClient, rep: int, salt: str) -> None:
        burst = await shared_prompt_burst(client, f"{salt}-s{rep}")
        ttfts = [r.ttft_s * 1e3 for r in burst.results if r.ttft_s is not None]
        for ttft in ttfts:
            results.add("shared_ttft_ms", server.name, ttft)
        results.add("shared_ttft_last_ms", server.name, max(ttfts, default=None))
        results.add("shared_tps", server.name, burst.useful_tps)
    return step


async def run(args: argparse.Namespace, servers: list[RunningServer]) -> Results:
    results = Results()
    define_metrics(results)
    steps = [concurrent_step(results, rnd) for rnd in range(args.rounds)]
    await alternate(servers, args.runs, *steps, chat_step(results), shared_prompt_step(results))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, runs_default=5)
    parser.add_argument("--rounds", type=int, default=1,
                        help="concurrent rounds per repetition (default: %(default)s); more rounds narrow "
                             "the per-repetition ratio at little cost next to the chat")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")

    with start_servers(args, parallel=PARALLEL, ctx_size=PARALLEL * CTX_PER_SLOT) as servers:
        results = asyncio.run(run(args, servers))
        names = [s.name for s in servers]

    rounds = f", {args.rounds} concurrent rounds each" if args.rounds > 1 else ""
    title = (f"bench.batching — {PARALLEL} slots, {args.threads} threads, {platform.machine()}; "
             f"{args.runs} repetitions{rounds} (medians; latencies over all requests)")
    if args.mmproj:
        title += f"; vision projector {args.mmproj}"
    results.print(title, names,
                  reducers={"useful_tps_max": maximum, "latency_max_s": maximum},
                  default_reducer=median)
    if LLAMA_SERVER not in names:
        print("(no llama-server figures: comparison skipped)")
    elif EDGEVLM in names:
        print(results.paired_summary("useful_tps", "useful tok/s per round"))
        for turn in range(2, CHAT_TURNS + 1):
            print(results.paired_summary(f"turn{turn}_ttft_ms", f"chat turn {turn} TTFT per repetition"))
    if EDGEVLM_INPROC in names:
        print(results.paired_summary("useful_tps", "useful tok/s per round", reference=EDGEVLM_INPROC))
    write_json(args.json, {"benchmark": "batching", "threads": args.threads, "model": args.model,
                           "runs": args.runs, "rounds": args.rounds, "metrics": results.to_json()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
