"""``edgevlm bench``: the PalmBench-style sweep over model variants and thread counts.

Each cell (one variant at one thread count) starts ``edgevlm serve`` on that file with
its own trace file, drives the bundled workload (short and long prompts, streamed and
not, images where the model has a projector), the QA set (and the image QA set for a
VLM) and the toxicity prompts through the real server path, and samples the server's peak
RSS. Latency, throughput and energy are read back from the cell's trace with ``edgevlm
report``'s own code, so ``results.csv`` and the report cannot disagree. Quality (KLD,
same-top-p, PPL) is measured in this process against the reference model, over the text
and, for a variant with a projector, over the bundled image prompts.

A finished cell is a row in ``results.csv``; a rerun skips it, so an interrupted sweep
resumes where it stopped (an unfinished cell is redone from scratch).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench import image_prompts, qa, toxicity
from bench.client import BenchClient
from bench.edgevlm_server import edgevlm_server
from bench.image_quality import ImageReference
from bench.prompts import chat_prompt, new_salt
from bench.quality import QualityError, Reference

COLUMNS = ["cell", "model", "file", "quantization", "source_quantization", "requantized", "threads", "device",
           "bpw", "file_mib", "load_s", "peak_rss_mib", "requests", "errors", "ttft_p50_ms", "ttft_p95_ms",
           "prefill_tok_s", "decode_tok_s", "j_per_token", "energy_source", "kld_mean", "kld_stderr",
           "same_top_p_pct", "ppl", "qa_accuracy", "fabrication_rate", "toxicity_rate", "kernels",
           "repack_mib", "trace", "workload_start_ns", "workload_end_ns", "imatrix", "image_kld_mean",
           "image_kld_stderr", "image_same_top_p_pct", "image_ppl", "image_qa_accuracy"]
# Figures that depend on the variant only, not the thread count: measured once per variant.
BEHAVIOUR = ("qa_accuracy", "fabrication_rate", "toxicity_rate", "image_qa_accuracy")


class BenchError(ValueError):
    """Bad sweep arguments: a missing model file, an unreadable workload."""


@dataclass(frozen=True)
class Variant:
    path: Path
    mmproj: Path | None

    @property
    def name(self) -> str:
        return self.path.stem


def variant(spec: str) -> Variant:
    """A GGUF path; its projector is ``mmproj-<stem>.gguf`` beside it, as ``--models-dir`` pairs them."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise BenchError(f"{spec}: no such model file")
    mm = path.with_name(f"mmproj-{path.stem}.gguf")
    return Variant(path.resolve(), mm.resolve() if mm.is_file() else None)


def load_workload(path: str | None) -> list[dict[str, Any]]:
    try:
        text = (Path(path).read_text(encoding="utf-8") if path
                else resources.files("bench").joinpath("data", "workload.json").read_text(encoding="utf-8"))
        items = json.loads(text)["requests"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BenchError(f"workload {path}: {exc}") from exc
    return items


def progress(total: int, desc: str) -> Any:
    """A tqdm bar on a terminal; a silent counter otherwise (logs, tests, CI)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not sys.stderr.isatty(), leave=False)


@contextmanager
def rss_sampler(pid: int, interval_s: float = 0.2) -> Iterator[Callable[[], float]]:
    """Peak RSS (MiB) of a process and its children (the model runners), sampled in a thread."""
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(pid)
        except psutil.Error:
            return
        while not stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                peak[0] = max(peak[0], total / 2**20)
            except psutil.Error:
                return
            stop.wait(interval_s)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield lambda: peak[0]
    finally:
        stop.set()
        t.join(timeout=5)


def _image_part(url: str | None = None) -> dict[str, Any]:
    """An image content part: ``url``, or the workload's plain 64x48 picture."""
    if url is None:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (64, 48), (200, 80, 40)).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"type": "image_url", "image_url": {"url": url}}


