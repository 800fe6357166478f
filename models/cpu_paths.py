"""llama.cpp's CPU fast paths, chosen per model by a self-test in a child process.

llama.cpp can move a model's weights into *extra buffer types* whose kernels are faster
than the plain CPU path: ``AMX`` (Intel Xeons with AMX tiles), ``CPU_REPACK`` (weights
interleaved for AVX2/AVX-512/NEON GEMM, Q4_0/Q4_K/IQ4_NL/Q8_0...), ``KLEIDIAI`` on ARM.
It picks them from what the CPU *advertises*, and an advertised feature is not a working
one: AMX kernels built by older compilers crash at the first decode, or return garbage
for Q4 types, and a crash there takes the whole server down. So nothing is assumed:

- ``auto`` (the default) decodes a few tokens of the model itself in a child process,
  with and without the fast paths, and compares the logits. A crash, a hang or a
  disagreement turns that fast path off; if only the first-listed type fails (AMX before
  CPU_REPACK), the next ones are tried on their own, so repacked kernels stay on where
  only AMX is broken. The verdict is cached on disk, keyed by the CPU, the llama.cpp build
  and the model file, so later starts cost nothing.
- ``on`` takes llama.cpp's own choice untested; ``off`` uses the plain CPU path only.

Which extra types a load may use is set by rewriting, for the duration of that load,
the NULL-terminated array the CPU device hands to ``llama_model_load_from_file``. That
array is a copy used only to place weights; the kernels look a tensor's buffer type up
in their own list, so models loaded with different choices coexist in one process.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import llama_cpp
import numpy as np

from models import cpu_info, isolation
from models.ggml import ggml
from models.llama_lib import OneSequence, ensure_backend, tokenize

log = logging.getLogger("edgevlm.cpu_paths")

RepackMode = Literal["auto", "on", "off"]
REPACK_MODES: tuple[str, ...] = ("auto", "on", "off")

# A broken kernel gives logits unrelated to the plain path's. Correct kernels differ from it
# only by summation order and activation rounding, which a 30-layer model amplifies: on the
# default model requantised to Q4_0/Q4_K_M, correct repacked rows differ by a median 2-3%
# (relative L2) and single rows by up to 10%, and even the plain path's batched and
# one-token kernels disagree by 70% on one row. So the test is on the median row and on
# how often the top token agrees; garbage scores ~100% and ~0 there.
MAX_MEDIAN_ERROR = 0.15
MIN_TOP1_AGREEMENT = 0.7
_FAULT_ENV = "EDGEVLM_SELFTEST_FAULT"  # fault injection for tests: segv | hang | wrong[:TYPE]
_TIMEOUT_ENV = "EDGEVLM_SELFTEST_TIMEOUT_S"
_SELFTEST_TEXT = ("Check the pressure gauge on line 3 before the shift starts; if the needle "
                  "reads above 6 bar, close valve V-12 and call the maintenance desk at 4410. ")


# ------------------------------------------------------------------ the buffer list
class _BufferList:
    """The CPU device's extra buffer list as llama.cpp built it, and the array to edit."""

    def __init__(self) -> None:
        g = ggml()
        self.array = g.cpu_extra_buffers()
        self.original: list[int] = [int(self.array[i]) for i in range(len(self.array) - 1)] if self.array else []
        self.names = {b: g.buffer_type_name(b) for b in self.original}


_load_lock = threading.Lock()  # the buffer list is process-wide: one load at a time edits it


@functools.cache
def _buffer_list() -> _BufferList:
    """Read once per process, before any load edits the array."""
    return _BufferList()


def available_extra_buffers() -> tuple[str, ...]:
    """llama.cpp's extra weight buffer types on this CPU and build, in its order of preference."""
    g = _buffer_list()
    return tuple(g.names[b] for b in g.original)


@contextmanager
def _extra_buffers_allowed(allowed: tuple[str, ...]) -> Iterator[None]:
    """Let only ``allowed`` extra buffer types be offered to a model load in this block."""
    g = _buffer_list()
    with _load_lock:
        if g.array is None:
            yield
            return
        keep = [b for b in g.original if g.names[b] in allowed]
        for i in range(len(g.original) + 1):
            g.array[i] = keep[i] if i < len(keep) else None
        try:
            yield
        finally:
            for i, b in enumerate(g.original):
                g.array[i] = b
            g.array[len(g.original)] = None


def load_model(path: str, allowed: tuple[str, ...] | None, *, gpu_layers: int = 0) -> llama_cpp.llama_model_p:
    """``llama_model_load_from_file`` with only the ``allowed`` fast paths (None: llama.cpp's choice).

    Returns a NULL pointer on failure, as llama.cpp does.
    """
    ensure_backend()
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    if allowed is None:
        with _load_lock:  # not while another load has the list edited
            return llama_cpp.llama_model_load_from_file(path.encode(), mparams)
    mparams.use_extra_bufts = bool(allowed)
    with _extra_buffers_allowed(allowed):
        return llama_cpp.llama_model_load_from_file(path.encode(), mparams)


