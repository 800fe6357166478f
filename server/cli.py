"""``edgevlm`` command line: ``serve``, ``doctor``, ``models list|info``, ``quantize``, ``quality``,
``bench``, ``report``.

Every ``serve`` flag falls back to its ``EDGEVLM_*`` environment variable, then to the
default, so containers and systemd units can configure the server without flags.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from server import __version__
from server.settings import Settings

# (flag, settings field, type, help); bools are store_true flags.
_SERVE_FLAGS: list[tuple[str, str, Any, str]] = [
    ("--host", "host", str, "address to bind (default 127.0.0.1; set --api-key before using 0.0.0.0)"),
    ("--port", "port", int, "TCP port (default 8000)"),
    ("--config", "config", str, "TOML file declaring [[models]] (id, path, mmproj, ctx_size, ...)"),
    ("--models-dir", "models_dir", str, "directory of *.gguf models, mmproj-<name>.gguf beside them"),
    ("--model", "model", str, "default model: a configured id or a path to a GGUF file"),
    ("--mmproj", "mmproj", str, "vision projector GGUF for --model (makes it a VLM)"),
    ("--image-min-tokens", "image_min_tokens", int, "fewest tokens one image may cost on --model (dynamic-resolution projectors)"),
    ("--image-max-tokens", "image_max_tokens", int, "most tokens one image may cost on --model (dynamic-resolution projectors)"),
    ("--embedded-model", "embedded_model", bool, "also offer the embedded SmolLM2 when --model/--config/--models-dir name models"),
    ("--ctx-size", "ctx_size", int, "context tokens per model, shared by its slots (default 4096)"),
    ("--threads", "threads", int, "CPU threads per model (default: physical cores)"),
    ("--parallel", "parallel", int, "parallel sequences (slots) per model (default: 4, or fewer on 1 core / < 4 GiB free)"),
    ("--batch", "batch", int, "max tokens per llama_decode call (default 512)"),
    ("--repack", "repack", str, "CPU fast paths (AMX, repacked weights): auto = self-tested in a "
                                "child process and cached (default) | on | off"),
    ("--flash-attn", "flash_attn", str, "attention kernel: auto = flash attention or the plain path, "
                                        "whichever runs a request faster on this machine (timed once at "
                                        "load, cached; default) | on | off"),
    ("--speculative", "speculative", str, "speculative decoding: ngram = draft from the context by prompt "
                                          "lookup, verified in the same batch (default) | draft = a draft "
                                          "model proposes (needs --draft-model) | off"),
    ("--draft-model", "draft_model", str, "small GGUF sharing the model's tokenizer that drafts tokens for "
                                          "--speculative draft (given alone, it implies draft)"),
    ("--kv-layout", "kv_layout", str, "KV cells: shared = one pool, a request may use the whole context "
                                      "(default) | per-slot = each slot its own ctx-size / parallel cells, "
                                      "like llama-server -np N: concurrent long streams step faster"),
    ("--stream-interval", "stream_interval", str, "hand a running request's text over every N decode steps, "
                                                  "or auto (default: 1 while the model's threads leave a CPU "
                                                  "free, 4 once they take every CPU; first token and end at "
                                                  "once): fewer wake-ups of server and client on small CPUs"),
    ("--prompt-cache-mb", "prompt_cache_mb", int, "host RAM per model for the KV of prompts whose slot "
                                                  "another request took, so they come back without prefill "
                                                  "(default 256; 0 = off)"),
    ("--max-queue", "max_queue", int, "requests that may wait per model before 429 (default 8)"),
    ("--max-loaded-models", "max_loaded_models", int, "models kept in memory at once (default 2)"),
    ("--runners", "runners", str, "on (default) = each model runs in its own supervised process (a crash "
                                  "ends that model's requests with 503 and restarts it) | off = all in "
                                  "the server process"),
    ("--runner-max-crashes", "runner_max_crashes", int, "runner crashes within --runner-crash-window-s "
                                                        "that mark a model failed (default 3)"),
    ("--runner-crash-window-s", "runner_crash_window_s", float, "window for counting runner crashes (default 300)"),
    ("--max-model-memory-mb", "max_model_memory_mb", int, "evict LRU models above this memory"),
    ("--api-key", "api_key", "append", "accepted API key (repeat for several)"),
    ("--api-key-file", "api_key_file", str, "file with one accepted API key per line"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body accepted (default 32 MiB)"),
    ("--traces", "traces", str, "JSONL trace file (default traces/edgevlm-traces.jsonl; 'none' = off)"),
    ("--traces-max-bytes", "traces_max_bytes", int, "rotate the trace file at this size (default 50 MB)"),
    ("--traces-keep", "traces_keep", int, "rotated trace files kept (default 5)"),
    ("--traces-flush-ms", "traces_flush_ms", int, "trace batch interval; a crash loses at most this"),
    ("--otlp-endpoint", "otlp_endpoint", str, "also export spans by OTLP/HTTP to this collector URL"),
    ("--console-traces", "console_traces", bool, "print spans to stderr (debugging)"),
    ("--capture-content", "capture_content", bool, "record prompt and completion text in spans"),
    ("--no-energy", "energy", "false", "disable energy metering"),
    ("--energy-sysfs-root", "energy_sysfs_root", str, "root of /sys for energy meters (testing)"),
    ("--cpu-watts-per-core", "cpu_watts_per_core", float, "per-core watts for the CPU-time estimate"),
    ("--no-metrics", "metrics", "false", "disable /metrics collection"),
    ("--max-image-bytes", "max_image_bytes", int, "largest encoded image accepted (default 20 MiB)"),
    ("--max-image-pixels", "max_image_pixels", int, "largest decoded image (default 40 MP)"),
    ("--max-images", "max_images", int, "images per request (default 8)"),
    ("--image-cache-mb", "image_cache_mb", int, "image-embedding cache per vision model, MiB (default 256; 0 = off)"),
    ("--allow-file-dir", "allow_file_dirs", "append", "allow file:// images under this directory"),
    ("--allow-http-images", "allow_http_images", bool, "allow http(s):// image URLs (off: offline)"),
    ("--allow-image-host", "allow_image_hosts", "append", "host name or CIDR that http(s) images may come from although loopback, private or link-local (repeat for several)"),
    ("--profile", "profile", str, "default middleware profile: quality | balanced | fast"),
    ("--ttft-budget-ms", "ttft_budget_ms", float, "default time-to-first-token budget per request"),
    ("--truncate-prompts", "truncate_prompts", bool, "drop oldest turns instead of rejecting long chats"),
    ("--resolution-mode", "resolution_mode", str, "how profiles spend an image budget: resize (default) | "
                                                  "zoom (the tiles CLIP finds relevant; falls back to resize without CLIP)"),
    ("--clip-model", "clip_model", str, "open_clip model name for prompt-aware zoom, relevant pruning and "
                                        "image-type routing (needs the clip extra and --clip-checkpoint)"),
    ("--clip-checkpoint", "clip_checkpoint", str, "local CLIP weights file (.pt/.bin/.safetensors); never downloaded"),
    ("--clip-config", "clip_config", str, "open_clip model-config JSON for a custom CLIP (registered as --clip-model)"),
    ("--clip-threads", "clip_threads", int, "torch threads for CLIP scoring (default: torch's)"),
]


def _serve_parser(sub: argparse._SubParsersAction, name: str = "serve",
                  help_text: str = "start the OpenAI-compatible server",
                  description: str = "Start the server.") -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text,
                       description=description + " Each flag also reads EDGEVLM_<FLAG> "
                                   "(e.g. EDGEVLM_CTX_SIZE, EDGEVLM_API_KEY=key1,key2).")
    for flag, dest, kind, help_text in _SERVE_FLAGS:
        env = "EDGEVLM_" + dest.upper()
        text = f"{help_text} [env {env}]"
        if kind is bool:
            p.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=text)
        elif kind == "false":
            p.add_argument(flag, dest=dest, action="store_const", const=False, default=None, help=text)
        elif kind == "append":
            p.add_argument(flag, dest=dest, action="append", default=None, help=text)
        else:
            p.add_argument(flag, dest=dest, type=kind, default=None, help=text)
    p.add_argument("--log-level", default=os.environ.get("EDGEVLM_LOG_LEVEL", "info"),
                   help="uvicorn/edgevlm log level [env EDGEVLM_LOG_LEVEL]")
    return p


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _SERVE_FLAGS
                 if getattr(args, dest, None) is not None}
    return Settings(**overrides)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app

    settings = _settings_from(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_keys():
        logging.getLogger("edgevlm").warning(
            "binding %s without an API key: anyone on the network can use this server", settings.host)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=10)
    return 0


def models_list(args: argparse.Namespace) -> int:
    from server.app import registry_from

    registry = registry_from(_settings_from(args))
    print(f"{'ID':40} {'VISION':7} PATH")
    for spec in registry.list():
        mark = "*" if spec.id == registry.default_id else " "
        print(f"{mark}{spec.id:39} {'yes' if spec.mmproj else 'no':7} {spec.path}")
    return 0


def models_info(args: argparse.Namespace) -> int:
    from models.gguf_inspect import inspect

    print("\n".join(inspect(args.file).lines()))
    return 0


def quantize_cmd(args: argparse.Namespace) -> int:
    """Quantize to every type (checked first), warning when the source is already quantized."""
    from tqdm import tqdm

    from models.imatrix import read as read_imatrix
    from models.quantize import (BETTER_WITH_IMATRIX, is_requantization, parse_types, quantize_all,
                                 source_type)

    types = parse_types(args.types)
    matrix = read_imatrix(args.imatrix) if args.imatrix else None
    if matrix is None:
        for name in sorted(BETTER_WITH_IMATRIX.intersection(types)):
            print(f"edgevlm: warning: {name} loses noticeably without an importance matrix "
                  "(edgevlm calibrate, then --imatrix)", file=sys.stderr)
    src_type = source_type(args.src)
    if is_requantization(src_type):
        print(f"edgevlm: warning: {args.src} is already quantized ({src_type}); these are requantizations "
              f"and carry its error too: say so wherever their figures are shown", file=sys.stderr)
    out = args.out or os.path.dirname(os.path.abspath(args.src))
    with tqdm(total=len(types), desc="quantize", unit="type", disable=not sys.stderr.isatty()) as bar:
        def done(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update()

        written = quantize_all(args.src, types, out, threads=args.threads, progress=done,
                               imatrix=matrix, force=args.force)
    for path in written:
        print(path)
    print(f"serve them with: edgevlm serve --models-dir {out}")
    return 0


def _startup_error(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            name = ".".join(str(x) for x in err["loc"])
            parts.append(f"--{name.replace('_', '-')} / EDGEVLM_{name.upper()}: {err['msg']}")
        return "; ".join(parts)
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return str(exc)


def calibrate(args: argparse.Namespace) -> int:
    import time

    from models import imatrix

    texts: list[str] = []
    sources: list[str] = []
    for path in args.text:
        texts.append(open(path, encoding="utf-8").read())
        sources.append(path)
    if args.from_traces:
        found, n = imatrix.texts_from_traces(args.from_traces)
        if not n:
            raise imatrix.ImatrixError("the trace files hold no prompt text: prompts are recorded only "
                                       "when the server runs with --capture-content")
        texts += found
        sources += [f"traces:{p}" for p in args.from_traces]
        print(f"calibration text from traces: {n} requests")
    if not texts:
        raise imatrix.ImatrixError("give calibration text with --text FILE or --from-traces TRACES")
    if not os.path.isfile(args.model):
        raise imatrix.ImatrixError(f"{args.model}: no such file")
    out = args.out or (args.model[:-5] if args.model.endswith(".gguf") else args.model) + ".imatrix.gguf"

    def progress(done: int, total: int) -> None:
        if sys.stderr.isatty():
            print(f"\rcalibrating: chunk {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)

    started = time.monotonic()
    result = imatrix.calibrate(args.model, texts, n_ctx=args.ctx, chunks=args.chunks, threads=args.threads,
                               datasets=sources, progress=progress)
    seconds = time.monotonic() - started
    imatrix.write(result, out)
    print(f"{out}: {len(result.entries)} weight matrices, {result.chunk_count} chunks of {result.chunk_size} "
          f"tokens ({result.tokens} tokens, {result.tokens / seconds:.0f} tok/s, {seconds:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one command; start-up mistakes print one ``edgevlm: error:`` line, never a traceback."""
    from pydantic import ValidationError

    from bench.quality import QualityError
    from bench.sweep import BenchError
    from models.gguf_inspect import InspectError
    from models.imatrix import ImatrixError
    from models.quantize import QuantizeError
    from models.registry import ConfigError

    try:
        return _main(argv)
    except (ConfigError, ValidationError, OSError, QuantizeError, InspectError, QualityError, BenchError,
            ImatrixError) as exc:
        print(f"edgevlm: error: {_startup_error(exc)}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        from telemetry.report import main as report_main

        return report_main(argv[1:])
    if argv[:1] == ["quality"]:
        from bench.quality import main as quality_main

        return quality_main(argv[1:])
    if argv[:1] == ["bench"]:
        from bench.sweep import main as bench_main

        return bench_main(argv[1:])
    parser = argparse.ArgumentParser(prog="edgevlm", description="Local OpenAI-compatible server "
                                     "for quantized vision-language models.")
    parser.add_argument("--version", action="version", version=f"edgevlm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _serve_parser(sub, "doctor", "check this machine and every configured model (run this first)",
                  "Check the CPU, llama.cpp's fast paths, threads, memory, energy meters, every "
                  "configured model and the trace file; takes the same flags as serve.")
    models = sub.add_parser("models", help="inspect configured models")
    msub = models.add_subparsers(dest="models_command", required=True)
    lp = msub.add_parser("list", help="list the models the server would offer")
    for flag, dest in (("--config", "config"), ("--models-dir", "models_dir"), ("--model", "model"),
                       ("--mmproj", "mmproj")):
        lp.add_argument(flag, dest=dest, default=None)
    lp.add_argument("--embedded-model", dest="embedded_model", action="store_const", const=True, default=None)
    ip = msub.add_parser("info", help="inspect a GGUF file: architecture, tensor types, effective BPW, ...")
    ip.add_argument("file", help="GGUF model or mmproj file")
    qp = sub.add_parser("quantize", help="quantize a GGUF to several types with llama.cpp's quantizer")
    qp.add_argument("src", help="source GGUF")
    qp.add_argument("--types", required=True, help="comma-separated types, e.g. Q8_0,Q4_K_M,Q4_0")
    qp.add_argument("--out", default=None, help="output directory (default: beside the source); "
                    "serve it with --models-dir")
    qp.add_argument("--threads", type=int, default=0, help="quantizer threads (default: all cores)")
    qp.add_argument("--imatrix", default=None, metavar="FILE",
                    help="importance matrix from `edgevlm calibrate` (or llama-imatrix) for this source")
    qp.add_argument("--force", action="store_true",
                    help="accept a matrix made from another file of the same model, or a type that "
                         "needs a matrix without one")
    sub.add_parser("quality", help="KLD, PPL and same-top-p against a reference: "
                   "edgevlm quality MODEL --reference REF")
    sub.add_parser("bench", help="PalmBench-style sweep: edgevlm bench --models A,B [--threads 1,2]")
    sub.add_parser("report", help="summarise trace files: edgevlm report TRACES.jsonl [--out DIR]")
    cal = sub.add_parser("calibrate", help="collect an importance matrix from calibration text",
                         description="Run MODEL over calibration text and write llama.cpp's imatrix "
                                     "GGUF, for `edgevlm quantize --imatrix`.")
    cal.add_argument("model", help="GGUF model to calibrate (the one you will quantize)")
    cal.add_argument("--text", action="append", default=[], metavar="FILE",
                     help="calibration text file (repeatable): the device's own manuals, orders, questions")
    cal.add_argument("--from-traces", action="append", default=[], metavar="TRACES",
                     help="use prompts recorded in trace files (needs serve --capture-content)")
    cal.add_argument("--chunks", type=int, default=None, help="at most this many chunks")
    cal.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    cal.add_argument("--threads", type=int, default=0, help="CPU threads (default: physical cores)")
    cal.add_argument("--out", default=None, help="output file (default MODEL.imatrix.gguf)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "doctor":
        from server import doctor

        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        return doctor.run(_settings_from(args))
    if args.command == "quantize":
        return quantize_cmd(args)
    if args.command == "models":
        if args.models_command == "info":
            return models_info(args)
        for _, dest, _, _ in _SERVE_FLAGS:
            if not hasattr(args, dest):
                setattr(args, dest, None)
        return models_list(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
