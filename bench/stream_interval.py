"""What ``--stream-interval`` buys: decode tok/s and the client's CPU per token.

    python -m bench.stream_interval [--threads N] [--runs 6] [--intervals 1 4] [--no-llama]

edgevlm servers that differ only in ``--stream-interval`` (speculation off, the same
model, threads, 4 slots and context) run side by side with llama-server from the same
llama.cpp, which sends every token in its own chunk. Each repetition visits them in a
rotated order: one streamed answer of 320 tokens (``ignore_eos``), then four at once
of 200 tokens each. Figures: the client's decode tok/s (one stream) or completion
tokens / wall time (four), medians; each server's ratio to llama-server per
repetition (paired: the two were measured back to back); and the CPU time the
benchmark client itself spent per token, which is what a field app on the same box
pays for reading the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.client import BenchClient, fmt, median, paired_ratios, print_table, run_concurrent
from bench.edgevlm_server import edgevlm_server
from bench.harness import write_json
from bench.llama_server import ensure_llama_server, llama_server
from bench.model_files import resolve_model
from bench.process import RunningServer, default_threads
from bench.prompts import new_salt

CTX_SIZE = 8192
PARALLEL = 4
ONE_TOKENS = 320
FOUR_TOKENS = 200
LLAMA = "llama-server"
PROMPT = "[{nonce}] Why do bearings fail early? Explain in a few paragraphs."


async def measure(servers: dict[str, RunningServer], runs: int) -> dict[str, dict[str, list[float | None]]]:
    figures: dict[str, dict[str, list[float | None]]] = defaultdict(lambda: defaultdict(list))
    clients = {n: BenchClient(s.base_url, s.model, ignore_eos=True) for n, s in servers.items()}
    names = list(servers)
    salt = new_salt()
    try:
        for name in names:  # warm-up, discarded
            await clients[name].chat([{"role": "user", "content": "Say hello."}], max_tokens=8)
        for rep in range(runs):
            order = names[rep % len(names):] + names[:rep % len(names)]
            for name in order:
                c = clients[name]
                cpu = time.process_time()
                one = await c.chat([{"role": "user", "content": PROMPT.format(nonce=f"{salt}{rep}")}],
                                   max_tokens=ONE_TOKENS)
                figures[name]["one"].append(one.decode_tps)
                figures[name]["one_cpu"].append((time.process_time() - cpu) / max(1, one.completion_tokens) * 1000.0)
                cpu = time.process_time()
                four = await run_concurrent(
                    c.chat([{"role": "user", "content": PROMPT.format(nonce=f"{salt}{rep}-{i}")}],
                           max_tokens=FOUR_TOKENS) for i in range(4))
                figures[name]["four"].append(four.useful_tps)
                figures[name]["four_cpu"].append((time.process_time() - cpu) / max(1, four.completion_tokens) * 1000.0)
            print(f"[bench] repetition {rep + 1}/{runs} done", flush=True)
    finally:
        for c in clients.values():
            await c.aclose()
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_interval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--no-llama", action="store_true", help="edgevlm only")
    parser.add_argument("--no-build", action="store_true", help="do not build llama-server when missing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    edge_model, gguf = resolve_model(args.model)
    binary = None
    if not args.no_llama and gguf is not None:
        binary = ensure_llama_server(build=not args.no_build)
    with contextlib.ExitStack() as stack:
        servers: dict[str, RunningServer] = {}
        for n in args.intervals:
            servers[f"edgevlm-interval-{n}"] = stack.enter_context(edgevlm_server(
                model=edge_model, threads=args.threads, ctx_size=CTX_SIZE, parallel=PARALLEL,
                extra_args=["--speculative", "off", "--stream-interval", str(n)]))
        if binary is not None:
            servers[LLAMA] = stack.enter_context(llama_server(
                gguf, threads=args.threads, ctx_size=CTX_SIZE, parallel=PARALLEL, binary=binary))
        figures = asyncio.run(measure(servers, args.runs))

    names = list(servers)
    med = {n: {k: median(v) for k, v in figures[n].items()} for n in names}
    rows = [["one stream decode tok/s", *(fmt(med[n]["one"]) for n in names)],
            ["  client CPU ms / token", *(fmt(med[n]["one_cpu"], ".3f") for n in names)],
            ["4 streams tok/s (wall)", *(fmt(med[n]["four"]) for n in names)],
            ["  client CPU ms / token", *(fmt(med[n]["four_cpu"], ".3f") for n in names)]]
    print_table(["metric", *names], rows,
                title=f"bench.stream_interval — {PARALLEL} slots, {args.threads} threads, {platform.machine()}, "
                      f"medians of {args.runs} runs")
    if LLAMA in servers:
        paired = []
        for n in names[:-1]:
            for key, label in (("one", "one stream"), ("four", "4 streams")):
                pairs = paired_ratios(figures[n][key], figures[LLAMA][key])
                paired.append([f"{label}: {n} / {LLAMA}", fmt(median(pairs), ".2f"),
                               f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-"])
        print_table(["paired ratio", "median", "range"], paired)
    write_json(args.json, {"benchmark": "stream_interval", "threads": args.threads, "runs": args.runs,
                           "figures": {n: dict(figures[n]) for n in names}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
