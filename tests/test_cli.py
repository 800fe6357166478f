"""Start-up mistakes are one clear line and a non-zero exit; ``edgevlm doctor`` reports problems."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest


def edgevlm(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0]


def test_missing_model_file() -> None:
    assert_one_line_error(edgevlm("serve", "--model", "/no/such.gguf"), "/no/such.gguf", "no such file")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(edgevlm("serve", "--config", str(tmp_path / "nope.toml")), "nope.toml")


@pytest.mark.parametrize("toml, word", [
    ("[server]\nport = 1\n", "server"),
    ('[[models]]\nid = "a"\npath = "a.gguf"\ncolour = "red"\n', "colour"),
    ('[[models]]\nid = "a"\npath = "a.gguf"\nrepack = "sometimes"\n', "repack"),
    ('[[models]]\nid = "a"\npath = "a.gguf"\nspeculative = "eagle"\n', "speculative"),
])
def test_config_with_an_unknown_key_or_value(tmp_path: Path, tiny_llm: Path, toml: str, word: str) -> None:
    cfg = tmp_path / "models.toml"
    cfg.write_text(toml.replace("a.gguf", str(tiny_llm)))
    assert_one_line_error(edgevlm("serve", "--config", str(cfg)), word)


def test_models_list_names_a_missing_directory() -> None:
    assert_one_line_error(edgevlm("models", "list", "--models-dir", "/no/such/dir"), "/no/such/dir")


@pytest.mark.parametrize("var, value, flag", [("EDGEVLM_REPACK", "sometimes", "--repack"),
                                              ("EDGEVLM_SPECULATIVE", "eagle", "--speculative")])
def test_bad_environment_value_names_flag_and_variable(var: str, value: str, flag: str) -> None:
    assert_one_line_error(edgevlm("serve", env={var: value}), flag, var)


def test_doctor_on_a_good_setup(tiny_llm: Path, tmp_path: Path) -> None:
    proc = edgevlm("doctor", "--model", str(tiny_llm), "--threads", "1",
                   "--traces", str(tmp_path / "t" / "traces.jsonl"), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for expected in ("CPU ", "features", "llama.cpp  CPU :", "CPUs ", "memory ", "estimate  present",
                     "CPU fast paths:", "load        ok", "writable", "no problems found"):
        assert expected in out, out


@pytest.mark.parametrize("args, env, runners", [
    (("--runners", "on"), {}, True), ((), {}, True),
    (("--runners", "off"), {}, False), ((), {"EDGEVLM_RUNNERS": "off"}, False),
])
def test_doctor_loads_each_model_in_a_runner_and_shows_it_unless_runners_are_off(
        tiny_llm: Path, tmp_path: Path, args: tuple[str, ...], env: dict[str, str], runners: bool) -> None:
    proc = edgevlm("doctor", "--model", str(tiny_llm), "--threads", "1", *args,
                   "--traces", str(tmp_path / "traces.jsonl"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "load        ok" in proc.stdout, proc.stdout
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("    runner ")]
    if not runners:
        assert "runners    off" in proc.stdout and not rows, proc.stdout
        return
    assert "runners    on" in proc.stdout and len(rows) == 1, proc.stdout
    m = re.fullmatch(r"    runner      pid (\d+), (\d+) MiB resident, 0 restarts, last exit none, ready", rows[0])
    assert m and int(m[2]) > 0, rows[0]
    assert not psutil.pid_exists(int(m[1]))  # the doctor closed the runner it started


def test_doctor_reports_each_problem_on_one_line(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "broken.gguf").write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing else
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cpus = os.cpu_count() or 1
    proc = edgevlm("doctor", "--models-dir", str(models), "--threads", str(cpus + 4),
                   "--traces", str(locked / "traces.jsonl"), timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("problem: ")]
    assert any("broken: loading failed" in p for p in problems), proc.stderr
    assert any(f"{cpus + 4} threads configured" in p for p in problems), proc.stderr
    if os.geteuid() != 0:  # root writes anywhere
        assert any("cannot be written" in p for p in problems), proc.stderr
    assert "Traceback" not in proc.stderr
