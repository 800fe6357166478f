"""PalmBench views of an ``edgevlm bench`` sweep: metrics against bits per weight with a
linear fit, a quality/speed Pareto front, the kernels each variant ran on, and a
recommendation per device computed from the table (so it changes when the numbers do).

The claim checked beside each fit: system metrics track effective BPW almost linearly,
with about 3.5 BPW as the practical floor (PalmBench; On-device LLMs for AI PCs).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

# (results.csv column, axis label, higher is better)
BPW_METRICS: list[tuple[str, str, bool]] = [
    ("decode_tok_s", "decode tok/s", True), ("ttft_p50_ms", "TTFT p50 (ms)", False),
    ("peak_rss_mib", "peak RSS (MiB)", False), ("j_per_token", "J/token", False), ("kld_mean", "mean KLD", False),
]
BPW_FLOOR = 3.5
_TEXT_COLUMNS = {"cell", "model", "file", "quantization", "source_quantization", "requantized", "device",
                 "energy_source", "kernels", "trace", "imatrix"}


def load_results(path: str) -> list[dict[str, Any]]:
    """results.csv rows, numbers as floats (empty cells as None)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        conv: dict[str, Any] = {}
        for k, v in r.items():
            if k in _TEXT_COLUMNS:
                conv[k] = v
            else:
                try:
                    conv[k] = float(v) if v not in ("", None) else None
                except ValueError:
                    conv[k] = v
        out.append(conv)
    return out


@dataclass
class Fit:
    metric: str
    threads: int
    n: int
    slope: float
    intercept: float
    r2: float | None


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float | None]:
    """Least squares y = a*x + b; (a, b, R²); R² is None when y does not vary."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return 0.0, my, None
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    return slope, intercept, (1.0 - ss_res / ss_tot) if ss_tot > 0 else None


def fits(rows: list[dict[str, Any]]) -> list[Fit]:
    """One fit per metric and thread count, over every row that has both figures."""
    out = []
    for metric, _, _ in BPW_METRICS:
        for threads in sorted({r["threads"] for r in rows if r.get("threads") is not None}):
            pts = [(r["bpw"], r[metric]) for r in rows
                   if r.get("threads") == threads and r.get("bpw") is not None and r.get(metric) is not None]
            if len(pts) >= 3:
                a, b, r2 = linear_fit([p[0] for p in pts], [p[1] for p in pts])
                out.append(Fit(metric, int(threads), len(pts), a, b, r2))
    return out


def pareto_front(rows: list[dict[str, Any]], quality: str = "kld_mean", speed: str = "decode_tok_s") -> list[str]:
    """Cells no other cell beats on both quality (lower KLD, or higher QA accuracy) and speed."""
    lower_better = quality != "qa_accuracy"
    pts = [r for r in rows if r.get(quality) is not None and r.get(speed) is not None]

    def q(r: dict[str, Any]) -> float:
        return r[quality] if lower_better else -r[quality]

    front = []
    for r in pts:
        dominated = any(q(o) <= q(r) and o[speed] >= r[speed] and (q(o) < q(r) or o[speed] > r[speed])
                        for o in pts if o is not r)
        if not dominated:
            front.append(r["cell"])
    return front


def _describe(r: dict[str, Any]) -> str:
    parts = [f"{r['model']} at {int(r['threads'])} thread(s)"]
    facts = []
    if r.get("kld_mean") is not None:
        facts.append(f"KLD {r['kld_mean']:.4f}")
    if r.get("qa_accuracy") is not None:
        facts.append(f"QA {r['qa_accuracy'] * 100:.0f} %")
    for key, spec in (("ttft_p50_ms", "TTFT p50 {:.0f} ms"), ("peak_rss_mib", "{:.0f} MiB"),
                      ("decode_tok_s", "{:.1f} tok/s"), ("bpw", "{:.2f} BPW")):
        if r.get(key) is not None:
            facts.append(spec.format(r[key]))
    return parts[0] + " (" + ", ".join(facts) + ")"


def recommendation(rows: list[dict[str, Any]], max_ttft_ms: float = 300.0, max_rss_mib: float = 400.0) -> list[str]:
    """One paragraph per device: the most accurate cell within the TTFT and memory limits, the fastest,
    and which variants fall under the BPW floor."""
    paragraphs = []
    for device in sorted({str(r.get("device") or "this device") for r in rows}):
        dev = [r for r in rows if str(r.get("device") or "this device") == device]
        ok = [r for r in dev if r.get("ttft_p50_ms") is not None and r["ttft_p50_ms"] <= max_ttft_ms
              and r.get("peak_rss_mib") is not None and r["peak_rss_mib"] <= max_rss_mib]

        def accuracy_key(r: dict[str, Any]) -> tuple[float, float]:
            kld = r.get("kld_mean")
            qa = r.get("qa_accuracy")
            return (kld if kld is not None else math.inf, -(qa or 0.0))

        text = f"On {device}, "
        if ok:
            best = min(ok, key=accuracy_key)
            text += (f"the most accurate variant under {max_ttft_ms:g} ms TTFT p50 and {max_rss_mib:g} MiB peak "
                     f"RSS is {_describe(best)}; ")
        else:
            near = min(dev, key=lambda r: (r.get("ttft_p50_ms") or math.inf))
            text += (f"no variant stays under {max_ttft_ms:g} ms TTFT p50 and {max_rss_mib:g} MiB peak RSS "
                     f"(the lowest TTFT is {_describe(near)}); ")
        speedy = [r for r in dev if r.get("decode_tok_s") is not None]
        if speedy:
            fastest = max(speedy, key=lambda r: r["decode_tok_s"])
            text += f"the fastest decoder is {_describe(fastest)}."
        low = sorted({r["model"] for r in dev if r.get("bpw") is not None and r["bpw"] < BPW_FLOOR})
        if low:
            text += f" Below the {BPW_FLOOR} BPW floor: {', '.join(low)}; expect quality to fall off there."
        else:
            text += f" No variant here is below the {BPW_FLOOR} BPW floor."
        if any(r.get("requantized") == "yes" for r in dev):
            text += " Requantized variants carry their source's error as well."
        paragraphs.append(text)
    return paragraphs


def _family(model: str) -> str:
    """``SmolLM2-135M-Instruct.Q8_0`` -> ``SmolLM2-135M-Instruct``; ``gemma-3-270m-q4_k_m`` -> ``gemma-3-270m``."""
    return model.rsplit(".", 1)[0] if "." in model else model.rsplit("-", 1)[0]


def point_label(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The quantization, with the model's name in front when the sweep holds several models."""
    quant = str(r.get("quantization") or r["model"])
    if len({_family(str(x["model"])) for x in rows}) > 1:
        return f"{_family(str(r['model']))[:12]} {quant}"
    return quant


