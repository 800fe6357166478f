"""Prompt lookup replayed: what each drafter would make of the same greedy answers, without timing noise.

    python -m bench.speculative_replay [--model PATH] [--answers 5] [--threads N]

``bench.speculative`` times whole servers; on a shared 2-core VM one answer decodes 10
to 30 % faster or slower than the next, so two drafters a few per cent apart cannot be
told apart there. This benchmark replays instead:

1. greedy answers (no speculation) to ``bench.speculative``'s grounded prompts, from
   the engine itself (``--answers`` sets of three prompts);
2. what a decode step of 1 to 16 rows (all with logits, as verification needs) costs on
   this machine: medians of raw ``llama_decode`` calls on a 400-token sequence;
3. per answer, step by step, the engine's drafter (``NgramIndex``) and planner
   (``plan_drafts``, with those costs): a step verifies the planned draft and, as greedy
   verification does, keeps the drafted tokens up to the first that differs from the
   answer, plus one.

It prints the tokens per second those steps would take, for no speculation, long
matches only, and long matches with the short look-up near a copy's current point,
and how many tokens each drafted and had accepted.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp

from bench.model_files import resolve_model
from bench.process import default_threads
from bench.speculative import GROUNDED_TOKENS, grounded_prompts
from models import cpu_paths
from models.engine import Engine, EngineConfig, Failed, Finished, GenerationRequest
from models.engine.speculative import MAX_DRAFT, NgramIndex, SpecState, StepCosts, plan_drafts
from models.llama_lib import OneSequence, ensure_backend
from models.sampling import SamplingParams

ROW_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)


@dataclass
class Answer:
    prompt: list[int]
    tokens: list[int]


class _Collect:
    """An engine sink that only waits for the end (the job keeps the sampled tokens)."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def __call__(self, event: object) -> None:
        if isinstance(event, (Finished, Failed)):
            self.done.set()


def greedy_answers(path: str, n_sets: int, threads: int) -> list[Answer]:
    """Greedy answers (ending at EOS or GROUNDED_TOKENS) to the grounded prompts."""
    engine = Engine(EngineConfig("replay", path, n_ctx=4096, n_parallel=1, n_threads=threads))
    out = []
    try:
        for s in range(n_sets):
            for prompt in grounded_prompts(f"replay{s}"):
                tokens = engine.tokenize(engine.template.render([{"role": "user", "content": prompt}]))
                sink = _Collect()
                job = engine.submit(GenerationRequest([tokens], SamplingParams(temperature=0), GROUNDED_TOKENS),
                                    sink, max_queue=4)
                sink.done.wait()
                out.append(Answer(tokens, list(job.sampled)))
    finally:
        engine.close()  # its worker thread ends, and with it its OpenMP team
    return out


def row_costs(path: str, threads: int, repeats: int = 15) -> dict[int, float]:
    """Median ms of one decode of k rows (all with logits) after a 400-token sequence."""
    ensure_backend()
    model = cpu_paths.load_model(path, ())
    try:
        with OneSequence(model, n_ctx=1024, n_batch=64, n_threads=threads) as seq:
            mem = llama_cpp.llama_get_memory(seq.ctx)
            for start in range(0, 400, 64):
                seq.decode([100 + i % 1000 for i in range(start, min(400, start + 64))], start, logits=False)
            times: dict[int, list[float]] = {k: [] for k in ROW_COUNTS}
            for _ in range(repeats):
                for k in ROW_COUNTS:
                    t0 = time.perf_counter()
                    seq.decode([200 + i for i in range(k)], 400)
                    times[k].append((time.perf_counter() - t0) * 1000.0)
                    llama_cpp.llama_memory_seq_rm(mem, 0, 400, -1)
        return {k: statistics.median(v) for k, v in times.items()}
    finally:
        llama_cpp.llama_model_free(model)


def step_ms(costs: dict[int, float], rows: int) -> float:
    """What a step of ``rows`` rows costs: measured, between two measured counts on the
    line through them, beyond the largest on the last slope."""
    ks = sorted(costs)
    if rows in costs:
        return costs[rows]
    for a, b in zip(ks, ks[1:]):
        if a < rows < b:
            return costs[a] + (costs[b] - costs[a]) * (rows - a) / (b - a)
    a, b = ks[-2], ks[-1]
    return costs[b] + (costs[b] - costs[a]) / (b - a) * (rows - b)


def replay(answers: Sequence[Answer], costs: dict[int, float], drafter: str) -> tuple[int, float, int, int]:
    """(tokens, ms, drafted, accepted) over all answers with ``drafter`` off / long / resync."""
    table = StepCosts()
    for k in range(1, MAX_DRAFT + 2):
        table.ms[(1, table.bucket(k))] = step_ms(costs, table.bucket(k))
    tokens = drafted = accepted = 0
    ms = 0.0
    for ans in answers:
        index = NgramIndex(ans.prompt, resync=drafter == "resync")
        spec = SpecState(index)
        i = 0
        while i < len(ans.tokens):
            draft: list[int] = []
            if drafter != "off" and i >= spec.paused_until:
                offer = index.draft(min(MAX_DRAFT, len(ans.tokens) - i - 1))
                if offer:
                    k = plan_drafts([(spec.acceptance, len(offer))], 1, 1, table, 1 + MAX_DRAFT)[0]
                    draft = offer[:k]
            a = 0
            while a < len(draft) and draft[a] == ans.tokens[i + a]:
                a += 1
            new = ans.tokens[i:i + a + 1]
            ms += step_ms(costs, 1 + len(draft))
            drafted += len(draft)
            accepted += a
            i += len(new)
            if draft:
                spec.record(len(draft), a, i)
            index.extend(new)
        tokens += len(ans.tokens)
    return tokens, ms, drafted, accepted


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative_replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    parser.add_argument("--answers", type=int, default=5, help="sets of three grounded prompts (default: 5)")
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args(argv)
    _, gguf = resolve_model(args.model)
    if gguf is None:
        raise SystemExit("bench.speculative_replay needs a GGUF file (--model PATH)")
    answers = greedy_answers(str(gguf), args.answers, args.threads)
    costs = row_costs(str(gguf), args.threads)
    print(f"bench.speculative_replay — {len(answers)} greedy answers to grounded prompts, {args.threads} threads")
    print("decode step, ms by rows: " + ", ".join(f"{k}: {v:.1f}" for k, v in costs.items()))
    base = None
    print(f"{'drafter':<24} {'tok/s':>7} {'x off':>6} {'drafted':>8} {'accepted':>9} {'tokens':>7}")
    for name, label in (("off", "no speculation"), ("long", "long matches only"),
                        ("resync", "long + near the copy")):
        tokens, ms, drafted, accepted = replay(answers, costs, name)
        tps = tokens / ms * 1000.0
        base = base or tps
        print(f"{label:<24} {tps:>7.1f} {tps / base:>6.3f} {drafted:>8} {accepted:>9} {tokens:>7}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