# ------------------------------------------------------------------ the self-test (child side)
def selftest_tokens(model: llama_cpp.llama_model_p, n: int) -> list[int]:
    """``n`` tokens of a plant-floor sentence, repeated as needed."""
    tokens = tokenize(llama_cpp.llama_model_get_vocab(model), _SELFTEST_TEXT * 4, add_special=True) or [0]
    while len(tokens) < n:
        tokens += tokens
    return tokens[:n]


def _decode_logits(model: llama_cpp.llama_model_p, tokens: list[int], n_prompt: int,
                   n_threads: int) -> np.ndarray:
    """Logits of a batched prefill (GEMM kernels) and single-token steps (GEMV kernels)."""
    rows: list[np.ndarray] = []
    with OneSequence(model, n_ctx=256, n_batch=64, n_threads=n_threads) as seq:
        pos = 0
        for step in [tokens[:n_prompt]] + [[t] for t in tokens[n_prompt:]]:
            if seq.decode(step, pos) != 0:
                raise RuntimeError("llama_decode failed")
            rows += [seq.logits(i).copy() for i in range(len(step))]
            pos += len(step)
    return np.stack(rows)


_buffer_log: list[str] = []


@llama_cpp.llama_log_callback
def _collect_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if text:
        _buffer_log.append(text.decode("utf-8", errors="replace"))


def _fault(kind: str, allowed: tuple[str, ...]) -> str | None:
    """The injected fault for this candidate, if any (``wrong:AMX`` hits only sets with AMX)."""
    spec = os.environ.get(_FAULT_ENV, "")
    if not spec:
        return None
    name, _, only = spec.partition(":")
    if only and only not in allowed:
        return None
    return name if name == kind else None


def selftest_child(path: str, allowed: tuple[str, ...], n_threads: int) -> dict:
    """Run in the child: compare the plain CPU path's logits with the fast paths' logits."""
    ensure_backend()
    llama_cpp.llama_log_set(_collect_log, ctypes.c_void_p(0))
    plain = load_model(path, ())
    if not plain:
        raise RuntimeError(f"could not load {path}")
    tokens = selftest_tokens(plain, 36)
    ref = _decode_logits(plain, tokens, 32, n_threads)
    llama_cpp.llama_model_free(plain)
    _buffer_log.clear()
    fast = load_model(path, allowed)
    if not fast:
        raise RuntimeError(f"could not load {path} with {'+'.join(allowed)}")
    buffers: dict[str, float] = {}
    for line in _buffer_log:
        m = re.search(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB", line)
        if m:
            buffers[m.group(1)] = buffers.get(m.group(1), 0.0) + float(m.group(2))
    if _fault("segv", allowed):
        os.kill(os.getpid(), signal.SIGSEGV)
    if _fault("hang", allowed):
        time.sleep(3600)
    got = _decode_logits(fast, tokens, 32, n_threads)
    llama_cpp.llama_model_free(fast)
    if _fault("wrong", allowed):
        got = got[:, ::-1].copy()
    err = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-6)
    agree = float(np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1)))
    return {"median_rel_err": float(np.median(err)), "max_rel_err": float(err.max()),
            "top1_agree": agree, "rows": int(len(err)),
            "buffers_mib": {k: round(v, 2) for k, v in buffers.items() if k in available_extra_buffers()}}


# ------------------------------------------------------------------ the verdict (parent side)
@dataclass(frozen=True)
class Verdict:
    """Which extra buffer types a model may use, and why."""

    mode: str
    allowed: tuple[str, ...] | None  # None: llama.cpp's own choice (``on``)
    available: tuple[str, ...]
    reason: str
    seconds: float = 0.0  # what the self-test cost (0 when cached or not run)
    cached: bool = False
    buffers_mib: dict[str, float] = field(default_factory=dict)  # weights each fast path took

    def describe(self) -> str:
        """One log line: what was chosen and why."""
        if self.allowed is None:
            chosen = "llama.cpp's choice (" + ("+".join(self.available) or "none") + ")"
        else:
            chosen = "+".join(self.allowed) if self.allowed else "plain CPU path only"
            off = [b for b in self.available if b not in self.allowed]
            if off:
                chosen += f" ({'+'.join(off)} off)"
        extra = ""
        if self.buffers_mib:
            extra = " [" + ", ".join(f"{k} holds {v:g} MiB" for k, v in self.buffers_mib.items()) + "]"
        elif self.allowed and self.mode == "auto":
            extra = " [no weights of this model's types use them]"
        how = "cached verdict" if self.cached else (f"self-test {self.seconds:.1f} s" if self.seconds else self.mode)
        return f"CPU fast paths: {chosen}{extra}: {self.reason} ({how})"


