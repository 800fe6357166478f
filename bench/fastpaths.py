"""What llama.cpp's CPU fast paths are worth on this machine: prefill and decode speed of
the default model requantised to Q4_0 and Q4_K_M, with each fast path on and off.

    python -m bench.fastpaths [--types Q4_0,Q4_K_M] [--threads 2] [--reps 5]

Each measurement runs in its own child process (a load with exactly the buffer types
asked for), configurations alternate within every repetition so drift hits them alike,
and medians are printed. The last column is what ``--repack auto`` chose after its
self-test. The variants are requantisations of the shipped Q4_1 model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.model_files import require_default_model
from models import cpu_paths, isolation
from models.engine import default_threads
from models.llama_lib import OneSequence, tokenize
from models.quantize import quantize

_TEXT = ("The operator checks the hydraulic press before each shift: oil level, hose fittings, "
         "the guard interlock and the emergency stop. Any fault goes into the log with the time. ")


def measure(path: str, allowed: tuple[str, ...], threads: int, n_prompt: int, n_decode: int) -> dict:
    """Child side: one load, a warm-up, then a timed prefill and a timed decode."""
    import llama_cpp

    model = cpu_paths.load_model(path, allowed)
    tokens = tokenize(llama_cpp.llama_model_get_vocab(model), _TEXT * 64, add_special=True)[: n_prompt + n_decode]
    seq = OneSequence(model, n_ctx=n_prompt + n_decode + 16, n_batch=max(n_prompt, 32), n_threads=threads)

    def run(toks: list[int], start: int) -> None:
        if seq.decode(toks, start, logits=lambda i: i == len(toks) - 1) != 0:
            raise RuntimeError("llama_decode failed")

    run(tokens[:32], 0)  # warm-up: page in the weights, size the compute buffers
    seq.clear()
    t0 = time.perf_counter()
    run(tokens[:n_prompt], 0)
    t1 = time.perf_counter()
    for i in range(n_decode):
        run([tokens[n_prompt + i]], n_prompt + i)
    t2 = time.perf_counter()
    seq.close()
    llama_cpp.llama_model_free(model)
    return {"prefill_tps": n_prompt / (t1 - t0), "decode_tps": n_decode / (t2 - t1)}


def configurations() -> list[tuple[str, tuple[str, ...]]]:
    """The plain path, then each set the self-test would try (all types, then fewer)."""
    sets = cpu_paths.candidate_sets(cpu_paths.available_extra_buffers())
    return [("plain", ())] + [("+".join(s), s) for s in sets]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q4_0,Q4_K_M")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    p.add_argument("--decode", type=int, default=64, help="decoded tokens")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--workdir", default="bench-out/fastpaths", help="where the requantised models go")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--allow", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        allowed = tuple(a for a in args.allow.split(",") if a)
        print(json.dumps(measure(args.measure, allowed, args.threads, args.prompt, args.decode)), flush=True)
        return 0

    src = require_default_model()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    configs = configurations()
    print(f"bench.fastpaths — {args.threads} threads, prefill {args.prompt} tokens, decode {args.decode}, "
          f"{args.reps} repetitions (medians); fast paths here: "
          f"{', '.join(cpu_paths.available_extra_buffers()) or 'none'}")
    print("variants are requantisations of the shipped Q4_1 model (SmolLM2-135M-Instruct)")
    header = f"{'type':8} {'path':18} {'prefill tok/s':>13} {'x plain':>8} {'decode tok/s':>12} {'x plain':>8}"
    rows = []
    for type_name in args.types.split(","):
        path = work / f"smollm2-135m-{type_name.lower()}.gguf"
        if not path.is_file():
            quantize(src, path, type_name)
        verdict = cpu_paths.choose(str(path), "auto", args.threads)
        results: dict[str, list[dict]] = {name: [] for name, _ in configs}
        for rep in range(args.reps):
            order = configs if rep % 2 == 0 else configs[::-1]
            for name, allowed in order:
                out = isolation.run_module("bench.fastpaths", [
                    "--measure", str(path), "--allow", ",".join(allowed), "--threads", str(args.threads),
                    "--prompt", str(args.prompt), "--decode", str(args.decode)], 600)
                if out.ok:
                    results[name].append(out.report)
                else:
                    print(f"  {type_name} {name}: {out.reason}", file=sys.stderr)
        plain = {k: statistics.median(r[k] for r in results["plain"]) for k in ("prefill_tps", "decode_tps")}
        for name, _ in configs:
            if not results[name]:
                rows.append(f"{type_name:8} {name:18} {'crashed':>13}")
                continue
            med = {k: statistics.median(r[k] for r in results[name]) for k in ("prefill_tps", "decode_tps")}
            rows.append(f"{type_name:8} {name:18} {med['prefill_tps']:13.1f} "
                        f"{med['prefill_tps'] / plain['prefill_tps']:8.2f} {med['decode_tps']:12.1f} "
                        f"{med['decode_tps'] / plain['decode_tps']:8.2f}")
        rows.append(f"{'':8} auto chose: {verdict.describe()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
