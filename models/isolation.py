"""Run native code in a child Python process, so that its crash is a result, not our death.

llama.cpp and libmtmd end the process on a failed assert or a bad kernel (SIGSEGV,
SIGILL, abort). Anything that may hit one of those before we know the machine and the
model get along - the fast-path self-test, ``edgevlm doctor``'s load check - runs here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # the directory holding ``models``


def module_command(module: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run ``python -m module`` from this process's own code.

    ``-P`` keeps the working directory off the child's path and PYTHONPATH puts this
    package first: a server started in another checkout, or beside another project's
    ``models`` package, still runs its children from the code it runs itself.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (PACKAGE_ROOT, env.get("PYTHONPATH")) if x)
    return [sys.executable, "-P", "-m", module, *args], env


@dataclass(frozen=True)
class ChildOutcome:
    """How a child ended: ``ok`` with its JSON report, or why not in one phrase."""

    ok: bool
    reason: str = ""
    report: dict = field(default_factory=dict)


def run_module(module: str, args: list[str], timeout: float) -> ChildOutcome:
    """``python -m module args...``; its last stdout line starting with ``{`` is the report."""
    cmd, env = module_command(module, *args)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return ChildOutcome(False, f"hung (no answer in {timeout:.0f} s)")
    if proc.returncode < 0:
        return ChildOutcome(False, f"crashed ({exit_reason(proc.returncode)})")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return ChildOutcome(False, f"failed (exit {proc.returncode}: {tail})")
    try:
        return ChildOutcome(True, report=json.loads(lines[-1]))
    except ValueError:
        return ChildOutcome(False, f"answered garbage: {lines[-1][:120]}")


def exit_reason(returncode: int | None) -> str:
    """How a child ended, in words: ``SIGSEGV``, ``exit 1``, ``still running``."""
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"