def cache_dir() -> Path:
    """Where verdicts are kept: ``EDGEVLM_CACHE_DIR``, else the XDG cache directory."""
    env = os.environ.get("EDGEVLM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "edgevlm"


def machine_key(path: str, n_threads: int, **extra: object) -> str:
    """A verdict's cache key: this CPU, the llama.cpp build, the model file, the threads
    and ``extra`` (what else the verdict depends on)."""
    st = os.stat(path)
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    ident = {
        "cpu": cpu_info.cpu_model(), "flags": cpu_info.cpu_flags(), "llama_cpp": llama_cpp.__version__,
        "system_info": system_info, "threads": n_threads, **extra,
        "file": os.path.realpath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "weight_types": ggml().tensor_types(path),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def read_verdicts(file: Path) -> dict:
    """Cached verdicts by key; empty if the file is missing or unreadable."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def write_verdict(file: Path, key: str, entry: dict) -> None:
    """Add one verdict to ``file`` (replaced whole, so readers never see half of it)."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        entries = read_verdicts(file)
        entries[key] = entry
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
        os.replace(tmp, file)
    except OSError as exc:
        log.warning("cannot cache a verdict in %s: %s", file, exc)


def _timeout_s(path: str) -> float:
    env = os.environ.get(_TIMEOUT_ENV)
    if env:
        return float(env)
    return 60.0 + 40.0 * os.path.getsize(path) / 1e9  # two loads and 35 decodes, slow disk


def _run_selftest(path: str, allowed: tuple[str, ...], n_threads: int, timeout: float) -> tuple[bool, str, dict]:
    """One candidate set in a child process: (passed, reason, child's report)."""
    label = "+".join(allowed)
    out = isolation.run_module("models.cpu_paths", ["--selftest", path, "--allow", ",".join(allowed),
                                                    "--threads", str(n_threads)], timeout)
    if not out.ok:
        return False, f"{label} self-test {out.reason}", {}
    report = out.report
    err, agree = report["median_rel_err"], report["top1_agree"]
    figures = f"median logit error {err:.1%}, top-1 agreement {agree:.0%}"
    if not (err <= MAX_MEDIAN_ERROR and agree >= MIN_TOP1_AGREEMENT):
        return False, f"{label} gave wrong logits ({figures})", report
    return True, f"self-test passed ({figures})", report


def candidate_sets(available: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Sets to try, best first: all of them, then without the most preferred one, and so on.

    llama.cpp lists AMX (and KleidiAI) before CPU_REPACK, so a broken AMX still leaves
    the repacked kernels on.
    """
    return [available[i:] for i in range(len(available))]


def choose(path: str, mode: str = "auto", n_threads: int = 1, *, use_cache: bool = True) -> Verdict:
    """Decide which fast paths ``path`` may use on this machine (see the module docstring)."""
    if mode not in REPACK_MODES:
        raise ValueError(f"repack must be one of {', '.join(REPACK_MODES)}, not {mode!r}")
    available = available_extra_buffers()
    if mode == "off":
        return Verdict(mode, (), available, "turned off (repack off)")
    if mode == "on":
        return Verdict(mode, None, available, "taken untested (repack on)")
    if not available:
        return Verdict(mode, (), available, "this llama.cpp build has no extra buffer types for this CPU")
    file = cache_dir() / "cpu-paths.json"
    key = machine_key(path, n_threads, available=list(available))
    if use_cache:
        hit = read_verdicts(file).get(key)
        if hit is not None:
            return Verdict(mode, tuple(hit["allowed"]), available, hit["reason"], cached=True,
                           buffers_mib=hit.get("buffers_mib", {}))
    timeout = _timeout_s(path)
    started = time.monotonic()
    failures: list[str] = []
    verdict = None
    for allowed in candidate_sets(available):
        ok, reason, report = _run_selftest(path, allowed, n_threads, timeout)
        if ok:
            if failures:
                reason = "; ".join(failures) + f"; {'+'.join(allowed)} {reason}"
            verdict = Verdict(mode, allowed, available, reason, buffers_mib=report.get("buffers_mib", {}))
            break
        failures.append(reason)
    if verdict is None:
        verdict = Verdict(mode, (), available, "; ".join(failures))
    verdict = Verdict(**{**asdict(verdict), "seconds": time.monotonic() - started})
    if use_cache:
        write_verdict(file, key, {"allowed": list(verdict.allowed or ()), "reason": verdict.reason,
                                  "buffers_mib": verdict.buffers_mib, "checked_at": time.time()})
    return verdict


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m models.cpu_paths --selftest MODEL --allow A,B``."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--selftest", required=True, metavar="MODEL")
    p.add_argument("--allow", default="")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    allowed = tuple(a for a in args.allow.split(",") if a)
    print(json.dumps(selftest_child(args.selftest, allowed, args.threads)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