async def _plain_chat(client: httpx.AsyncClient, url: str, model: str, messages: list[dict[str, Any]],
                      max_tokens: int, **extra: Any) -> str:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    r = await client.post(f"{url}/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise BenchError(f"server answered {r.status_code}: {r.text[:300]}")
    return r.json()["choices"][0]["message"]["content"] or ""


async def drive(base_url: str, model: str, workload: list[dict[str, Any]], repeat: int, vision: bool,
                measure_qa: bool, measure_toxicity: bool, tick: Callable[[], None]) -> dict[str, Any]:
    """Workload, QA set and provocation prompts through the server; returns the answers."""
    salt = new_salt()
    stream = BenchClient(base_url, model, ignore_eos=False)
    answers: list[str] = []
    image_answers: list[str] = []
    outputs: list[str] = []
    async with httpx.AsyncClient(timeout=600) as plain:
        try:
            await stream.chat(chat_prompt(40, f"{salt}-warm"), max_tokens=8)
            window = [time.time_ns()]
            for rep in range(repeat):
                for i, item in enumerate(workload):
                    if item.get("image") and not vision:
                        continue
                    messages = chat_prompt(int(item.get("prompt_tokens", 48)), f"{salt}-{rep}-{i}")
                    if item.get("image"):
                        messages[-1] = {"role": "user", "content": [
                            {"type": "text", "text": "Describe the image."}, _image_part()]}
                    max_tokens = int(item.get("max_tokens", 32))
                    if item.get("stream", True):
                        await stream.chat(messages, max_tokens=max_tokens)
                    else:
                        await _plain_chat(plain, base_url, model, messages, max_tokens)
                    tick()
                    check_stop()
            window.append(time.time_ns())
            if measure_qa:
                instruction, items = qa.load_items()
                for item in items:
                    answers.append(await _plain_chat(plain, base_url, model, [
                        {"role": "system", "content": instruction}, {"role": "user", "content": item.question}],
                        16))
                if vision:
                    for picture in image_prompts.prompts():
                        image_answers.append(await _plain_chat(plain, base_url, model, [
                            {"role": "system", "content": image_prompts.INSTRUCTION},
                            {"role": "user", "content": [{"type": "text", "text": picture.question},
                                                         _image_part(picture.png_data_url())]}], 16))
                tick()
            if measure_toxicity:
                for prompt in toxicity.prompts():
                    outputs.append(await _plain_chat(plain, base_url, model,
                                                     [{"role": "user", "content": prompt}], 32))
                tick()
        finally:
            await stream.aclose()
    return {"qa_answers": answers, "image_qa_answers": image_answers, "toxicity_outputs": outputs,
            "window_ns": window}


def workload_spans(trace: Path, window_ns: tuple[int, int]) -> list[dict[str, Any]]:
    """The spans of requests that started inside the workload window (not the warm-up, QA or
    toxicity requests, which would make cells with and without them incomparable)."""
    from telemetry.report import load_spans

    lo, hi = window_ns
    return [s for s in load_spans([str(trace)])[0] if lo <= int(s.get("startTimeUnixNano", 0)) <= hi]


def trace_summary(trace: Path, window_ns: tuple[int, int]) -> dict[str, Any]:
    """The cell's workload figures, computed by ``edgevlm report``'s own aggregation."""
    from telemetry.report import Group, request_rows

    rows = request_rows(workload_spans(trace, window_ns))
    if not rows:
        return {"requests": 0}
    g = Group(rows[0].device, str(rows[0].attrs.get("gen_ai.request.model")),
              str(rows[0].attrs.get("edgevlm.model.quantization")), "all", rows=rows)
    bpw = [r.attrs.get("edgevlm.model.bits_per_weight") for r in rows]
    s = g.summary()
    s.pop("ttft_values", None)
    return {**s, "device": g.device, "quantization": g.quantization,
            "bpw": next((float(b) for b in bpw if isinstance(b, (int, float))), None)}


def read_results(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def append_result(path: Path, row: dict[str, Any]) -> None:
    """One finished cell; the row is written and flushed whole, so a crash leaves no half row."""
    new = not path.is_file() or path.stat().st_size == 0
    columns = COLUMNS
    if not new:  # a sweep resumed by a newer edgevlm keeps the file's own columns
        with path.open(newline="", encoding="utf-8") as f:
            columns = next(csv.reader(f), COLUMNS)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    if new:
        w.writeheader()
    w.writerow({k: _cell_text(row.get(k)) for k in columns})
    with path.open("a", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())


def _cell_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


MD_COLUMNS = [("model", "variant"), ("origin", "origin"), ("threads", "threads"), ("bpw", "BPW"), ("file_mib", "file MiB"),
              ("load_s", "load s"), ("peak_rss_mib", "peak RSS MiB"), ("ttft_p50_ms", "TTFT p50 ms"),
              ("ttft_p95_ms", "TTFT p95 ms"), ("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
              ("j_per_token", "J/token"), ("energy_source", "J source"), ("kld_mean", "KLD"),
              ("same_top_p_pct", "same top p %"), ("ppl", "PPL"), ("qa_accuracy", "QA acc"),
              ("fabrication_rate", "fabrication"), ("toxicity_rate", "toxicity (proxy)")]
# Shown only when some variant has a projector (a text-only sweep's table stays as it was).
MD_IMAGE_COLUMNS = [("image_kld_mean", "image KLD"), ("image_same_top_p_pct", "image same top p %"),
                    ("image_qa_accuracy", "image QA acc")]


def _md_value(v: str) -> str:
    if v in ("", None):
        return "–"
    try:
        f = float(v)
    except ValueError:
        return v
    if f == int(f) and abs(f) >= 100:
        return str(int(f))
    return f"{f:.3g}" if abs(f) < 100 else f"{f:.0f}"


def origin(row: dict[str, str]) -> str:
    """Where a variant came from: every figure of a requantization says so."""
    src = row.get("source_quantization") or ""
    guided = f" with importance matrix {row['imatrix']}" if row.get("imatrix") else ""
    if row.get("requantized") == "yes":
        return f"requantized from {src}{guided}"
    return f"from {src}{guided}" if src else "as shipped"


def has_image_figures(rows: list[dict[str, str]]) -> bool:
    return any(r.get(k) for r in rows for k, _ in MD_IMAGE_COLUMNS)


def results_table(rows: list[dict[str, str]]) -> str:
    columns = MD_COLUMNS + (MD_IMAGE_COLUMNS if has_image_figures(rows) else [])
    rows = [{**r, "origin": origin(r)} for r in rows]
    head = "| " + " | ".join(h for _, h in columns) + " |"
    lines = [head, "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_value(r.get(k, "")) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(out: Path, rows: list[dict[str, str]], notes: list[str]) -> Path:
    requant = sorted({f"{r['source_quantization']}" for r in rows if r.get("requantized") == "yes"})
    text = ["# edgevlm bench results", ""]
    if requant:
        text += [f"**Requantized variants:** rows marked \"requantized\" were quantized from an already "
                 f"quantized file ({', '.join(requant)}); their errors include the source's.", ""]
    text += [results_table(rows), ""]
    text += ["QA accuracy counts right answers and right \"unknown\"s; fabrication is the share of unanswerable "
             "questions that got an answer anyway (a cheap stand-in for PalmBench's hallucination measure). "
             "Toxicity is the share of provocation replies flagged by alt-profanity-check, a profanity "
             "classifier: a proxy. KLD, same-top-p and PPL are against the reference model given to the sweep.",
             ""]
    if has_image_figures(rows):
        text += ["Image KLD and same-top-p score the reference's greedy answers to the bundled image prompts "
                 "(`bench/image_prompts.py`), teacher-forced through each variant with its projector; image QA "
                 "is the share of those questions answered right (exact/normalised match). Empty for text-only "
                 "variants. With a random-weight tiny VLM these figures show the mechanics only.", ""]
    text += notes
    path = out / "results.md"
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def run_cell(v: Variant, threads: int, args: argparse.Namespace, out: Path, source_type: str,
             quality: dict[str, Any], measure_qa: bool, measure_tox: bool, bar: Any) -> dict[str, Any]:
    """One variant at one thread count; QA and toxicity only when asked (they do not depend on
    threads, so the sweep measures them at one thread count and reuses them)."""
    from models import cpu_paths
    from models.quantize import imatrix_of, is_requantization

    cell = f"{v.name}-t{threads}"
    trace = out / "traces" / f"{cell}.jsonl"
    trace.parent.mkdir(parents=True, exist_ok=True)
    for old in trace.parent.glob(f"{cell}.jsonl*"):
        old.unlink()  # an interrupted attempt: start the cell over
    extra = ["--mmproj", str(v.mmproj)] if v.mmproj else []
    started = time.monotonic()
    with edgevlm_server(model=str(v.path), threads=threads, ctx_size=args.ctx_size, parallel=1, traces=trace,
                        extra_args=["--traces-flush-ms", "100", *extra]) as srv:
        load_s = time.monotonic() - started
        with rss_sampler(srv.process.pid) as peak:
            answers = asyncio.run(drive(srv.base_url, srv.model, args.workload_items, args.repeat,
                                        v.mmproj is not None, measure_qa, measure_tox, bar.update))
            rss = peak()
    window = (answers["window_ns"][0], answers["window_ns"][-1])
    summary = trace_summary(trace, window)
    row: dict[str, Any] = {
        "cell": cell, "model": v.name, "file": str(v.path), "threads": threads, "load_s": load_s,
        "peak_rss_mib": rss, "file_mib": v.path.stat().st_size / 2**20, "trace": str(trace.relative_to(out)),
        "workload_start_ns": window[0], "workload_end_ns": window[1],
        "source_quantization": source_type, **{k: summary.get(k) for k in (
            "device", "quantization", "bpw", "requests", "errors", "ttft_p50_ms", "ttft_p95_ms", "prefill_tok_s",
            "decode_tok_s", "j_per_token", "energy_source")},
    }
    row["imatrix"] = imatrix_of(v.path) or ""
    derived = args.source is not None and v.path != args.source
    row["requantized"] = "yes" if derived and is_requantization(source_type) else "no"
    if not derived:
        row["source_quantization"] = ""
    row.update(quality)
    if answers["qa_answers"]:
        _, items = qa.load_items()
        s = qa.score(items, answers["qa_answers"])
        row["qa_accuracy"], row["fabrication_rate"] = s.accuracy, s.fabrication_rate
    if answers["image_qa_answers"]:
        pictures = image_prompts.prompts()
        row["image_qa_accuracy"] = qa.score([p.qa_item() for p in pictures], answers["image_qa_answers"]).accuracy
    if answers["toxicity_outputs"]:
        row["toxicity_rate"] = toxicity.flagged_rate(answers["toxicity_outputs"])
    row["answers"] = answers
    verdict = cpu_paths.choose(str(v.path), "auto", threads)
    row["kernels"] = verdict.describe()
    row["repack_mib"] = sum(verdict.buffers_mib.values()) if verdict.buffers_mib else 0.0
    return row


def image_quality(v: Variant, ref_path: str, args: argparse.Namespace,
                  refs: dict[str, ImageReference | QualityError], threads: int) -> dict[str, Any]:
    """A VLM variant's KLD/same-top-p/PPL over the bundled image prompts (empty when it cannot be
    measured, with the reason printed). The reference answers once per reference projector:
    ``--reference-mmproj``, else the one paired with the reference file, else the variant's own."""
    assert v.mmproj is not None
    ref_mm = args.reference_mmproj
    if ref_mm is None:
        paired = variant(ref_path).mmproj if Path(ref_path).is_file() else None
        ref_mm = str(paired or v.mmproj)
    if ref_mm not in refs:
        print(f"[bench] image-prompt reference: {ref_path} with {ref_mm}", flush=True)
        try:
            refs[ref_mm] = ImageReference(ref_path, ref_mm, threads=threads)
        except QualityError as exc:
            refs[ref_mm] = exc
    ref = refs[ref_mm]
    try:
        if isinstance(ref, QualityError):
            raise ref
        q = ref.measure(v.path, v.mmproj)
    except QualityError as exc:
        print(f"[bench] {v.name}: image-prompt quality not measured: {exc}")
        return {}
    return {"image_kld_mean": q.kld_mean, "image_kld_stderr": q.kld_stderr,
            "image_same_top_p_pct": q.same_top_p_pct, "image_ppl": q.ppl_model}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm bench", description="PalmBench-style sweep: every variant at every "
                                "thread count through the real server, with quality, QA and toxicity.")
    p.add_argument("--models", required=True, help="comma-separated GGUF files (the variants)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    p.add_argument("--workload", default=None, help="workload JSON (default: the bundled one)")
    p.add_argument("--repeat", type=int, default=3, help="passes over the workload per cell (default 3)")
    p.add_argument("--out", default="bench-results", help="output directory (default ./bench-results)")
    p.add_argument("--reference", default=None, help="reference GGUF for KLD/PPL (default: --source, else the "
                   "first model)")
    p.add_argument("--reference-mmproj", default=None, help="the reference's projector for image-prompt "
                   "quality (default: the one paired with the reference, else each variant's own)")
    p.add_argument("--source", default=None, help="the file the variants were quantized from (marks requantizations)")
    p.add_argument("--ctx-size", type=int, default=2048, help="server context per cell")
    p.add_argument("--quality-ctx", type=int, default=256, help="tokens per quality chunk")
    p.add_argument("--quality-chunks", type=int, default=4, help="quality chunks scored (0: skip quality)")
    p.add_argument("--no-qa", action="store_true", help="skip the QA set")
    p.add_argument("--no-toxicity", action="store_true", help="skip the toxicity probe")
    p.add_argument("--no-report", action="store_true", help="do not run edgevlm report at the end")
    return p


_stop = threading.Event()


def _interrupt(signum: int, frame: Any) -> None:
    _stop.set()  # remembered: an exception raised inside a ctypes callback (llama.cpp's log) is lost
    raise KeyboardInterrupt(f"signal {signum}")


def check_stop() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived (even one whose exception was swallowed)."""
    if _stop.is_set():
        raise KeyboardInterrupt("stop requested")


def main(argv: list[str] | None = None) -> int:
    from models.quantize import QuantizeError, source_type

    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (and SIGINT, even where a shell started us with it ignored) stops the sweep the
        # way Ctrl-C does: the cell's server is stopped, finished cells stay in results.csv.
        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
    variants = [variant(m) for m in args.models.split(",") if m.strip()]
    if not variants:
        raise BenchError("--models names no model")
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError as exc:
        raise BenchError(f"--threads: {exc}") from exc
    if not threads or min(threads) < 1 or args.repeat < 1:
        raise BenchError("--threads and --repeat must be positive")
    args.workload_items = load_workload(args.workload)
    args.source = Path(args.source).resolve() if args.source else None
    try:
        src_type = source_type(args.source) if args.source else ""
    except QuantizeError as exc:
        raise BenchError(str(exc)) from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.csv"
    done = {r["cell"] for r in read_results(results)}
    tox_ok = not args.no_toxicity and toxicity.available()
    notes = []
    if not args.no_toxicity and not tox_ok:
        notes.append("Toxicity: blocked (alt-profanity-check is not installed; `pip install 'edgevlm[bench]'`).")
    todo = [(v, t) for v in variants for t in threads if f"{v.name}-t{t}" not in done]
    for v, t in [(v, t) for v in variants for t in threads if f"{v.name}-t{t}" in done]:
        print(f"[bench] {v.name} threads={t}: done earlier, kept")
    reference = None
    ref_path = args.reference or (str(args.source) if args.source else str(variants[0].path))
    if todo and args.quality_chunks > 0:
        print(f"[bench] reference for quality: {ref_path}", flush=True)
        try:
            reference = Reference(ref_path, ctx=args.quality_ctx, max_chunks=args.quality_chunks,
                                  threads=max(threads))
        except QualityError as exc:
            raise BenchError(f"reference {ref_path}: {exc}") from exc
    steps_per_cell = args.repeat * len(args.workload_items) + 2
    quality_cache: dict[Path, dict[str, Any]] = {}
    image_refs: dict[str, ImageReference | QualityError] = {}
    # QA and toxicity per variant, from its first finished cell (earlier runs included).
    behaviour: dict[str, dict[str, Any]] = {
        r["model"]: {k: r.get(k, "") for k in BEHAVIOUR}
        for r in read_results(results) if r.get("qa_accuracy") or r.get("toxicity_rate")}
    with progress(len(todo) * steps_per_cell, "sweep") as bar:
        for v, t in todo:
            check_stop()
            print(f"[bench] {v.name} threads={t} ...", flush=True)
            if reference is not None and v.path not in quality_cache:
                try:
                    q = reference.measure(v.path)
                    quality_cache[v.path] = {"kld_mean": q.kld_mean, "kld_stderr": q.kld_stderr,
                                             "same_top_p_pct": q.same_top_p_pct, "ppl": q.ppl_model}
                except QualityError as exc:
                    print(f"[bench] {v.name}: quality not measured: {exc}")
                    quality_cache[v.path] = {}
                if v.mmproj is not None:
                    quality_cache[v.path].update(image_quality(v, ref_path, args, image_refs, max(threads)))
            check_stop()
            known = behaviour.get(v.name)
            row = run_cell(v, t, args, out, src_type, quality_cache.get(v.path, {}),
                           not args.no_qa and known is None, tox_ok and known is None, bar)
            if known is not None:
                row.update({k: val for k, val in known.items() if val not in ("", None)})
            else:
                behaviour[v.name] = {k: row.get(k) for k in BEHAVIOUR}
            append_result(results, row)
            answers_file = out / "answers" / f"{row['cell']}.json"
            if any(row["answers"][k] for k in ("qa_answers", "image_qa_answers", "toxicity_outputs")):
                answers_file.parent.mkdir(parents=True, exist_ok=True)
                answers_file.write_text(json.dumps(row["answers"], indent=1), encoding="utf-8")
            print(f"[bench] {row['cell']}: decode {_cell_text(row.get('decode_tok_s'))} tok/s, "
                  f"TTFT p50 {_cell_text(row.get('ttft_p50_ms'))} ms, RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    rows = read_results(results)
    md = write_markdown(out, rows, notes)
    print(results_table(rows))
    print(f"[bench] {len(rows)} cell(s) -> {results} and {md}")
    if not args.no_report:
        from telemetry.report import main as report_main

        report_main([str(out / "traces"), "--out", str(out / "report"), "--bench", str(results)])
    return 0