def write_plots(rows: list[dict[str, Any]], fit_list: list[Fit], out_dir: str) -> list[str]:
    """metrics_vs_bpw.png (one panel per metric, fit lines per thread count) and pareto.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    metrics = [m for m in BPW_METRICS if any(r.get(m[0]) is not None and r.get("bpw") is not None for r in rows)]
    if metrics:
        ncols = min(3, len(metrics))
        nrows = -(-len(metrics) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[len(metrics):]:
            ax.axis("off")
        colours = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
        thread_counts = sorted({int(r["threads"]) for r in rows if r.get("threads") is not None})
        for ax, (metric, label, _) in zip(axes.flat, metrics):
            for i, t in enumerate(thread_counts):
                pts = [(r["bpw"], r[metric], r) for r in rows
                       if r.get("threads") == t and r.get("bpw") is not None and r.get(metric) is not None]
                c = colours[i % len(colours)]
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, s=18, label=f"{t} thread(s)")
                for x, y, r in pts:
                    ax.annotate(point_label(r, rows), (x, y), fontsize=6,
                                xytext=(2, 2), textcoords="offset points")
                f = next((f for f in fit_list if f.metric == metric and f.threads == t), None)
                if f is not None:
                    xs = [min(p[0] for p in pts), max(p[0] for p in pts)]
                    r2 = "n/a" if f.r2 is None else f"{f.r2:.2f}"
                    ax.plot(xs, [f.slope * x + f.intercept for x in xs], color=c, lw=1,
                            label=f"fit {t}t: R²={r2}")
            ax.axvline(BPW_FLOOR, color="grey", ls=":", lw=1)
            ax.set_xlabel("effective bits per weight")
            ax.set_title(label, fontsize=9)
            ax.legend(fontsize=6)
        fig.suptitle("Metrics vs BPW (PalmBench: near-linear in BPW; dotted: 3.5 BPW floor)", fontsize=10)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "metrics_vs_bpw.png"), dpi=90)
        plt.close(fig)
        written.append("metrics_vs_bpw.png")
    quality = "kld_mean" if any(r.get("kld_mean") is not None for r in rows) else "qa_accuracy"
    pts = [r for r in rows if r.get(quality) is not None and r.get("decode_tok_s") is not None]
    if pts:
        front = set(pareto_front(rows, quality))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for r in pts:
            on = r["cell"] in front
            ax.scatter(r["decode_tok_s"], r[quality], color="tab:red" if on else "tab:grey", s=28 if on else 14)
            ax.annotate(f"{point_label(r, rows)} t{int(r['threads'])}", (r["decode_tok_s"], r[quality]),
                        fontsize=6, xytext=(2, 2), textcoords="offset points")
        line = sorted((r for r in pts if r["cell"] in front), key=lambda r: r["decode_tok_s"])
        ax.plot([r["decode_tok_s"] for r in line], [r[quality] for r in line], color="tab:red", lw=1)
        ax.set_xlabel("decode tokens/s (median)")
        ax.set_ylabel("mean KLD vs reference (lower is better)" if quality == "kld_mean" else "QA accuracy")
        ax.set_title("Quality vs speed: Pareto front in red")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "pareto.png"), dpi=90)
        plt.close(fig)
        written.append("pareto.png")
    return written


def imatrix_pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(without, with) an importance matrix for each type the sweep has both ways (quality
    does not depend on the thread count, so the first row of each is taken)."""
    by: dict[tuple[Any, Any], dict[bool, dict[str, Any]]] = {}
    for r in rows:
        if r.get("kld_mean") is not None:
            by.setdefault((r.get("quantization"), r.get("source_quantization")), {}).setdefault(
                bool(r.get("imatrix")), r)
    return [(v[False], v[True]) for v in by.values() if False in v and True in v]


