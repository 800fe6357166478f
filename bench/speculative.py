"""Speculative decoding benchmark: edgevlm (off, ngram) vs llama-server (off and its n-gram types).

    python -m bench.speculative [--threads N] [--runs 3] [--model PATH] [--stream-interval auto|N]

Every server loads the same GGUF with 4 slots and the same context, and all run at
once (each idle while another is measured); every measurement visits them in an order
that flips each time, so a shared machine's drift hits all alike. edgevlm runs with
speculation off and ngram in its shared KV pool, and with ngram again under
``--kv-layout per-slot`` (llama-server's layout with an explicit ``-np``). Streaming chat,
temperature 0. Workloads:

* (a) grounded: copy a ~400-token work order, fill a JSON form from it, and answer
  from a ~500-token manual section in the context (decode tok/s, median);
* (b) free-form: open questions with nothing to copy from (decode tok/s, median);
* (c) four concurrent streams of (a): completion tokens / wall time, with ``ignore_eos``
  so every server decodes 4 x 320 tokens. Without it the figure measured how long one
  answer happened to be: the servers' greedy answers differ slightly (their batches
  compute in a different order), one stream's quote ended after 28 to 172 tokens or ran
  to 320, and that alone moved completion tokens per run from 988 to 1280 while the
  wall time, set by the three long streams, hardly changed.

Targets (printed with a verdict): grounded edgevlm-ngram >= 1.10x llama-server's best
n-gram type; edgevlm-off >= 0.97x llama-server-off on one stream; free-form
edgevlm-ngram >= 0.97x edgevlm-off; four streams edgevlm-ngram >= llama-server's best
(shown for both KV layouts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import random
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.client import BenchClient, fmt, median, paired_ratios, print_table, ratio, run_concurrent
from bench.edgevlm_server import edgevlm_server, health_models
from bench.harness import in_order, write_json
from bench.llama_server import ensure_llama_server, llama_server
from bench.model_files import resolve_model
from bench.process import RunningServer, default_threads
from bench.prompts import new_salt

CTX_SIZE = 8192
PARALLEL = 4
GROUNDED_TOKENS = 320
FREE_TOKENS = 200
LLAMA_NGRAM_TYPES = ("ngram-simple", "ngram-mod", "ngram-cache")

FAULTS = ["hydraulic pressure drops within two minutes of start-up", "spindle bearing runs hot above 1800 rpm",
          "conveyor belt slips under full load", "coolant pump trips its breaker on start",
          "servo axis Y overshoots by 0.4 mm on rapid moves"]
PARTS = ["seal kit", "pressure sensor", "hose", "bearing", "drive belt", "relay", "filter cartridge",
         "encoder cable", "gasket set", "limit switch"]


def work_order(rng: random.Random, nonce: str) -> str:
    """A ~400-token work order: the kind of text a technician asks to copy or fill in."""
    lines = [f"WORK ORDER {rng.randint(1000, 9999)}-{nonce}",
             f"Site: Line {rng.randint(1, 9)}, machine {rng.choice('PMLK')}-{rng.randint(10, 99)}",
             f"Fault: {rng.choice(FAULTS)}.",
             f"Reported by: shift {rng.choice('ABC')}, operator {rng.choice(['Okafor', 'Lindqvist', 'Moreau', 'Tanaka'])}.",
             "Observations:"]
    for i in range(6):
        lines.append(f"  {i + 1}. Reading {rng.randint(10, 400)} {rng.choice(['bar', 'C', 'rpm', 'mm', 'A'])} at "
                     f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}, {rng.choice(['stable', 'rising', 'falling'])}.")
    lines.append("Parts required:")
    for _ in range(6):
        lines.append(f"  - {rng.choice(PARTS)} {rng.choice('ABCDEFGH')}{rng.choice('KLMNPRST')}-"
                     f"{rng.randint(100, 9999)} (qty {rng.randint(1, 4)}), bin {rng.randint(1, 40)}-{rng.randint(1, 9)}")
    lines += ["Safety: lock out and tag out the main isolator; verify zero energy before opening guards.",
              f"Priority: {rng.choice(['high', 'medium', 'low'])}. Sign-off by the shift lead before restart.",
              f"Estimated time: {rng.randint(1, 6)} h. Cost centre {rng.randint(4000, 4999)}."]
    return "\n".join(lines)


def manual(rng: random.Random, nonce: str) -> str:
    """A ~500-token manual section with numbered procedures."""
    out = [f"MAINTENANCE MANUAL, section {rng.randint(2, 9)}.{rng.randint(1, 9)} (rev {nonce})"]
    for p in range(4):
        out.append(f"Procedure {p + 1}: replacing the {rng.choice(PARTS)}")
        for s in range(5):
            out.append(f"  Step {s + 1}. Remove {rng.randint(2, 8)} M{rng.choice([4, 5, 6, 8])} bolts with a "
                       f"{rng.randint(8, 19)} mm socket; torque on refit {rng.randint(10, 90)} Nm.")
    return "\n".join(out)


def grounded_prompts(nonce: str) -> list[str]:
    rng = random.Random(nonce)
    wo, man = work_order(rng, nonce), manual(rng, nonce)
    return [f"Copy the following work order exactly, line by line.\n\n{wo}",
            f"{wo}\n\nFill in this JSON form from the work order above and output only the JSON: "
            '{"work_order": "", "site": "", "fault": "", "parts": [{"name": "", "number": "", "qty": 0}], '
            '"priority": ""}',
            f"{man}\n\nQuote procedure 2 from the manual above, every step."]


FREE_PROMPTS = ["Why do bearings fail early? Explain in a few paragraphs.",
                "Write a short story about a night shift in a bakery.",
                "What are good habits for a new technician? Give reasons."]


async def one(client: BenchClient, prompt: str, max_tokens: int) -> tuple[float | None, dict]:
    r = await client.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens)
    return r.decode_tps, r.server_timings or {}


def draft_counts(timings: dict) -> tuple[int, int]:
    """(drafted, accepted) from edgevlm's or llama-server's timings."""
    if "drafted_tokens" in timings:
        return int(timings["drafted_tokens"]), int(timings.get("accepted_tokens", 0))
    return int(timings.get("draft_n", 0) or 0), int(timings.get("draft_n_accepted", 0) or 0)


async def measure(servers: dict[str, RunningServer], runs: int) -> dict[str, dict[str, list[float]]]:
    figures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    clients = {name: BenchClient(s.base_url, s.model, ignore_eos=False) for name, s in servers.items()}
    fixed = {name: BenchClient(s.base_url, s.model, ignore_eos=True) for name, s in servers.items()}
    names = list(servers)
    salt = new_salt()
    try:
        for name in names:  # warm-up, discarded
            await one(clients[name], "Say hello.", 8)
        for rep in range(runs):
            prompts = grounded_prompts(f"{salt}{rep}")
            for i, prompt in enumerate(prompts):
                for name in in_order(names, rep + i):
                    tps, t = await one(clients[name], prompt, GROUNDED_TOKENS)
                    figures[name]["grounded"].append(tps)
                    d, a = draft_counts(t)
                    figures[name]["drafted"].append(d)
                    figures[name]["accepted"].append(a)
            for i, prompt in enumerate(FREE_PROMPTS):
                for name in in_order(names, rep + i + 1):
                    tps, _ = await one(clients[name], f"[{salt}{rep}] {prompt}", FREE_TOKENS)
                    figures[name]["free"].append(tps)
            for name in in_order(names, rep):
                conc = await run_concurrent(fixed[name].chat([{"role": "user", "content": p}],
                                                               max_tokens=GROUNDED_TOKENS)
                                            for p in grounded_prompts(f"{salt}{rep}c") + prompts[:1])
                figures[name]["four"].append(conc.useful_tps)
            print(f"[bench] repetition {rep + 1}/{runs} done", flush=True)
    finally:
        for c in [*clients.values(), *fixed.values()]:
            await c.aclose()
    return figures


def edgevlm_stream_interval(server: RunningServer) -> int | None:
    """The decode steps per hand-over an edgevlm server runs with (``auto`` resolved), from /health."""
    return health_models(server).get(server.model, {}).get("stream_interval")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stream-interval", default="auto",
                        help="edgevlm's --stream-interval (default: its own default, auto; 1 sends every token in "
                             "its own chunk, as llama-server does)")
    parser.add_argument("--llama-flash-attn", choices=("auto", "on", "off"), default="auto",
                        help="llama-server's -fa (default: its own default, auto); edgevlm keeps its own "
                             "--flash-attn auto, shown in the title")
    parser.add_argument("--no-build", action="store_true", help="do not build llama-server when missing")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    fa = ["-fa", args.llama_flash_attn]
    edge_model, gguf = resolve_model(args.model)
    binary = ensure_llama_server(build=not args.no_build) if gguf is not None else None
    with contextlib.ExitStack() as stack:
        servers: dict[str, RunningServer] = {}
        for name, extra in (("edgevlm-off", ["--speculative", "off"]), ("edgevlm-ngram", ["--speculative", "ngram"]),
                            ("edgevlm-ngram-per-slot", ["--speculative", "ngram", "--kv-layout", "per-slot"])):
            servers[name] = stack.enter_context(edgevlm_server(
                model=edge_model, threads=args.threads, ctx_size=CTX_SIZE, parallel=PARALLEL,
                extra_args=[*extra, "--stream-interval", str(args.stream_interval)]))
        if binary is not None:
            servers["llama-off"] = stack.enter_context(llama_server(
                gguf, threads=args.threads, ctx_size=CTX_SIZE, parallel=PARALLEL, binary=binary, extra_args=fa))
            for kind in LLAMA_NGRAM_TYPES:
                servers[f"llama-{kind}"] = stack.enter_context(llama_server(
                    gguf, threads=args.threads, ctx_size=CTX_SIZE, parallel=PARALLEL, binary=binary,
                    extra_args=["--spec-type", kind, *fa]))
        else:
            print("[bench] no llama-server: edgevlm only")
        interval = edgevlm_stream_interval(servers["edgevlm-off"])
        attention = health_models(servers["edgevlm-off"]).get(servers["edgevlm-off"].model, {}).get("attention")
        figures = asyncio.run(measure(servers, args.runs))

    names = list(servers)
    med = {n: {k: median(v) for k, v in figures[n].items()} for n in names}
    rows = [["grounded decode tok/s", *(fmt(med[n].get("grounded")) for n in names)],
            ["  drafted / answer", *(fmt(med[n].get("drafted"), ".0f") for n in names)],
            ["  accepted / answer", *(fmt(med[n].get("accepted"), ".0f") for n in names)],
            ["free-form decode tok/s", *(fmt(med[n].get("free")) for n in names)],
            ["4 streams tok/s (wall)", *(fmt(med[n].get("four")) for n in names)]]
    print_table(["metric", *names], rows,
                title=f"bench.speculative — {PARALLEL} slots, {args.threads} threads, {platform.machine()}, "
                      f"medians of {args.runs} runs, edgevlm --stream-interval {args.stream_interval}"
                      + (f" ({interval} steps per hand-over)" if args.stream_interval == "auto" else "")
                      + f", edgevlm attention {attention}, llama-server -fa {args.llama_flash_attn}")
    if binary is not None:
        best = max(LLAMA_NGRAM_TYPES, key=lambda k: med[f"llama-{k}"].get("grounded") or 0.0)
        best4 = max(LLAMA_NGRAM_TYPES, key=lambda k: med[f"llama-{k}"].get("four") or 0.0)
        checks = [
            ("grounded: edgevlm-ngram / llama best n-gram", "edgevlm-ngram", f"llama-{best}", "grounded", 1.10, best),
            ("one stream, no speculation: edgevlm-off / llama-off", "edgevlm-off", "llama-off", "free", 0.97,
             "free-form"),
            ("free-form: edgevlm-ngram / edgevlm-off", "edgevlm-ngram", "edgevlm-off", "free", 0.97, ""),
            ("4 streams: edgevlm-ngram / llama best n-gram", "edgevlm-ngram", f"llama-{best4}", "four", 1.00, best4),
            ("4 streams: edgevlm-ngram-per-slot / llama best", "edgevlm-ngram-per-slot", f"llama-{best4}", "four",
             1.00, f"{best4}; same layout"),
        ]
        rows = []
        for label, a, b, key, need, note in checks:
            r = ratio(med[a].get(key), med[b].get(key))
            pairs = paired_ratios(figures[a][key], figures[b][key])
            rows.append([label, fmt(r, ".2f"), f">= {need:.2f}", "yes" if (r or 0) >= need else "NO",
                         fmt(median(pairs), ".2f"),
                         f"{min(pairs):.2f}-{max(pairs):.2f}" if pairs else "-",
                         f"{sum(1 for x in pairs if x >= need)}/{len(pairs)}", note])
        # The verdict reads the medians' ratio; the paired columns show how far single
        # back-to-back measurements spread around it, so a miss inside the spread reads as one.
        print_table(["target", "ratio", "needs", "met", "paired", "range", "pairs met", "note"], rows)
    write_json(args.json, {"benchmark": "speculative", "threads": args.threads, "runs": args.runs,
                           "stream_interval": args.stream_interval, "stream_interval_steps": interval,
                           "edgevlm_attention": attention, "llama_flash_attn": args.llama_flash_attn,
                           "figures": {n: dict(figures[n]) for n in names}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
