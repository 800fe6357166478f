"""``edgevlm report TRACES.jsonl [...] [--out DIR]``: trace files -> tables and plots per device.

Groups request spans by device x model x quantization x middleware setting and writes
``report.md`` (optionally ``report.html``) plus PNG plots, PalmBench-style: latency,
throughput, memory and energy side by side, energy always with its source.
"""

from __future__ import annotations

import argparse
import glob
import html
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .otlp_json import flat_spans, from_key_values

log = logging.getLogger("edgevlm.telemetry.report")


# --- loading --------------------------------------------------------------------------

def expand_paths(paths: Iterable[str]) -> list[str]:
    """Files to read, oldest first: a directory's ``*.jsonl``, and each file's rotated ``.N`` siblings."""
    bases: list[str] = []
    for p in paths:
        bases.extend(sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p])
    out: list[str] = []
    for base in bases:
        rotated = []
        for r in glob.glob(glob.escape(base) + ".*"):
            suffix = r[len(base) + 1:]
            if suffix.isdigit():
                rotated.append((int(suffix), r))
        out.extend(r for _, r in sorted(rotated, reverse=True))  # highest number is oldest
        if os.path.exists(base):
            out.append(base)
    return out


def load_spans(paths: Iterable[str]) -> tuple[list[dict[str, Any]], int]:
    """Every span (deduplicated by trace/span id, each with its resource) and the count of
    bad lines. Lines are OTLP JSON export requests, or single spans in older files.

    A truncated last line (crash mid-write) or any torn line is skipped, not fatal.
    """
    spans: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    bad = 0
    for path in expand_paths(paths):
        with open(path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if not line:
                    continue
                try:
                    parsed = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    bad += 1
                    continue
                if not isinstance(parsed, dict):
                    bad += 1
                    continue
                for span in flat_spans(parsed):
                    key = (span.get("traceId", ""), span.get("spanId", ""))
                    if key in seen:
                        continue
                    seen.add(key)
                    spans.append(span)
    return spans, bad


@dataclass
class Row:
    """One request, flattened from its server span."""

    device: str
    attrs: dict[str, Any]
    ok: bool


def request_rows(spans: Iterable[dict[str, Any]]) -> list[Row]:
    """Only the request (server) spans; phase child spans are skipped."""
    rows = []
    for s in spans:
        attrs = from_key_values(s.get("attributes"))
        if "gen_ai.operation.name" not in attrs or "gen_ai.usage.output_tokens" not in attrs:
            continue
        res = from_key_values((s.get("resource") or {}).get("attributes"))
        rows.append(Row(device_label(res), attrs, (s.get("status") or {}).get("code", 0) != 2))
    return rows


def device_label(res: dict[str, Any]) -> str:
    """``host (board or CPU model)`` from a span's resource attributes."""
    host = res.get("host.name", "unknown-host")
    what = res.get("edgevlm.device.board") or res.get("host.cpu.model.name") or res.get("host.arch", "")
    return f"{host} ({what})" if what else str(host)


def middleware_label(a: dict[str, Any]) -> str:
    """What the request asked of the middleware: its profile and the options it set
    itself (image token budget or detail, pruning, TTFT budget).

    Settings the profile implies, and what was achieved (e.g. the share of image tokens
    kept, which varies with each image's token count), are not part of it, so one
    setting stays one row.
    """
    parts = []
    if a.get("edgevlm.profile") is not None:
        parts.append(f"profile={a['edgevlm.profile']}")
    parts.extend(sorted({_image_budget_label(a, k) for k in a if k.endswith(".budget_source")
                         and k.startswith("edgevlm.middleware.images.") and a[k] in ("request", "detail")}))
    method, source = a.get("edgevlm.middleware.prune_method"), a.get("edgevlm.middleware.prune_source")
    if source == "request":
        keep = a.get("edgevlm.middleware.prune_keep")
        asked = f"{keep:.2f}" if isinstance(keep, float) else f"{keep} rows"
        parts.append(f"prune={method}@{asked}" if keep is not None else f"prune={method}")
    elif source is None and a.get("edgevlm.prune.method"):  # spans without the decision recorded
        parts.append(f"prune={a['edgevlm.prune.method']}")
    budget = a.get("edgevlm.budget.ttft_ms")
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        parts.append(f"ttft_budget={budget:g}ms")
    return " ".join(parts) or "default"


def _image_budget_label(a: dict[str, Any], source_key: str) -> str:
    """``max_image_tokens=N`` or ``detail=low|high`` for one image's asked budget."""
    prefix = source_key[: -len("budget_source")]
    if a[source_key] == "request":
        return f"max_image_tokens={a.get(prefix + 'budget_tokens')}"
    return str(a.get(prefix + "budget_reason", "detail")).split(" ")[0]  # "detail=low -> 64 tokens"


# --- aggregation ----------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), None for no data."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class Group:
    device: str
    model: str
    quantization: str
    middleware: str
    bits_per_weight: float | None = None
    rows: list[Row] = field(default_factory=list)

    def _vals(self, key: str, ok_only: bool = True, positive: bool = True) -> list[float]:
        out = []
        for r in self.rows:
            v = r.attrs.get(key)
            if (r.ok or not ok_only) and isinstance(v, (int, float)) and not isinstance(v, bool):
                if not positive or v > 0:
                    out.append(float(v))
        return out

    def summary(self) -> dict[str, Any]:
        ttft = self._vals("edgevlm.ttft_ms")
        energy_rows = [r for r in self.rows if r.ok and isinstance(r.attrs.get("edgevlm.energy.joules"), (int, float))]
        joules = [float(r.attrs["edgevlm.energy.joules"]) for r in energy_rows]
        tokens = sum(int(r.attrs.get("gen_ai.usage.output_tokens", 0)) for r in energy_rows)
        sources = sorted({str(r.attrs.get("edgevlm.energy.source")) for r in energy_rows})
        overlapped = sum(1 for r in energy_rows if (r.attrs.get("edgevlm.energy.overlap_requests") or 0) > 0)
        rss = self._vals("edgevlm.process.peak_rss_bytes", ok_only=False)
        # How far the TTFT-budget cost model was off, where a prediction was recorded.
        errors = [abs(float(r.attrs["edgevlm.predicted_ttft_ms"]) - float(r.attrs["edgevlm.ttft_ms"]))
                  / float(r.attrs["edgevlm.ttft_ms"]) * 100.0
                  for r in self.rows
                  if r.ok and isinstance(r.attrs.get("edgevlm.predicted_ttft_ms"), (int, float))
                  and isinstance(r.attrs.get("edgevlm.ttft_ms"), (int, float)) and r.attrs["edgevlm.ttft_ms"] > 0]
        # Share of image tokens left after pruning: what was achieved, next to what was asked.
        kept = [float(r.attrs["edgevlm.image.tokens_after"]) / float(r.attrs["edgevlm.image.tokens_before"])
                for r in self.rows
                if r.ok and isinstance(r.attrs.get("edgevlm.image.tokens_before"), int)
                and r.attrs["edgevlm.image.tokens_before"] > 0
                and isinstance(r.attrs.get("edgevlm.image.tokens_after"), int)]
        # Speculative decoding: the share of drafted tokens the model accepted.
        drafted = sum(self._vals("edgevlm.speculative.drafted_tokens"))
        accepted = sum(self._vals("edgevlm.speculative.accepted_tokens"))
        return {
            "requests": len(self.rows),
            "errors": sum(1 for r in self.rows if not r.ok),
            "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p95_ms": percentile(ttft, 95),
            "prefill_tok_s": percentile(self._vals("edgevlm.prefill_tokens_per_s"), 50),
            "decode_tok_s": percentile(self._vals("edgevlm.decode_tokens_per_s"), 50),
            "j_per_request": _mean(joules),
            "j_per_token": (sum(joules) / tokens) if tokens else None,
            "energy_source": "+".join(sources) if sources else "",
            "energy_overlapped": overlapped,
            "peak_rss_mib": max(rss) / 2**20 if rss else None,
            "ttft_pred_err_pct": percentile(errors, 50),
            "image_kept": percentile(kept, 50),
            "draft_accept_pct": accepted / drafted * 100.0 if drafted else None,
            "ttft_values": ttft,
        }


def group_rows(rows: Iterable[Row]) -> list[Group]:
    groups: dict[tuple[str, str, str, str], Group] = {}
    for r in rows:
        a = r.attrs
        key = (r.device, str(a.get("gen_ai.request.model", "?")), str(a.get("edgevlm.model.quantization") or "?"),
               middleware_label(a))
        g = groups.setdefault(key, Group(*key))
        g.rows.append(r)
        bpw = a.get("edgevlm.model.bits_per_weight")
        if isinstance(bpw, (int, float)):
            g.bits_per_weight = float(bpw)
    return [groups[k] for k in sorted(groups)]


# --- output ---------------------------------------------------------------------------

COLUMNS = [
    ("requests", "requests", "{:d}"), ("errors", "errors", "{:d}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:.1f}"), ("ttft_p95_ms", "TTFT p95 (ms)", "{:.1f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.1f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("j_per_request", "J/request", "{:.3f}"), ("j_per_token", "J/token", "{:.4f}"),
    ("energy_source", "energy source", "{}"), ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
    ("ttft_pred_err_pct", "TTFT prediction error p50 (%)", "{:.1f}"),
    ("image_kept", "image tokens kept p50", "{:.2f}"),
    ("draft_accept_pct", "drafts accepted (%)", "{:.0f}"),
]
KEYS = [("device", "device"), ("model", "model"), ("quantization", "quant"), ("middleware", "middleware")]


def _fmt(value: Any, spec: str) -> str:
    return "–" if value is None or value == "" else spec.format(value)


def table(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    header = [h for _, h in KEYS] + ["BPW"] + [h for _, h, _ in COLUMNS]
    body = []
    for g in groups:
        s = g.summary()
        body.append([getattr(g, k) for k, _ in KEYS] + [_fmt(g.bits_per_weight, "{:.2f}")]
                    + [_fmt(s[k], spec) for k, _, spec in COLUMNS])
    return header, body


def render_markdown(groups: list[Group], bad_lines: int, files: list[str], plots: list[str]) -> str:
    header, body = table(groups)
    lines = ["# edgevlm report", "", f"{sum(len(g.rows) for g in groups)} requests from {len(files)} file(s)."]
    if bad_lines:
        lines.append(f"{bad_lines} unreadable line(s) skipped (e.g. a line torn by a crash).")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    lines += ["", "Energy: `estimate` is the CPU time of the server and its model runners x watts per core, "
              "not a measurement; device-level sources (rapl, nvml, jetson, battery) include everything the machine did, "
              "so requests that overlapped others share their joules."]
    overlapped = sum(g.summary()["energy_overlapped"] for g in groups)
    if overlapped:
        lines.append(f"{overlapped} request(s) had other requests in flight during their energy window.")
    if plots:
        lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def render_html(groups: list[Group], plots: list[str]) -> str:
    header, body = table(groups)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    imgs = "".join(f'<p><img src="{html.escape(p)}" alt="{html.escape(p)}"></p>' for p in plots)
    return (f"<!doctype html><meta charset=utf-8><title>edgevlm report</title><h1>edgevlm report</h1>"
            f"<table border=1 cellspacing=0 cellpadding=4><tr>{th}</tr>{trs}</table>{imgs}\n")


def _label(g: Group) -> str:
    return f"{g.model} {g.quantization} {g.middleware}\n{g.device}"


def write_plots(groups: list[Group], out_dir: str) -> list[str]:
    """TTFT distribution, decode tok/s vs BPW, J/token; returns file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install edgevlm[report]); skipping plots")
        return []
    written: list[str] = []
    summaries = [(g, g.summary()) for g in groups]

    with_ttft = [(g, s) for g, s in summaries if s["ttft_values"]]
    if with_ttft:
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.6 * len(with_ttft)))
        data = [s["ttft_values"] for _, s in with_ttft]
        try:
            ax.boxplot(data, orientation="horizontal")  # matplotlib >= 3.10
        except TypeError:
            ax.boxplot(data, vert=False)
        ax.set_yticks(range(1, len(with_ttft) + 1), [_label(g) for g, _ in with_ttft], fontsize=7)
        ax.set_xlabel("time to first token (ms)")
        ax.set_title("TTFT distribution")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "ttft.png"), dpi=100)
        plt.close(fig)
        written.append("ttft.png")

    pts = [(g.bits_per_weight, s["decode_tok_s"], g) for g, s in summaries
           if g.bits_per_weight is not None and s["decode_tok_s"] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for device in sorted({g.device for _, _, g in pts}):
            xs = [x for x, _, g in pts if g.device == device]
            ys = [y for _, y, g in pts if g.device == device]
            ax.scatter(xs, ys, label=device)
        for x, y, g in pts:
            ax.annotate(g.quantization, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("bits per weight")
        ax.set_ylabel("decode tokens/s (median)")
        ax.set_title("Decode speed vs bits per weight")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "decode_vs_bpw.png"), dpi=100)
        plt.close(fig)
        written.append("decode_vs_bpw.png")

    en = [(g, s) for g, s in summaries if s["j_per_token"] is not None]
    if en:
        fig, ax = plt.subplots(figsize=(8, 1.5 + 0.6 * len(en)))
        bars = ax.barh(range(len(en)), [s["j_per_token"] for _, s in en],
                       color=["#bbb" if s["energy_source"] == "estimate" else "#3a7" for _, s in en])
        ax.set_yticks(range(len(en)), [_label(g) for g, _ in en], fontsize=7)
        ax.bar_label(bars, [s["energy_source"] for _, s in en], fontsize=7, padding=3)
        ax.set_xlabel("joules per output token (grey: estimate, not measured)")
        ax.set_title("Energy per token")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "energy_per_token.png"), dpi=100)
        plt.close(fig)
        written.append("energy_per_token.png")
    return written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgevlm report", description="Summarise edgevlm trace files.")
    p.add_argument("traces", nargs="+", help="JSONL trace files or directories (rotated .N files are included)")
    p.add_argument("--out", default="report", help="output directory (default: ./report)")
    p.add_argument("--html", action="store_true", help="also write report.html")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--bench", default=None, metavar="RESULTS_CSV",
                   help="an `edgevlm bench` results.csv: adds the PalmBench views (fits vs BPW, Pareto "
                        "front, kernels, recommendation)")
    p.add_argument("--max-ttft-ms", type=float, default=300.0, help="TTFT limit for the recommendation")
    p.add_argument("--max-rss-mib", type=float, default=400.0, help="memory limit for the recommendation")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``edgevlm report``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    files = expand_paths(args.traces)
    if not files:
        print(f"edgevlm report: no trace files found in {args.traces}")
        return 2
    spans, bad = load_spans(args.traces)
    groups = group_rows(request_rows(spans))
    os.makedirs(args.out, exist_ok=True)
    plots = [] if args.no_plots else write_plots(groups, args.out)
    md_path = os.path.join(args.out, "report.md")
    text = render_markdown(groups, bad, files, plots)
    if args.bench:
        from .palmbench import write as palmbench

        text += palmbench(args.bench, args.out, args.max_ttft_ms, args.max_rss_mib, plots=not args.no_plots)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    if args.html:
        with open(os.path.join(args.out, "report.html"), "w", encoding="utf-8") as f:
            f.write(render_html(groups, plots))
    print(f"edgevlm report: {sum(len(g.rows) for g in groups)} requests in {len(groups)} group(s) -> {md_path}")
    return 0 if groups else 1


if __name__ == "__main__":
    raise SystemExit(main())
