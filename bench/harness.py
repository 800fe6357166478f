"""What ``bench.serving`` and ``bench.batching`` share: arguments, servers, result tables.

Both benchmarks run edgevlm and llama-server side by side in one process: both are
started (each is idle while the other is measured), and every repetition visits them
in alternating order so slow drift on a shared machine hits both equally.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.client import BenchClient, fmt, median, paired_ratios, print_table, ratio
from bench.edgevlm_server import edgevlm_server
from bench.llama_server import cache_dir, ensure_llama_server, llama_server
from bench.model_files import DEFAULT_MODEL_ID, resolve_model
from bench.process import RunningServer, default_threads
from bench.prompts import chat_prompt, new_salt
from bench.tinymodels import projector_for

EDGEVLM = "edgevlm"
EDGEVLM_INPROC = "edgevlm-inproc"  # --compare-runners: the same server with every model in process
LLAMA_SERVER = "llama-server"


def add_common_args(parser: argparse.ArgumentParser, runs_default: int) -> None:
    parser.add_argument("--threads", type=int, default=default_threads(),
                        help="threads for both servers (default: all cores, %(default)s here)")
    parser.add_argument("--model", default=None,
                        help=f"GGUF path or edgevlm model id (default: {DEFAULT_MODEL_ID}); "
                             "llama-server is compared only when this resolves to a GGUF file")
    parser.add_argument("--runs", type=int, default=runs_default,
                        help="repetitions (default: %(default)s); lower it for a quick check")
    parser.add_argument("--skip-llama-server", action="store_true", help="measure edgevlm only")
    parser.add_argument("--skip-edgevlm", action="store_true", help="measure llama-server only")
    parser.add_argument("--no-build", action="store_true",
                        help="do not build llama-server when it is missing (skip the comparison)")
    parser.add_argument("--traces", default=None, help="edgevlm --traces PATH (default: none)")
    parser.add_argument("--json", type=Path, default=None, help="also write raw figures to this JSON file")
    parser.add_argument("--compare-runners", action="store_true",
                        help="run edgevlm twice, with --runners on (column edgevlm) and off (column "
                             f"{EDGEVLM_INPROC}), and compare the two")
    parser.add_argument("--mmproj", default=None, metavar="PATH|tiny",
                        help="vision projector for --model, loaded by both servers; `tiny` writes a "
                             "random-weight one that fits the model (measures what a projector and an "
                             "image cost, not what the model sees)")
    parser.add_argument("--edgevlm-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `edgevlm serve` (repeatable), e.g. --edgevlm-arg=--batch=256")


@contextlib.contextmanager
def start_servers(args: argparse.Namespace, *, parallel: int, ctx_size: int) -> Iterator[list[RunningServer]]:
    """Start the servers the arguments ask for (edgevlm first); stop them all on exit.

    ``ctx_size`` is passed as edgevlm ``--ctx-size`` and llama-server ``-c`` alike.
    """
    edge_model, gguf = resolve_model(args.model)
    vision: list[str] = []
    if args.mmproj:
        if gguf is None:
            raise SystemExit("[bench] --mmproj needs --model to be a GGUF file")
        mmproj = projector_for(gguf, cache_dir() / "models") if args.mmproj == "tiny" else Path(args.mmproj)
        edge_model, vision = str(gguf), ["--mmproj", str(mmproj)]
        print(f"[bench] vision projector {mmproj}")
    with contextlib.ExitStack() as stack:
        servers: list[RunningServer] = []
        if not args.skip_edgevlm:
            modes = [(EDGEVLM, ["--runners", "on"]), (EDGEVLM_INPROC, ["--runners", "off"])] \
                if args.compare_runners else [(EDGEVLM, [])]
            for name, mode_args in modes:
                server = stack.enter_context(edgevlm_server(
                    model=edge_model, threads=args.threads, ctx_size=ctx_size, parallel=parallel,
                    traces=args.traces, extra_args=[*args.edgevlm_arg, *mode_args, *vision]))
                server.name = name
                servers.append(server)
        if args.skip_llama_server:
            print("[bench] --skip-llama-server: no llama-server comparison")
        elif gguf is None:
            print(f"[bench] model {args.model!r} is not a GGUF file llama-server can load; "
                  "skipping llama-server comparison")
        else:
            binary = ensure_llama_server(build=not args.no_build)
            if binary is not None:
                servers.append(stack.enter_context(llama_server(
                    gguf, threads=args.threads, ctx_size=ctx_size, parallel=parallel, binary=binary,
                    extra_args=vision)))
        if not servers:
            raise SystemExit("[bench] nothing to measure")
        for s in servers:
            print(f"[bench] {s.name}: {s.base_url} model={s.model} (log {s.log_path})")
        yield servers


def in_order(items: list[Any], rep: int) -> list[Any]:
    """``items`` on even repetitions, reversed on odd ones."""
    return list(items) if rep % 2 == 0 else list(reversed(items))


async def warm_up(client: BenchClient, nonce: str) -> None:
    """One short request, discarded: loads code paths, opens the keep-alive connection."""
    await client.chat(chat_prompt(40, nonce), max_tokens=8)


Step = Callable[[RunningServer, BenchClient, int, str], Awaitable[None]]


async def alternate(servers: list[RunningServer], runs: int, *steps: Step) -> None:
    """Warm every server up, then per repetition run each step on every server in turn.

    Each step (a measurement, called as ``step(server, client, rep, salt)``) visits all
    servers before the next step starts, in an order that flips every step and every
    repetition. The two figures of a pair are then taken seconds apart, so the drift of
    a shared machine (often larger than the differences measured) hits both alike.
    """
    salt = new_salt()
    clients = {s.name: BenchClient(s.base_url, s.model) for s in servers}
    try:
        for s in servers:
            await warm_up(clients[s.name], f"{salt}-warm")
        for rep in range(runs):
            for i, step in enumerate(steps):
                for s in in_order(servers, rep + i):
                    await step(s, clients[s.name], rep, salt)
            print(f"[bench] repetition {rep + 1}/{runs} done", flush=True)
    finally:
        for c in clients.values():
            await c.aclose()


@dataclass
class Target:
    """A goal for edgevlm relative to llama-server."""

    text: str
    check: Callable[[float, float], bool]  # (edgevlm, llama-server) -> met?


# What a model's own runner process may cost against serving it in process.
RUNNER_SPEED = Target(">= 0.98x in-proc", lambda r, i: r >= 0.98 * i)
RUNNER_TTFT = Target("<= in-proc +3 ms", lambda r, i: r - i <= 3.0)


@dataclass
class Metric:
    label: str
    unit_spec: str = ".1f"  # format of the figures
    target: Target | None = None
    runner_target: Target | None = None  # (runners on, in process) with --compare-runners
    values: dict[str, list[float | None]] = field(default_factory=lambda: defaultdict(list))


class Results:
    """Named metrics, each with per-server samples; prints the comparison table."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.summaries: dict[str, dict[str, float | None]] = defaultdict(dict)

    def metric(self, key: str, label: str, unit_spec: str = ".1f", target: Target | None = None,
               runner_target: Target | None = None) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(label, unit_spec, target, runner_target)
        return self.metrics[key]

    def add(self, key: str, server: str, value: float | None) -> None:
        self.metrics[key].values[server].append(value)

    def print(self, title: str, servers: list[str], reducers: dict[str, Callable[[list[float | None]], float | None]],
              default_reducer: Callable[[list[float | None]], float | None]) -> None:
        """One row per metric: a column per server, edgevlm/llama-server ratio, target, verdict;
        with ``--compare-runners`` also runners/in-process, its target and verdict."""
        both = EDGEVLM in servers and LLAMA_SERVER in servers
        runners = EDGEVLM in servers and EDGEVLM_INPROC in servers
        headers = ["metric", *servers]
        if both:
            headers += ["edgevlm/llama", "target", "met"]
        if runners:
            headers += ["runners/in-proc", "target", "met"]
        rows = []
        for key, m in self.metrics.items():
            reduce = reducers.get(key, default_reducer)
            figures = {s: reduce(m.values.get(s, [])) for s in servers}
            for s, v in figures.items():
                self.summaries[key][s] = v
            row = [m.label, *(fmt(figures[s], m.unit_spec) for s in servers)]
            if both:
                row += _verdict(figures[EDGEVLM], figures[LLAMA_SERVER], m.target)
            if runners:
                row += _verdict(figures[EDGEVLM], figures[EDGEVLM_INPROC], m.runner_target)
            rows.append(row)
        print_table(headers, rows, title=title)

    def paired_ratios(self, key: str, reference: str = LLAMA_SERVER) -> list[float]:
        """edgevlm/``reference`` per measurement: the two figures were taken back to back,
        so drift on a shared machine, larger than the differences measured, cancels."""
        m = self.metrics[key]
        return paired_ratios(m.values.get(EDGEVLM, []), m.values.get(reference, []))

    def paired_summary(self, key: str, label: str, reference: str = LLAMA_SERVER) -> str:
        """One line: median, geometric mean and range of the paired ratios, and how many
        pairs met the metric's target (a ratio target: it reads only the ratio of the two
        figures). Against ``EDGEVLM_INPROC`` the runner target applies."""
        paired = self.paired_ratios(key, reference)
        if not paired:
            return f"{label}: no pairs"
        geomean = math.exp(statistics.fmean(math.log(r) for r in paired))
        short = "llama" if reference == LLAMA_SERVER else reference
        line = (f"{label}, edgevlm/{short}: median {median(paired):.2f}, geomean {geomean:.2f} "
                f"(range {min(paired):.2f}-{max(paired):.2f}, {len(paired)} pairs)")
        m = self.metrics[key]
        target = m.runner_target if reference == EDGEVLM_INPROC else m.target
        if target is not None:
            met = sum(1 for r in paired if target.check(r, 1.0))
            line += f"; target {target.text} met in {met}/{len(paired)}"
        return line

    def to_json(self) -> dict[str, Any]:
        return {
            key: {"label": m.label, "samples": dict(m.values), "summary": self.summaries.get(key, {})}
            for key, m in self.metrics.items()
        }


def _verdict(ours: float | None, reference: float | None, target: Target | None) -> list[str]:
    """Ratio, target text and whether it was met, as table cells."""
    met = "-" if (target is None or ours is None or reference is None) else (
        "yes" if target.check(ours, reference) else "NO")
    return [fmt(ratio(ours, reference), ".2f"), target.text if target else "", met]


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"[bench] raw figures written to {path}")
