"""The attention kernel: flash attention or the plain path, timed per model and machine."""

from __future__ import annotations

import ctypes
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import llama_cpp
import numpy as np
import pytest

from models import attention, cpu_paths, llama_lib
from models.attention import AttentionVerdict, KernelTiming, decide
from models.engine import Engine, EngineConfig, EngineError
from models.llama_lib import OneSequence, ensure_backend
from models.registry import build_registry
from server.app import registry_from
from server.settings import Settings
from tests.conftest import assert_refused, live_server, serve_settings, two_model_config
from tests.test_batching import chat, submit
from tests.test_speculative import assert_same_or_near_tie
from tests.test_speculative_api import spans


def timing(prefill_ms: float, alone: float, shared: float) -> KernelTiming:
    return KernelTiming(512, prefill_ms, {"alone": alone, "shared pool": shared})


def test_the_plain_path_is_chosen_only_when_it_prices_the_request_cheaper_in_every_shape() -> None:
    flash = timing(1900.0, alone=20.0, shared=56.0)
    # 128 answer tokens: 1900 + 2560 = 4460 ms alone with flash attention; in four
    # streams each step is shared by four requests
    assert flash.request_ms("alone") == pytest.approx(1900.0 + 0.25 * 512 * 20.0)
    assert flash.request_ms("shared pool") == pytest.approx(1900.0 + 0.25 * 512 * 56.0 / 4)
    choice, reason = decide(flash, timing(2100.0, alone=13.5, shared=39.0))
    assert choice is False and "alone 20.0 vs 13.5 ms, shared pool 56.0 vs 39.0 ms" in reason
    assert "less without" in reason
    # faster alone, but slower in the shared pool (the AMD EPYC's case): flash attention stays
    choice, reason = decide(flash, timing(2100.0, alone=13.5, shared=80.0))
    assert choice is None and "flash attention kept" in reason
    # under MIN_GAIN everywhere: llama.cpp keeps its choice
    assert decide(flash, timing(2050.0, alone=19.0, shared=54.0))[0] is None
    # the plain path slower at all of it
    assert decide(flash, timing(2500.0, alone=25.0, shared=70.0))[0] is None


def test_verdict_maps_to_llama_cpp_flash_attn_types() -> None:
    assert AttentionVerdict("auto", None, "").flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert AttentionVerdict("on", True, "").flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert AttentionVerdict("off", False, "").flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    line = AttentionVerdict("auto", False, "why", seconds=2.5).describe()
    assert line == "attention: plain (flash attention off): why (probe 2.5 s)"


@pytest.fixture
def tiny_model(tiny_llm: Path) -> Iterator[llama_cpp.llama_model_p]:
    model = cpu_paths.load_model(str(tiny_llm), ())
    yield model
    llama_cpp.llama_model_free(model)


def test_auto_times_both_kernels_once_then_reads_the_cache(tiny_model: llama_cpp.llama_model_p, tiny_llm: Path,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path))
    timed: list[KernelTiming] = []
    real = attention.time_kernel
    monkeypatch.setattr(attention, "time_kernel", lambda *a: timed.append(real(*a)) or timed[-1])
    first = llama_lib.on_own_thread(lambda: attention.choose(tiny_model, str(tiny_llm), "auto", 2, (), gpu=False))
    assert len(timed) == 2 and not first.cached and first.seconds > 0
    # the real probe: each kernel prefilled and stepped in both shapes
    assert all(t.prefill_ms > 0 and set(t.step_ms) == set(attention.SHAPES) for t in timed)
    assert all(ms > 0 for t in timed for ms in t.step_ms.values())
    assert "ms with flash attention" in first.reason and "shared pool" in first.reason
    assert first.flash in (None, False)
    stored = json.loads((tmp_path / "attention.json").read_text())
    assert [entry["flash"] for entry in stored.values()] == [first.flash]
    again = llama_lib.on_own_thread(lambda: attention.choose(tiny_model, str(tiny_llm), "auto", 2, (), gpu=False))
    assert len(timed) == 2  # not timed again
    assert again.cached and (again.flash, again.reason) == (first.flash, first.reason)
    # another thread count is another machine as far as the kernels go
    llama_lib.on_own_thread(lambda: attention.choose(tiny_model, str(tiny_llm), "auto", 1, (), gpu=False))
    assert len(timed) == 4


