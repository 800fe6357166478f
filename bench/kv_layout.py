"""KV layout benchmark: one decode step of several streams, shared pool vs a stream per slot.

    python -m bench.kv_layout [--threads N] [--streams 4] [--cells 100,750,1500] [--rounds 30]

Loads the model once and makes two contexts of the same size and slot count, one with
llama.cpp's unified KV pool (``--kv-layout shared``) and one with a KV stream per slot
(``--kv-layout per-slot``). Each stream is prefilled with the same number of cells (the
streams' chunks interleaved, as a batched prefill lays them out), then a decode step of
one row per stream is timed over and over, the two contexts taking turns in blocks of
five steps, so the machine's drift hits both alike. Prints the median step per layout
and their ratio; nothing here is edgevlm's Python, only the llama.cpp calls it makes.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import llama_cpp

from bench.client import print_table
from bench.harness import in_order, write_json
from bench.model_files import resolve_model
from bench.process import default_threads
from models.llama_lib import decode_rows, ensure_backend

CTX_SIZE = 8192
PREFILL_CHUNK = 128
BLOCK = 5


class Layout:
    """One context of ``streams`` sequences, each holding ``cells`` cells."""

    def __init__(self, model: llama_cpp.llama_model_p, unified: bool, streams: int, cells: int, threads: int):
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = CTX_SIZE
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = streams
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = unified
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(model, params)
        if not self.ctx:
            raise SystemExit(f"could not create a context of {CTX_SIZE} cells for {streams} streams")
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(512, 0, 1)
        self.streams, self.cells = streams, cells
        chunk = max(1, min(PREFILL_CHUNK, 512 // streams))
        for start in range(0, cells, chunk):
            rows = [(s, k) for s in range(streams) for k in range(start, min(cells, start + chunk))]
            self._decode([(100 + (k * 7 + s) % 1000, k, s, False) for s, k in rows])

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> float:
        t0 = time.perf_counter()
        if decode_rows(self.ctx, self.batch, rows) != 0:
            raise SystemExit("llama_decode failed")
        return (time.perf_counter() - t0) * 1000.0

    def step(self) -> float:
        """One decode row per stream at the end of its cells (then removed again): ms."""
        ms = self._decode([(200 + s, self.cells, s, True) for s in range(self.streams)])
        for s in range(self.streams):
            llama_cpp.llama_memory_seq_rm(self.mem, s, self.cells, -1)
        return ms

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)


def measure(model: llama_cpp.llama_model_p, streams: int, cells: int, threads: int,
            rounds: int) -> dict[str, list[float]]:
    layouts = {"shared": Layout(model, True, streams, cells, threads),
               "per-slot": Layout(model, False, streams, cells, threads)}
    times: dict[str, list[float]] = {name: [] for name in layouts}
    try:
        for r in range(rounds):
            for name in in_order(list(layouts), r):
                times[name] += [layouts[name].step() for _ in range(BLOCK)]
    finally:
        for layout in layouts.values():
            layout.close()
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_layout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--model", default=None, help="GGUF path (default: the embedded model)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--cells", default="100,750,1500", help="cells per stream, comma-separated")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    cells = [int(c) for c in args.cells.split(",")]
    if args.streams < 2 or max(cells) * args.streams + args.streams > CTX_SIZE:
        parser.error(f"--streams >= 2 and streams x cells must fit {CTX_SIZE} cells")
    _, gguf = resolve_model(args.model)
    if gguf is None:
        parser.error("no GGUF file for this model")
    ensure_backend()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), params)
    if not model:
        raise SystemExit(f"could not load {gguf}")
    rows, raw = [], {}
    try:
        for n in cells:
            times = measure(model, args.streams, n, args.threads, args.rounds)
            shared, per_slot = statistics.median(times["shared"]), statistics.median(times["per-slot"])
            rows.append([str(n), f"{shared:.1f}", f"{per_slot:.1f}", f"{shared / per_slot:.2f}"])
            raw[n] = times
    finally:
        llama_cpp.llama_model_free(model)
    print_table(["cells per stream", "shared (ms/step)", "per-slot (ms/step)", "shared / per-slot"], rows,
                title=f"bench.kv_layout — {args.streams} streams, {args.threads} threads, {platform.machine()}, "
                      f"medians of {args.rounds * BLOCK} steps per layout")
    write_json(args.json, {"benchmark": "kv_layout", "streams": args.streams, "threads": args.threads,
                           "figures": {str(k): v for k, v in raw.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