def render_section(rows: list[dict[str, Any]], fit_list: list[Fit], plots: list[str],
                   max_ttft_ms: float, max_rss_mib: float) -> str:
    """The report's PalmBench part, in Markdown."""
    lines = ["", "## PalmBench views", ""]
    if any(r.get("requantized") == "yes" for r in rows):
        srcs = sorted({str(r.get("source_quantization")) for r in rows if r.get("requantized") == "yes"})
        lines += [f"**Requantized:** the variants were quantized from an already quantized file ({', '.join(srcs)}); "
                  "their errors include the source's.", ""]
    lines += ["### Recommendation", ""] + recommendation(rows, max_ttft_ms, max_rss_mib) + [""]
    pairs = imatrix_pairs(rows)
    if pairs:
        lines += ["### With and without an importance matrix", "",
                  "Each type quantized from the same source with and without the matrix "
                  "(`edgevlm calibrate`), measured in this run against the same reference.", "",
                  "| type | matrix | BPW | KLD | same top p % | PPL |", "|---|---|---|---|---|---|"]
        for plain, guided in pairs:
            for r in (plain, guided):
                lines.append(f"| {r.get('quantization')} | {r.get('imatrix') or 'none'} | {r.get('bpw') or 0:.2f} | "
                             f"{r['kld_mean']:.4f} | {r.get('same_top_p_pct') or 0:.1f} | {r.get('ppl') or 0:.2f} |")
        lines.append("")
    lines += ["### Linear fit against effective BPW", "",
              "PalmBench's claim: system metrics track effective BPW almost linearly (R² near 1).", "",
              "| metric | threads | points | slope per BPW | intercept | R² |", "|---|---|---|---|---|---|"]
    labels = {m: label for m, label, _ in BPW_METRICS}
    for f in fit_list:
        r2 = "n/a (no variation)" if f.r2 is None else f"{f.r2:.3f}"
        lines.append(f"| {labels[f.metric]} | {f.threads} | {f.n} | {f.slope:.4g} | {f.intercept:.4g} | {r2} |")
    front = pareto_front(rows, "kld_mean" if any(r.get("kld_mean") is not None for r in rows) else "qa_accuracy")
    lines += ["", f"Pareto front (quality vs decode speed): {', '.join(front) or 'none'}.", "",
              "### Kernels", "",
              "llama.cpp's CPU kernels multiply quantized weights by 8-bit-quantized activations (the W4A8 idea "
              "of activation-quantization research); edgevlm uses them as they are. Repacked weights (CPU_REPACK) "
              "let Q4_0, IQ4_NL and Q4_K run on wider SIMD kernels, which is why they can beat a smaller type.", "",
              "| cell | repacked MiB | CPU fast paths |", "|---|---|---|"]
    for r in rows:
        rep = r.get("repack_mib")
        lines.append(f"| {r['cell']} | {'–' if rep is None else f'{rep:.1f}'} | "
                     f"{str(r.get('kernels') or '–').replace('|', '/')} |")
    if plots:
        lines += [""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write(results_csv: str, out_dir: str, max_ttft_ms: float = 300.0, max_rss_mib: float = 400.0,
          plots: bool = True) -> str:
    """Plots, palmbench.json (the numbers behind the plots) and the Markdown section."""
    rows = load_results(results_csv)
    fit_list = fits(rows)
    files = write_plots(rows, fit_list, out_dir) if plots else []
    with open(os.path.join(out_dir, "palmbench.json"), "w", encoding="utf-8") as f:
        json.dump({"points": [{k: r.get(k) for k in ("cell", "model", "threads", "bpw", *(m for m, _, _ in BPW_METRICS))}
                              for r in rows],
                   "fits": [asdict(x) for x in fit_list],
                   "pareto": pareto_front(rows),
                   "recommendation": recommendation(rows, max_ttft_ms, max_rss_mib)}, f, indent=1)
    return render_section(rows, fit_list, files, max_ttft_ms, max_rss_mib)