def test_every_layout_of_a_model_gets_the_one_verdict(tiny_llm: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One kernel per model and machine: a shared pool and a stream per slot, any slot
    count, compute alike (what tests comparing them rely on, and a server loading it twice)."""
    monkeypatch.setenv("EDGEVLM_CACHE_DIR", str(tmp_path))
    engines = [Engine(EngineConfig("t", str(tiny_llm), n_ctx=512, n_parallel=p, kv_layout=layout))
               for p, layout in ((1, "shared"), (4, "shared"), (4, "per-slot"))]
    try:
        first, *rest = [e.attention for e in engines]
        assert not first.cached and all(v.cached and v.flash == first.flash for v in rest)
    finally:
        for e in engines:
            e.close()


def test_on_off_and_a_gpu_are_not_timed(tiny_model: llama_cpp.llama_model_p, tiny_llm: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attention, "time_kernel", lambda *a: pytest.fail("timed"))
    assert attention.choose(tiny_model, str(tiny_llm), "on", 2, (), gpu=False).flash is True
    assert attention.choose(tiny_model, str(tiny_llm), "off", 2, (), gpu=False).flash is False
    assert attention.choose(tiny_model, str(tiny_llm), "auto", 2, (), gpu=True).flash is None
    with pytest.raises(ValueError, match="flash_attn must be one of auto, on, off"):
        attention.choose(tiny_model, str(tiny_llm), "fast", 2, (), gpu=False)


def test_both_kernels_compute_the_same_attention(default_gguf: Path) -> None:
    """The plain path's logits are the flash kernel's up to summation order (not bit-equal:
    they are two kernels), on a prompt long enough for attention to matter."""
    model = cpu_paths.load_model(str(default_gguf), ())
    try:
        tokens = cpu_paths.selftest_tokens(model, 300)
        rows = {}
        for flash in (True, False):
            with OneSequence(model, n_ctx=320, n_batch=320, n_threads=2, flash_attn=flash) as seq:
                assert seq.decode(tokens, 0) == 0
                rows[flash] = np.stack([seq.logits(i).copy() for i in range(len(tokens))])
    finally:
        llama_cpp.llama_model_free(model)
    err = np.linalg.norm(rows[True] - rows[False], axis=1) / np.linalg.norm(rows[True], axis=1)
    assert 0 < np.median(err) < 0.05
    assert np.mean(rows[True].argmax(axis=1) == rows[False].argmax(axis=1)) > 0.95


_context_log: list[str] = []


@llama_cpp.llama_log_callback
def _collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if text:
        _context_log.append(text.decode("utf-8", errors="replace"))


@contextmanager
def llama_log() -> Iterator[list[str]]:
    """llama.cpp's own log lines while the block runs (its INFO lines included)."""
    ensure_backend()
    _context_log.clear()
    llama_cpp.llama_log_set(_collect, ctypes.c_void_p(0))
    try:
        yield _context_log
    finally:
        llama_cpp.llama_log_set(llama_lib._log_callback, ctypes.c_void_p(0))


@pytest.mark.parametrize("mode,flash,logged", [("on", True, "enabled"), ("off", False, "disabled")])
def test_the_engine_context_gets_the_chosen_kernel(tiny_llm: Path, mode: str, flash: bool, logged: str) -> None:
    with llama_log() as lines:
        engine = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=512, n_parallel=2, flash_attn=mode))
    try:
        assert engine.info.flash_attn is flash and engine.attention.flash is flash
        requested = [ln.split("=")[1].strip() for ln in lines if "flash_attn " in ln and "=" in ln]
        assert requested == [logged]
        assert submit(engine, chat(engine, "Name a colour."), max_tokens=8).wait().finish == "length"
    finally:
        engine.close()


def test_a_bad_mode_is_one_clear_error(tiny_llm: Path) -> None:
    with pytest.raises(EngineError, match="flash_attn must be one of auto, on, off, not 'fast'"):
        Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=512, n_parallel=1, flash_attn="fast"))


def test_default_model_answers_alike_with_either_kernel(default_gguf: Path) -> None:
    """Greedy answers of the plain path equal flash attention's, or part only at a near-tie."""
    prompts = ["List three safety checks before starting a lathe.", "What is a torque wrench for?"]
    engines = [Engine(EngineConfig(f"s-{mode}", str(default_gguf), n_ctx=1024, n_parallel=2, n_threads=2,
                                   flash_attn=mode)) for mode in ("on", "off")]
    try:
        answers = [[submit(e, chat(e, p), max_tokens=48).wait().job.sampled for p in prompts] for e in engines]
        for p, want, got in zip(prompts, *answers):
            assert_same_or_near_tie(engines[0], engines[0].tokenize(chat(engines[0], p)), want, got)
    finally:
        for e in engines:
            e.close()


def test_mode_from_flag_environment_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = two_model_config(tmp_path, 'flash_attn = "on"')
    assert build_registry(config=str(config)).specs["flag"].engine_config().flash_attn == "auto"  # the default
    monkeypatch.setenv("EDGEVLM_FLASH_ATTN", "off")
    specs = registry_from(Settings(config=str(config), embedded_model=False)).specs
    assert specs["own"].engine_config().flash_attn == "on"  # the model's own key wins
    assert specs["flag"].engine_config().flash_attn == "off"
    flagged = serve_settings("--flash-attn", "auto", "--config", str(config))
    assert registry_from(flagged).specs["flag"].engine_config().flash_attn == "auto"  # the flag wins
    assert_refused(tmp_path, monkeypatch, "EDGEVLM_FLASH_ATTN=fast", 'flash_attn = "fast"',
                   "flash_attn must be auto, on or off, not 'fast'")


def test_health_and_spans_show_each_models_kernel(tmp_path: Path, tiny_llm: Path) -> None:
    with live_server(tmp_path, model=str(tiny_llm), flash_attn="off", ctx_size=512, parallel=1) as srv:
        with srv.client() as c:
            models = c.get("/health").json()["models"]
            model_id = next(iter(models))
            r = c.post("/v1/chat/completions", json={"model": model_id, "max_tokens": 4,
                                                     "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200
    assert [row["attention"] for row in models.values()] == ["plain"]
    (span,) = spans(tmp_path / "traces.jsonl")
    assert span["edgevlm.model.flash_attn"] is False
