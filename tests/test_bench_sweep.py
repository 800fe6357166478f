"""``edgevlm bench`` resumes after an interruption; ``edgevlm report --bench`` draws the PalmBench
views from numbers that match the traces."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench import image_prompts
from bench.tinymodels import tiny_vlm
from models.quantize import quantize
from server.cli import main
from telemetry import palmbench
from telemetry.otlp_json import flat_spans, from_key_values


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A two-variant sweep interrupted after its first cell (SIGTERM), then run again."""
    base = tmp_path_factory.mktemp("sweep")
    q8 = quantize(tiny_llm, base / "tiny.Q8_0.gguf", "Q8_0")
    vlm, mmproj = tiny_vlm(base / "vlm", "pixtral")
    os.link(mmproj, vlm.with_name(f"mmproj-{vlm.stem}.gguf"))  # paired as --models-dir pairs them
    out = base / "out"
    args = ["bench", "--models", f"{tiny_llm},{q8},{vlm}", "--source", str(tiny_llm), "--threads", "1",
            "--repeat", "1", "--quality-ctx", "64", "--quality-chunks", "1", "--no-toxicity", "--no-report",
            "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    results = out / "results.csv"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if results.is_file() and len(rows(results)) == 1:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGTERM)
    first_output = proc.communicate(timeout=120)[0]
    assert len(rows(results)) == 1, first_output  # interrupted before the second cell finished
    assert proc.returncode != 0
    left = [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    assert not left, left  # the interrupted cell's server was stopped
    first_row = rows(results)[0]
    first_trace = out / first_row["trace"]
    mtime = first_trace.stat().st_mtime_ns
    assert main(args) == 0  # resume
    second = rows(results)
    assert second[0] == first_row and first_trace.stat().st_mtime_ns == mtime  # not redone
    return out, first_row["cell"]


def test_an_interrupted_sweep_resumes_without_redoing_finished_cells(sweep: tuple[Path, str], tiny_llm: Path) -> None:
    out, first_cell = sweep
    table = rows(out / "results.csv")
    assert [r["cell"] for r in table][:2] == [f"{tiny_llm.stem}-t1", "tiny.Q8_0-t1"] and len(table) == 3
    assert table[0]["cell"] == first_cell
    for r in table:
        assert int(r["requests"]) >= 4 and r["errors"] == "0"  # the workload, read back from the trace
        assert float(r["decode_tok_s"]) > 0 and float(r["peak_rss_mib"]) > 0 and float(r["load_s"]) > 0
        assert r["qa_accuracy"] != "" and r["fabrication_rate"] != ""
        assert "CPU fast paths" in r["kernels"]
    ref, q8, vlm = table
    # the VLM's workload included its image request (mechanics only: random weights)
    assert int(vlm["requests"]) == int(ref["requests"]) + 1
    images = [a for a in _workload_attrs(out / vlm["trace"], int(vlm["workload_start_ns"]), int(vlm["workload_end_ns"]))
              if (a.get("edgevlm.image.tokens_before") or 0) > 0]
    assert len(images) == 1
    assert float(ref["kld_mean"]) == 0 and float(ref["same_top_p_pct"]) == 100  # the reference itself
    assert float(q8["kld_mean"]) > 0 and float(q8["bpw"]) < float(ref["bpw"])
    assert ref["requantized"] == "no" and q8["requantized"] == "no"  # the source is F16, not quantized
    assert "| tiny.Q8_0 | from F16 | 1 |" in (out / "results.md").read_text()


def test_a_vlm_row_has_image_prompt_figures_and_a_text_only_row_has_none(sweep: tuple[Path, str]) -> None:
    out, _ = sweep
    ref, q8, vlm = rows(out / "results.csv")
    image_columns = ("image_kld_mean", "image_kld_stderr", "image_same_top_p_pct", "image_ppl", "image_qa_accuracy")
    for text_only in (ref, q8):
        assert all(text_only[k] == "" for k in image_columns)
    # the VLM against the reference with its own projector (mechanics only: random weights)
    assert float(vlm["image_kld_mean"]) >= 0 and 0 <= float(vlm["image_same_top_p_pct"]) <= 100
    assert float(vlm["image_ppl"]) > 0 and 0 <= float(vlm["image_qa_accuracy"]) <= 1
    answers = json.loads((out / "answers" / f"{vlm['cell']}.json").read_text())
    assert len(answers["image_qa_answers"]) == len(image_prompts.prompts())  # asked through the server
    md = (out / "results.md").read_text()
    assert "| image KLD | image same top p % | image QA acc |" in md and "mechanics only" in md
    assert md.split("\n| tiny.Q8_0 |")[1].split("\n")[0].endswith("| – | – | – |")


def _workload_attrs(trace: Path, lo: int, hi: int) -> list[dict]:
    """Attributes of the request spans that started in the workload window, straight from the trace lines."""
    out = []
    for line in trace.read_text().splitlines():
        for span in flat_spans(json.loads(line)):
            a = from_key_values(span.get("attributes"))
            if "gen_ai.operation.name" in a and lo <= int(span["startTimeUnixNano"]) <= hi:
                out.append(a)
    return out


def _independent_figures(trace: Path, lo: int, hi: int) -> tuple[float, float]:
    """Median decode tok/s and TTFT of the workload requests."""
    attrs = _workload_attrs(trace, lo, hi)
    return (statistics.median(a["edgevlm.decode_tokens_per_s"] for a in attrs),
            statistics.median(a["edgevlm.ttft_ms"] for a in attrs))


def test_report_draws_palmbench_views_from_the_traces(sweep: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = sweep
    report = tmp_path / "report"
    assert main(["report", str(out / "traces"), "--out", str(report), "--bench", str(out / "results.csv")]) == 0
    assert (report / "metrics_vs_bpw.png").stat().st_size > 1000 and (report / "pareto.png").stat().st_size > 1000
    text = (report / "report.md").read_text()
    assert "## PalmBench views" in text and "### Recommendation" in text and "8-bit-quantized activations" in text
    points = {p["cell"]: p for p in json.loads((report / "palmbench.json").read_text())["points"]}
    for r in rows(out / "results.csv"):
        decode, ttft = _independent_figures(out / r["trace"], int(r["workload_start_ns"]), int(r["workload_end_ns"]))
        assert points[r["cell"]]["decode_tok_s"] == pytest.approx(decode, rel=1e-5)
        assert points[r["cell"]]["ttft_p50_ms"] == pytest.approx(ttft, rel=1e-5)
        assert points[r["cell"]]["bpw"] == pytest.approx(float(r["bpw"]))


def _row(cell: str, bpw: float, decode: float, ttft: float, rss: float, kld: float) -> dict:
    return {"cell": cell, "model": cell, "threads": 1.0, "device": "box", "bpw": bpw, "decode_tok_s": decode,
            "ttft_p50_ms": ttft, "peak_rss_mib": rss, "kld_mean": kld, "quantization": cell}


def test_fit_pareto_and_recommendation_follow_the_numbers() -> None:
    table = [_row("Q8_0", 8.5, 20.0, 250, 390, 0.001), _row("Q4_0", 4.5, 40.0, 150, 300, 0.05),
             _row("Q2_K", 2.6, 49.5, 120, 280, 0.4), _row("Q5_K", 5.5, 30.0, 400, 320, 0.06)]
    fit = next(f for f in palmbench.fits(table) if f.metric == "ttft_p50_ms")
    assert fit.n == 4 and fit.r2 is not None and 0 <= fit.r2 < 1
    exact = palmbench.linear_fit([1, 2, 3], [3, 5, 7])
    assert exact == pytest.approx((2.0, 1.0, 1.0))
    assert palmbench.pareto_front(table) == ["Q8_0", "Q4_0", "Q2_K"]  # Q5_K: slower and worse than Q4_0
    text = palmbench.recommendation(table)[0]
    assert "most accurate variant under 300 ms TTFT p50 and 400 MiB peak RSS is Q8_0" in text
    assert "fastest decoder is Q2_K" in text and "Below the 3.5 BPW floor: Q2_K" in text
    table[0]["peak_rss_mib"] = 410  # Q8_0 no longer fits in memory
    assert "peak RSS is Q4_0" in palmbench.recommendation(table)[0]


def test_report_puts_each_type_with_and_without_a_matrix_side_by_side() -> None:
    plain, guided, other = _row("Q2_K", 5.1, 60.0, 200, 300, 0.58), _row("Q2_K", 5.1, 60.0, 200, 300, 0.37), \
        _row("Q4_0", 5.4, 70.0, 150, 310, 0.26)
    for r, matrix in ((plain, ""), (guided, "smollm2.imatrix.gguf"), (other, "")):
        r.update(quantization=r["model"], source_quantization="Q4_1", imatrix=matrix,
                 same_top_p_pct=60.0, ppl=40.0)
    assert palmbench.imatrix_pairs([plain, guided, other]) == [(plain, guided)]  # Q4_0 has no partner
    text = palmbench.render_section([plain, guided, other], [], [], 1000.0, 400.0)
    assert "### With and without an importance matrix" in text
    assert "| Q2_K | none | 5.10 | 0.5800 |" in text and "| Q2_K | smollm2.imatrix.gguf | 5.10 | 0.3700 |" in text
    assert "Q4_0 |" not in text.split("### With and without")[1].split("###")[0]
