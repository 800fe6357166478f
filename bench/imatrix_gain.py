"""What an importance matrix from the device's own text is worth, at the lowest types.

    python -m bench.imatrix_gain [--types Q2_K,Q3_K_S,IQ3_XXS] [--threads 2] [--out DIR]

Calibrates the default model on a *domain* text (the first 70 % of this project's
README: the documentation an edgevlm box works with), then quantizes the model to each
type with and without the matrix, and measures KLD, same-top-p and PPL against the
unquantized-by-us source (the shipped Q4_1) on two held-out texts, in one run:
- the last 30 % of the README (same domain, never seen by calibration);
- the bundled general evaluation text (``bench/data/eval_text.txt``).
It also times calibration against a plain evaluation of the same chunks.
The variants are requantizations of a Q4_1 file; the table says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.model_files import require_default_model
from bench.quality import Reference, ScoredModel, bundled_text
from models import imatrix
from models.gguf_inspect import inspect
from models.quantize import quantize

REPO = Path(__file__).resolve().parents[1]


def domain_texts() -> tuple[str, str]:
    """(calibration part, held-out part) of the README, split on a line boundary."""
    lines = (REPO / "README.md").read_text().splitlines(keepends=True)
    cut = int(len(lines) * 0.7)
    return "".join(lines[:cut]), "".join(lines[cut:])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--types", default="Q2_K,Q3_K_S,IQ3_XXS")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calib-chunks", type=int, default=16)
    p.add_argument("--eval-chunks", type=int, default=6)
    p.add_argument("--out", default="bench-out/imatrix")
    args = p.parse_args(argv)
    src = require_default_model()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib_text, domain_eval = domain_texts()

    t0 = time.monotonic()
    matrix = imatrix.calibrate(str(src), [calib_text], n_ctx=args.ctx, chunks=args.calib_chunks,
                               threads=args.threads, datasets=["README.md (first 70 %)"])
    calib_s = time.monotonic() - t0
    imatrix.write(matrix, out / "smollm2.imatrix.gguf")
    plain = ScoredModel(src, ctx=args.ctx, threads=args.threads)
    try:
        tokens = plain.tokenize(calib_text)
        t0 = time.monotonic()
        plain.logprobs(tokens, matrix.chunk_count)
        plain_s = time.monotonic() - t0
    finally:
        plain.close()

    refs = {"domain (README, held out)": Reference(src, domain_eval, ctx=args.ctx, threads=args.threads,
                                                   max_chunks=args.eval_chunks),
            "general (eval_text.txt)": Reference(src, bundled_text(), ctx=args.ctx, threads=args.threads,
                                                 max_chunks=args.eval_chunks)}
    print(f"bench.imatrix_gain — SmolLM2-135M-Instruct Q4_1 (shipped) requantized; {args.threads} threads")
    print(f"calibration: {matrix.chunk_count} chunks x {matrix.chunk_size} tokens of README (first 70 %), "
          f"{len(matrix.entries)} weight matrices, {calib_s:.1f} s = {matrix.tokens / calib_s:.0f} tok/s; "
          f"a plain evaluation of the same chunks {plain_s:.1f} s: calibration runs at "
          f"{plain_s / calib_s:.2f}x plain speed")
    for name, ref in refs.items():
        print(f"reference on {name}: {len(ref.targets)} tokens scored, PPL(Q4_1) "
              f"{ref.measure(src).ppl_reference:.3f}")
    header = (f"{'type':8} {'imatrix':8} {'BPW':>5} | " +
              " | ".join(f"{'KLD':>8} {'same top p':>10} {'PPL':>7}" for _ in refs))
    print(" " * 24 + " | ".join(f"{n:^28}" for n in refs))
    print(header)
    print("-" * len(header))
    for type_name in args.types.split(","):
        for use in (False, True):
            dst = out / f"smollm2.{type_name}{'.imatrix' if use else ''}.gguf"
            quantize(src, dst, type_name, threads=args.threads, imatrix=matrix if use else None, force=True)
            bpw = inspect(dst).bits_per_weight or 0.0
            cells = []
            for ref in refs.values():
                r = ref.measure(dst)
                cells.append(f"{r.kld_mean:8.4f} {r.same_top_p_pct:9.1f}% {r.ppl_model:7.2f}")
            print(f"{type_name:8} {'yes' if use else 'no':8} {bpw:5.2f} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
