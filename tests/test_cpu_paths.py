"""CPU fast paths are chosen by a self-test in a child process, never assumed.

The faults a broken AMX or repack kernel causes (a crash, a hang, wrong logits) are
injected into the self-test child through ``EDGEVLM_SELFTEST_FAULT``; each must end with
the fast path off, the model served, and the reason in the log.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import llama_cpp
import openai
import pytest

from models import cpu_paths
from models.registry import model_id_for

needs_fast_paths = pytest.mark.skipif(not cpu_paths.available_extra_buffers(),
                                      reason="this llama.cpp build offers no extra buffer types here")


@pytest.fixture(scope="module")
def q4_0_tiny(tiny_llm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model requantised to Q4_0, a type the repacked kernels take."""
    out = tmp_path_factory.mktemp("q4_0") / "tiny-q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(tiny_llm).encode(), str(out).encode(), params) == 0
    return out


def test_candidates_drop_the_most_preferred_type_first() -> None:
    assert cpu_paths.candidate_sets(("AMX", "CPU_REPACK")) == [("AMX", "CPU_REPACK"), ("CPU_REPACK",)]
    assert cpu_paths.candidate_sets(()) == []


def test_off_and_on_need_no_self_test(tiny_llm: Path) -> None:
    assert cpu_paths.choose(str(tiny_llm), "off").allowed == ()
    assert cpu_paths.choose(str(tiny_llm), "on").allowed is None  # llama.cpp's own choice
    with pytest.raises(ValueError, match="auto, on, off"):
        cpu_paths.choose(str(tiny_llm), "fast")


@needs_fast_paths
def test_self_test_passes_and_is_cached(q4_0_tiny: Path) -> None:
    first = cpu_paths.choose(str(q4_0_tiny), "auto", 2)
    # The first set that passes, the most preferred first: all of them where every kernel
    # works; on a Xeon whose AMX kernels crash (seen: SIGSEGV), CPU_REPACK alone.
    candidates = cpu_paths.candidate_sets(cpu_paths.available_extra_buffers())
    assert first.allowed in candidates and not first.cached and first.seconds > 0
    for failed in candidates[:candidates.index(first.allowed)]:
        assert f"{'+'.join(failed)} self-test " in first.reason  # each set tried before is named
    assert "self-test passed" in first.reason
    again = cpu_paths.choose(str(q4_0_tiny), "auto", 2)
    assert again.cached and again.allowed == first.allowed and again.seconds == 0
    os.utime(q4_0_tiny)  # a rewritten file is tested again
    assert not cpu_paths.choose(str(q4_0_tiny), "auto", 2).cached


@needs_fast_paths
def test_the_load_uses_only_the_allowed_buffer_types(q4_0_tiny: Path) -> None:
    """The rewrite of llama.cpp's extra buffer list decides where the weights go."""
    if "CPU_REPACK" not in cpu_paths.available_extra_buffers():
        pytest.skip("no CPU_REPACK on this build")
    with_repack = cpu_paths.isolation.run_module(
        "models.cpu_paths", ["--selftest", str(q4_0_tiny), "--allow", "CPU_REPACK"], 120)
    assert with_repack.ok and with_repack.report["buffers_mib"].get("CPU_REPACK", 0) > 0
    other_only = cpu_paths.isolation.run_module(
        "models.cpu_paths", ["--selftest", str(q4_0_tiny), "--allow", "NOT_A_BUFFER_TYPE"], 120)
    assert other_only.ok and other_only.report["buffers_mib"] == {}


@needs_fast_paths
@pytest.mark.parametrize("fault, reason", [
    ("segv", "crashed (SIGSEGV)"),
    ("wrong", "gave wrong logits"),
    ("hang", "hung (no answer in 15 s)"),
])
def test_a_failing_self_test_turns_the_fast_path_off_and_the_model_is_served(
        fault: str, reason: str, q4_0_tiny: Path, make_server, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path))  # no verdict from another test
    monkeypatch.setenv("EDGEVLM_SELFTEST_FAULT", fault)
    monkeypatch.setenv("EDGEVLM_SELFTEST_TIMEOUT_S", "15")
    caplog.set_level(logging.INFO, logger="edgevlm.engine")
    srv = make_server(model=str(q4_0_tiny), ctx_size=512)
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=60)
    model_id = model_id_for(q4_0_tiny)
    resp = client.chat.completions.create(model=model_id, max_tokens=4, temperature=0,
                                          messages=[{"role": "user", "content": "Hello"}])
    assert resp.choices[0].finish_reason in ("stop", "length")
    engine = srv.app.state.registry._loaded[model_id].engine
    assert engine.fast_paths.allowed == ()
    line = next(r.getMessage() for r in caplog.records if "CPU fast paths" in r.getMessage())
    assert reason in line and "plain CPU path only" in line


@needs_fast_paths
def test_only_the_failing_type_goes_when_others_pass(q4_0_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broken first-choice type (as AMX is on some Xeons) leaves the next one on."""
    real = cpu_paths.available_extra_buffers()
    machine = cpu_paths.choose(str(q4_0_tiny), "auto", 2, use_cache=False)  # the real types' own verdict
    assert machine.allowed  # (a machine whose every fast path fails would show nothing here)
    monkeypatch.setattr(cpu_paths, "available_extra_buffers", lambda: ("BROKEN_AMX", *real))
    monkeypatch.setenv("EDGEVLM_SELFTEST_FAULT", "segv:BROKEN_AMX")
    verdict = cpu_paths.choose(str(q4_0_tiny), "auto", 2, use_cache=False)
    assert verdict.allowed == machine.allowed
    assert "BROKEN_AMX" in verdict.reason and "crashed (SIGSEGV)" in verdict.reason
    off = re.search(r"\(([\w+]+) off\)", verdict.describe())  # "(BROKEN_AMX off)", or with AMX where it fails
    assert off and "BROKEN_AMX" in off.group(1).split("+")


def test_a_file_the_self_test_cannot_read_gets_the_plain_path_and_llama_cpps_error(tmp_path: Path) -> None:
    from models.engine import Engine, EngineConfig, EngineError
    from models.engine.native import choose_fast_paths

    bad = tmp_path / "notes.gguf"
    bad.write_text("not a model")
    verdict = choose_fast_paths(str(bad), "auto", 1)
    assert verdict.allowed == () and verdict.mode == "auto"
    with pytest.raises(EngineError) as err:
        Engine(EngineConfig("bad", str(bad), n_parallel=1))
    assert err.value.code == "model_load_failed" and str(bad) in str(err.value)
