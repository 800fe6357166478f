"""`edgevlm report`: trace files in, markdown + plots out."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from telemetry import ModelInfo, Telemetry, TelemetrySettings
from telemetry.report import load_spans, main
from telemetry.testing import sample_record

PNG = b"\x89PNG\r\n\x1a\n"
# Written by a real server run before trace lines became OTLP export requests: one
# flattened span per line, its resource on the line (3 chats, 1 unknown model).
FLAT_SPANS = Path(__file__).parent / "data" / "traces-flat-spans.jsonl"


def write_traces(path: Path, model: str, quant: str, bpw: float, ttfts: list[float], **kw) -> None:
    t = Telemetry(TelemetrySettings(traces_path=str(path), energy_meters=("estimate",), **kw), "0.1.0")
    t.start()
    for i, ttft in enumerate(ttfts):
        info = ModelInfo(model_id=model, quantization=quant, bits_per_weight=bpw, n_ctx=2048, n_threads=2)
        t.begin("chat", model, {}).finish(sample_record(model=info, ttft_ms=ttft, request_id=f"r{i}"))
        t.force_flush()  # one batch per request, so small size limits rotate between them
    t.shutdown()


def as_other_device(src: Path, dst: Path, host: str) -> None:
    """The same spans as if recorded on another machine (resource host.name changed)."""
    out = []
    for line in src.read_text().splitlines():
        request = json.loads(line)
        for rs in request["resourceSpans"]:
            for kv in rs["resource"]["attributes"]:
                if kv["key"] == "host.name":
                    kv["value"] = {"stringValue": host}
            for ss in rs["scopeSpans"]:
                for span in ss["spans"]:
                    span["traceId"] = "ff" + span["traceId"][2:]  # a different trace, not a duplicate
        out.append(json.dumps(request))
    dst.write_text("\n".join(out) + "\n")


def test_report_end_to_end_writes_markdown_html_and_plots(tmp_path):
    a = tmp_path / "a.jsonl"
    write_traces(a, "smolvlm", "Q4_K_M", 4.85, [80.0, 90.0, 100.0, 110.0, 120.0])
    write_traces(a, "smolvlm", "Q8_0", 8.5, [150.0, 160.0])
    as_other_device(a, tmp_path / "b.jsonl", "jetson-orin")
    with (tmp_path / "b.jsonl").open("a") as f:
        f.write('{"traceId": "abc", "name": "chat smolvlm", "attri')  # torn by a crash
    out = tmp_path / "out"
    assert main([str(a), str(tmp_path / "b.jsonl"), "--out", str(out), "--html"]) == 0

    md = (out / "report.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ") and "smolvlm" in line]
    assert len(rows) == 4  # 2 devices x 2 quantizations
    q4 = next(r for r in rows if "Q4_K_M" in r and "jetson-orin" not in r).split(" | ")
    header = next(line for line in md.splitlines() if line.startswith("| device")).split(" | ")
    col = {name.strip("| "): i for i, name in enumerate(header)}
    assert q4[col["requests"]] == "5"
    assert q4[col["TTFT p50 (ms)"]] == "100.0"
    assert q4[col["TTFT p95 (ms)"]] == "118.0"
    assert q4[col["decode tok/s"]] == "100.0"  # 32 tokens after the first in 320 ms
    assert q4[col["energy source"]] == "estimate"
    assert q4[col["middleware"]] == "profile=balanced prune=divprune ttft_budget=250ms"
    assert q4[col["image tokens kept p50"]].strip("| ") == "0.50"  # 32 of 64
    assert "1 unreadable line(s) skipped" in md
    assert "not a measurement" in md
    for png in ("ttft.png", "decode_vs_bpw.png", "energy_per_token.png"):
        assert (out / png).read_bytes()[:8] == PNG
        assert f"({png})" in md
    assert "<table" in (out / "report.html").read_text()


def test_truncated_last_line_and_rotated_files_still_load(tmp_path):
    path = tmp_path / "t.jsonl"
    write_traces(path, "m", "Q4_0", 4.5, [50.0, 60.0], traces_max_bytes=6000, traces_keep=3)
    assert (tmp_path / "t.jsonl.1").exists()  # rotation happened
    text = path.read_text()
    path.write_text(text + text.splitlines()[0][:40])  # torn last line, no newline
    spans, bad = load_spans([str(path)])
    assert bad == 1
    requests = [s for s in spans if s["name"] == "chat m"]
    assert len(requests) == 2  # one from a rotated file, one from the live file
    assert len({(s["traceId"], s["spanId"]) for s in spans}) == len(spans) == 10


def test_report_reads_a_directory_without_plots_and_fails_cleanly_on_no_files(tmp_path):
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 2
    write_traces(tmp_path / "t.jsonl", "tiny", "Q4_0", 4.5, [50.0])
    assert main([str(tmp_path), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert not list((tmp_path / "o").glob("*.png"))
    assert "| tiny | Q4_0 |" in (tmp_path / "o" / "report.md").read_text()


def test_failed_requests_count_as_errors_not_latency(tmp_path):
    path = tmp_path / "t.jsonl"
    t = Telemetry(TelemetrySettings(traces_path=str(path), energy=False), "0.1.0")
    t.start()
    t.begin("chat", "m", {}).finish(sample_record(ttft_ms=50.0))
    t.begin("chat", "m", {}).finish(sample_record(ttft_ms=5000.0), error=RuntimeError("boom"))
    t.shutdown()
    out = tmp_path / "o"
    assert main([str(path), "--out", str(out), "--no-plots"]) == 0
    [row] = [r for r in (out / "report.md").read_text().splitlines() if r.startswith("| ") and "smolvlm" in r]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:9] == ["2", "1", "50.0", "50.0"]  # requests, errors, TTFT p50, p95 (ok requests only)


def report_cell(tmp: Path, records, column: str, row_has: str = "") -> str:
    """Write ``records`` as traces under ``tmp``, run ``edgevlm report``, read one table cell."""
    t = Telemetry(TelemetrySettings(traces_path=str(tmp / "t.jsonl"), energy=False), "0.1.0")
    t.start()
    for rec in records:
        t.begin("chat", "m", {}).finish(rec)
    t.shutdown()
    assert main([str(tmp / "t.jsonl"), "--out", str(tmp / "o"), "--no-plots"]) == 0
    lines = (tmp / "o" / "report.md").read_text().splitlines()
    header = next(ln for ln in lines if ln.startswith("| device"))
    col = [c.strip() for c in header.strip("|").split("|")].index(column)
    [row] = [ln for ln in lines if ln.startswith("| ") and not ln.startswith(("| device", "|---")) and row_has in ln]
    return [c.strip() for c in row.strip("|").split("|")][col]


def test_ttft_prediction_error_is_reported(tmp_path):
    records = []
    for predicted, actual in ((100.0, 125.0), (100.0, 80.0), (300.0, 300.0)):
        rec = sample_record(ttft_ms=actual)
        rec.middleware = {"profile": "fast", "predicted_ttft_ms": predicted}
        records.append(rec)
    # errors 20%, 25%, 0% -> median 20%
    assert report_cell(tmp_path, records, "TTFT prediction error p50 (%)", "profile=fast") == "20.0"


def test_report_reads_old_flat_span_files_beside_new_ones(tmp_path):
    old_spans, bad = load_spans([str(FLAT_SPANS)])
    assert bad == 0 and len(old_spans) == 13
    chats = [s for s in old_spans if s["name"].startswith("chat ")]
    assert len(chats) == 4
    new = tmp_path / "new.jsonl"
    write_traces(new, "smollm2-135m-instruct-q4_1", "Q4_1", 5.74, [40.0, 60.0])
    spans, bad = load_spans([str(FLAT_SPANS), str(new)])
    assert bad == 0 and len(spans) == 13 + 10
    out = tmp_path / "o"
    assert main([str(FLAT_SPANS), str(new), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert "6 requests from 2 file(s)" in md  # 3 chats + 1 unknown model, and 2 new ones
    header = next(line for line in md.splitlines() if line.startswith("| device")).split(" | ")
    col = {name.strip("| "): i for i, name in enumerate(header)}
    rows = {tuple(c.strip("| ") for c in r.split(" | ")[:4]): r.split(" | ")
            for r in md.splitlines() if r.startswith("| ") and not r.startswith("| device")}
    old_chats = rows[("vm (AMD EPYC)", "smollm2-135m-instruct-q4_1", "Q4_1", "default")]
    assert old_chats[col["requests"]] == "3" and old_chats[col["energy source"]] == "estimate"
    assert rows[("vm (AMD EPYC)", "no-such-model", "?", "default")][col["errors"]] == "1"
    new_chats = [r for k, r in rows.items() if k[1] == "smollm2-135m-instruct-q4_1" and k[3] != "default"]
    assert [r[col["requests"]] for r in new_chats] == ["2"]


def test_one_row_per_asked_setting_with_the_achieved_share_beside_it(tmp_path):
    """Pruning keeps round(n * keep) of each image's n tokens, so the share achieved varies
    with the image; the report groups by what was asked and shows the achieved share."""
    from models.registry import model_id_for
    from bench.tinymodels import tiny_vlm
    from tests.conftest import live_server
    from tests.test_vision_api import image_message, png_uri

    llm, mmproj = tiny_vlm(tmp_path / "vlm", "pixtral")
    traces = tmp_path / "traces.jsonl"
    asked = [({"prune": {"method": "diverse", "keep": 0.5}}, "auto", size) for size in (384, 24, 88, 104)]
    asked += [({"profile": "fast"}, "auto", size) for size in (384, 200)]
    asked += [({}, "low", 384)]
    achieved = []
    with live_server(tmp_path, model=str(llm), mmproj=str(mmproj), ctx_size=4096, traces=str(traces)) as srv:
        with srv.client() as c:
            for i, (ext, detail, size) in enumerate(asked):
                body = {"model": model_id_for(llm), "max_tokens": 2, "edgevlm": ext,
                        "messages": [image_message(png_uri(size, size + 8, seed=i), "Describe.", detail)]}
                r = c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                im = r.json()["timings"]["images"][0]
                achieved.append(im["tokens_after"] / im["tokens_before"])
    assert len({f"{x:.2f}" for x in achieved[:4]}) > 1  # one setting, several achieved shares (e.g. 6 of 11)
    out = tmp_path / "report"
    assert main([str(traces), "--out", str(out), "--no-plots"]) == 0
    lines = (out / "report.md").read_text().splitlines()
    header = [c.strip() for c in next(ln for ln in lines if ln.startswith("| device")).strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in ln.strip("|").split("|"))))
            for ln in lines if ln.startswith("| ") and not ln.startswith("| device")]
    by_setting = {r["middleware"]: r for r in rows}
    assert sorted(by_setting) == ["profile=fast", "profile=quality detail=low", "profile=quality prune=diverse@0.50"]
    pruned = by_setting["profile=quality prune=diverse@0.50"]
    assert pruned["requests"] == "4"
    assert pruned["image tokens kept p50"] == f"{statistics.median(achieved[:4]):.2f}"
    assert by_setting["profile=fast"]["requests"] == "2"
    assert by_setting["profile=quality detail=low"]["image tokens kept p50"] == "1.00"


def test_draft_acceptance_is_reported(tmp_path):
    records = []
    for drafted, accepted in ((40, 30), (10, 2), (0, 0)):
        rec = sample_record()
        rec.drafted_tokens, rec.accepted_tokens = drafted, accepted
        records.append(rec)
    assert report_cell(tmp_path, records, "drafts accepted (%)") == "64"  # 32 of 50
