"""``edgevlm doctor``: what a field engineer runs first on a new box.

It answers, in one screen, the questions behind most "it does not work here" reports:
what the CPU advertises and which llama.cpp fast paths actually work on it, whether the
threads fit the CPUs this process may use, which energy sensor figures will come from,
whether every configured model (and projector) loads, and whether traces can be
written. Each model is loaded in a child process, so a model that crashes llama.cpp is
reported instead of ending the check. Every problem is one line; any problem makes the
exit status non-zero.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from server import __version__
from server.settings import Settings

_LOAD_TIMEOUT_S = 600.0


def _writable(path: Path) -> bool:
    """Whether ``path`` (a file that may not exist yet) could be created or appended to."""
    if path.exists():
        return os.access(path, os.W_OK)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return os.access(parent, os.W_OK | os.X_OK)


def _energy_lines(settings: Settings) -> list[str]:
    from telemetry.energy.meter import DEFAULT_ORDER, detect_meter

    lines = []
    for name in DEFAULT_ORDER:
        found = detect_meter(settings.energy_sysfs_root, order=[name],
                             cpu_watts_per_core=settings.cpu_watts_per_core)
        if found.meter is None:
            lines.append(f"  {name:9} absent: {found.skipped.get(name, 'not available')}")
            continue
        kind = "real sensor" if found.meter.measured else "ESTIMATE, not a measurement"
        lines.append(f"  {name:9} present: {found.meter.describe()} ({kind})")
        found.meter.close()
    return lines


def _load_check(spec_json: str, policy_json: str = "null") -> int:
    """Child side: load one model (and its projector) as the server would, then free it.

    With a restart policy (``--runners on``) the model loads in its runner process, as
    ``serve`` would load it, and the report has the runner's row (pid, RSS, restarts,
    last exit): a runner that cannot start here will not start under the server.
    """
    from models.registry import ModelSpec, load_model
    from models.runner import RestartPolicy

    spec = ModelSpec(**json.loads(spec_json))
    policy = json.loads(policy_json)
    started = time.monotonic()
    model = load_model(spec, RestartPolicy(**policy) if policy is not None else None)
    report = {"seconds": time.monotonic() - started, "memory_mb": model.memory_bytes / 2**20,
              "vision": model.vision is not None, "fast_paths": model.engine.fast_paths.describe(),
              "attention": model.engine.attention.describe(),
              "runner": model.runner.supervision() if model.runner is not None else None}
    model.close()
    print(json.dumps(report), flush=True)
    return 0


def _runner_line(row: dict[str, Any]) -> str:
    """The runner's supervision row (``RunnerEngine.supervision``) as one line."""
    return (f"    runner      pid {row['pid']}, {row['rss_bytes'] / 2**20:.0f} MiB resident, "
            f"{row['restarts']} restarts, last exit {row['last_exit'] or 'none'}, {row['state']}")


def run(settings: Settings) -> int:
    """Print the report; return 0 when nothing is wrong, 1 otherwise."""
    import llama_cpp

    from models import cpu_info, cpu_paths, isolation
    from models.engine import default_threads
    from models.registry import ConfigError
    from server.app import registry_from, runner_policy
    from telemetry.device import gpu_names

    problems: list[str] = []
    out = print
    out(f"edgevlm doctor {__version__} (llama-cpp-python {llama_cpp.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()})")
    out(f"CPU        {cpu_info.cpu_model()}")
    out(f"  features {' '.join(cpu_info.simd_features()) or '(none reported)'}")
    out(f"llama.cpp  {llama_cpp.llama_print_system_info().decode(errors='replace').strip()}")
    available = cpu_paths.available_extra_buffers()
    out(f"fast paths this build offers here: {', '.join(available) or 'none'}")
    budget = cpu_info.cpu_budget()
    mem = psutil.virtual_memory()
    out(f"CPUs       {budget.describe()}")
    out(f"memory     {mem.available / 2**30:.1f} GiB available of {mem.total / 2**30:.1f} GiB")
    out("energy meters (the first present one is used):")
    for line in _energy_lines(settings):
        out(line)
    gpus = gpu_names()
    out(f"NVML GPUs  {', '.join(gpus) if gpus else 'none (nvidia-ml-py absent or no driver)'}")

    policy = runner_policy(settings)
    out(f"runners    {'on: each model loads in its own process' if policy else 'off'}")
    try:
        registry = registry_from(settings)
    except ConfigError as exc:
        problems.append(str(exc))
        registry = None
    if registry is not None:
        out("models:")
        for spec in registry.list():
            mark = "*" if spec.id == registry.default_id else " "
            out(f" {mark}{spec.id}  {spec.path}")
            if spec.mmproj:
                out(f"    mmproj      {spec.mmproj}")
            if spec.draft_model:
                out(f"    draft model {spec.draft_model}")
            threads = spec.threads or default_threads()
            warning = cpu_info.threads_warning(threads, budget)
            out(f"    threads     {threads}")
            if warning:
                problems.append(f"{spec.id}: {warning}")
            try:
                verdict = cpu_paths.choose(spec.path, spec.repack, threads)
                out(f"    {verdict.describe()}")
            except Exception as exc:  # an unreadable file: the load check says more
                out(f"    fast paths  not tested: {exc}")
            loaded = isolation.run_module(
                "server.doctor",
                ["--load-check", json.dumps(asdict(spec)), json.dumps(asdict(policy) if policy else None)],
                _LOAD_TIMEOUT_S)
            if loaded.ok:
                r = loaded.report
                out(f"    load        ok in {r['seconds']:.1f} s, {r['memory_mb']:.0f} MiB"
                    f"{', vision encoder ok' if r['vision'] else ''}")
                out(f"    {r['attention']}")
                if r.get("runner"):
                    out(_runner_line(r["runner"]))
            else:
                out(f"    load        FAILED: {loaded.reason}")
                problems.append(f"{spec.id}: loading {loaded.reason}")

    traces = settings.traces_path()
    if traces is None:
        out("traces     off")
    elif _writable(Path(traces)):
        out(f"traces     {traces}: writable")
    else:
        out(f"traces     {traces}: NOT writable")
        problems.append(f"trace file {traces} cannot be written (set --traces or fix permissions)")

    if problems:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        out(f"{len(problems)} problem(s) found")
        return 1
    out("no problems found")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--load-check"]:
        sys.exit(_load_check(*sys.argv[2:4]))
    sys.exit(2)
