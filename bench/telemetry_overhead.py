"""What telemetry costs: decode tokens/s with everything on vs everything off.

    python -m bench.telemetry_overhead [--threads N] [--runs 8] [--tokens 256]

Two edgevlm servers run side by side on the same model and threads: one with the
JSONL trace file, energy metering and /metrics collection on (the defaults), one with
``--traces none --no-energy --no-metrics``. Requests alternate between them (order
flipped every repetition), one at a time, so both see the same machine noise. The
target is an overhead under 2% on decode tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.client import BenchClient, median, print_table
from bench.edgevlm_server import edgevlm_server
from bench.harness import in_order
from bench.model_files import resolve_model
from bench.process import default_threads
from bench.prompts import chat_prompt, new_salt
from telemetry.otlp_json import from_key_values
from telemetry.report import load_spans

TARGET_OVERHEAD = 0.02


async def run(args: argparse.Namespace) -> int:
    model, _ = resolve_model(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="edgevlm-telemetry-bench-"))
    traces = tmp / "traces.jsonl"
    with contextlib.ExitStack() as stack:
        on = stack.enter_context(edgevlm_server(model=model, threads=args.threads, ctx_size=2048,
                                                traces=traces))
        off = stack.enter_context(edgevlm_server(model=model, threads=args.threads, ctx_size=2048,
                                                 traces=None, extra_args=["--no-energy", "--no-metrics"]))
        named = [("telemetry on", on), ("telemetry off", off)]
        tps: dict[str, list[float]] = {n: [] for n, _ in named}
        clients = {n: BenchClient(s.base_url, s.model) for n, s in named}
        salt = new_salt()
        for name, _ in named:  # warm-up, not measured
            await clients[name].chat(chat_prompt(40, f"{salt}-w"), max_tokens=16)
        for rep in range(args.runs):
            for name, _ in in_order(named, rep):
                res = await clients[name].chat(chat_prompt(40, f"{salt}-{rep}"), max_tokens=args.tokens)
                if res.decode_tps is not None:
                    tps[name].append(res.decode_tps)
        for c in clients.values():
            await c.aclose()
        metrics_ok = "gen_ai_server_time_to_first_token" in (await _get(on.base_url + "/metrics"))
    spans, _ = load_spans([str(traces)]) if traces.exists() else ([], 0)
    energy_src = {from_key_values(s.get("attributes")).get("edgevlm.energy.source") for s in spans}
    m_on, m_off = median(tps["telemetry on"]), median(tps["telemetry off"])
    overhead = 1.0 - m_on / m_off if m_on and m_off else None
    print_table(["configuration", "decode tok/s (median)", "runs"],
                [[n, f"{median(v):.2f}" if v else "-", len(v)] for n, v in tps.items()],
                title=f"decode {args.tokens} tokens, threads={args.threads}")
    print(f"telemetry-on server wrote {len(spans)} spans (energy source: "
          f"{', '.join(sorted(s for s in energy_src if s)) or 'none'}); /metrics populated: {metrics_ok}")
    if overhead is None:
        print("overhead: n/a")
        return 1
    verdict = "PASS" if overhead < TARGET_OVERHEAD else "FAIL"
    print(f"overhead: {overhead * 100:+.2f}% (target < {TARGET_OVERHEAD * 100:.0f}%): {verdict}")
    return 0


async def _get(url: str) -> str:
    import httpx

    async with httpx.AsyncClient(timeout=10) as c:
        return (await c.get(url)).text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF path or model id (default: embedded model)")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--tokens", type=int, default=256)
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
