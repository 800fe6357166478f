"""``--stream-interval auto|N``: running requests' text handed over every N decode steps.

Each hand-over wakes the server and the client on the cores llama.cpp computes on, so
on a small CPU fewer of them leave it more time; the first token and the end still go
out at once, and the text is the same. ``auto`` (the default) hands every token over
while the model's threads leave a CPU free, every 4th once they take every CPU.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import openai
import pytest

from models import cpu_info
from models.engine import (Engine, EngineConfig, EngineError, Event, Failed, Finished, GenerationRequest, TextDelta,
                           default_threads, resolve_stream_interval)
from models.engine.types import AUTO_STREAM_INTERVAL
from models.registry import ConfigError, build_registry
from models.sampling import SamplingParams
from server.settings import Settings

MODEL = "smollm2-135m-instruct-q4_1"
TOKENS = 24


def _generate(gguf: Path, interval: int) -> tuple[list[list[str]], Event]:
    """The text deltas of one greedy answer, grouped by the hand-over that delivered them."""
    engine = Engine(EngineConfig("si", str(gguf), n_ctx=1024, n_parallel=1, speculative="off",
                                 stream_interval=interval))
    groups: list[list[str]] = [[]]
    done = threading.Event()
    final: list[Event] = []

    def sink(event: Event) -> None:
        if isinstance(event, TextDelta):
            groups[-1].append(event.text)
        elif isinstance(event, (Finished, Failed)):
            final.append(event)
            done.set()

    engine.flushed = lambda: groups.append([])  # called after each hand-over's sinks
    try:
        tokens = engine.tokenize(engine.template.render([{"role": "user", "content": "Count to fifty."}]))
        engine.submit(GenerationRequest([tokens], SamplingParams(temperature=0), TOKENS, ignore_eos=True),
                      sink, max_queue=1)
        assert done.wait(120)
    finally:
        engine.close()
    return [g for g in groups if g], final[0]


def test_text_goes_out_every_n_steps_the_first_token_at_once(default_gguf: Path) -> None:
    every, fourth = _generate(default_gguf, 1), _generate(default_gguf, 4)
    (groups1, end1), (groups4, end4) = every, fourth
    assert isinstance(end1, Finished) and isinstance(end4, Finished)
    assert end1.figures.output_tokens == end4.figures.output_tokens == TOKENS
    # the same answer either way
    assert "".join(sum(groups1, [])) == "".join(sum(groups4, []))
    # every step's token on its own hand-over; with 4, the first alone, then up to 4 at a time
    assert all(len(g) == 1 for g in groups1) and len(groups1) >= TOKENS - 2
    assert len(groups4[0]) == 1
    assert all(len(g) <= 4 for g in groups4)
    # 8 hand-overs where every step is fast; a slow box (steps near STREAM_HOLD_MAX_S / 3)
    # holds fewer steps, still far below one per token
    assert len(groups4) <= TOKENS // 2 + 2


def test_text_is_never_held_past_the_bound(default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step slower than the bound (here: any step) hands its text over at once: a slow
    model under an interval meant for a fast one streams as if the interval were 1."""
    import models.engine.worker as worker

    monkeypatch.setattr(worker, "STREAM_HOLD_MAX_S", 0.0)
    groups, end = _generate(default_gguf, 4)
    assert isinstance(end, Finished) and end.figures.output_tokens == TOKENS
    assert all(len(g) == 1 for g in groups) and len(groups) >= TOKENS - 2


def test_a_server_streams_fewer_chunks_with_the_same_text(make_server) -> None:  # type: ignore[no-untyped-def]
    srv = make_server(parallel=1, ctx_size=1024, stream_interval=4)
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Count to fifty."}], max_tokens=TOKENS,
                temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**args)
    chunks = [c for c in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **args)]
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    usage = [c.usage for c in chunks if c.usage is not None]
    assert "".join(content) == full.choices[0].message.content
    assert usage[0].completion_tokens == TOKENS
    assert len(content) <= TOKENS // 2 + 2  # 8 where every step is fast; one per token without
    assert httpx.get(srv.base_url + "/health", timeout=10).json()["models"][MODEL]["stream_interval"] == 4


def test_bad_intervals_are_refused_at_start_up(default_gguf: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEVLM_STREAM_INTERVAL", "3")
    assert Settings().stream_interval == 3
    monkeypatch.setenv("EDGEVLM_STREAM_INTERVAL", "auto")
    assert Settings().stream_interval == "auto"
    monkeypatch.setenv("EDGEVLM_STREAM_INTERVAL", "often")
    with pytest.raises(ValueError, match="auto or a whole number"):
        Settings()
    monkeypatch.setenv("EDGEVLM_STREAM_INTERVAL", "0")
    with pytest.raises(ValueError):
        Settings()
    config = tmp_path / "models.toml"
    config.write_text(f'[[models]]\nid = "bad"\npath = "{default_gguf}"\nstream_interval = 0\n')
    with pytest.raises(ConfigError, match="stream_interval"):
        build_registry(config=str(config))
    with pytest.raises(EngineError, match="stream_interval") as refused:
        Engine(EngineConfig("bad", str(default_gguf), stream_interval=65))
    assert refused.value.code == "invalid_config"


def test_auto_holds_text_only_where_the_model_takes_every_cpu() -> None:
    assert resolve_stream_interval("auto", n_threads=2, usable_cpus=2) == AUTO_STREAM_INTERVAL
    assert resolve_stream_interval("auto", n_threads=4, usable_cpus=2) == AUTO_STREAM_INTERVAL
    assert resolve_stream_interval("auto", n_threads=2, usable_cpus=3) == 1  # a CPU for server and client
    assert resolve_stream_interval(1, n_threads=2, usable_cpus=2) == 1  # a number is kept as given
    assert resolve_stream_interval(8, n_threads=1, usable_cpus=16) == 8


def test_an_engine_resolves_auto_from_its_threads_and_the_usable_cpus(
        default_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default config is auto; the engine applies what it resolves and reports it."""
    usable = cpu_info.cpu_budget().usable
    engine = Engine(EngineConfig("auto", str(default_gguf), n_ctx=512, n_parallel=1, n_threads=usable))
    try:
        assert engine.info.stream_interval == engine._stream_interval == AUTO_STREAM_INTERVAL
    finally:
        engine.close()
    # the same threads on a machine with CPUs to spare: every token goes out alone
    monkeypatch.setattr(cpu_info, "cpu_budget", lambda: cpu_info.CpuBudget(machine=usable + 2,
                                                                         affinity=usable + 2, quota=None))
    engine = Engine(EngineConfig("auto", str(default_gguf), n_ctx=512, n_parallel=1, n_threads=usable))
    try:
        assert engine.info.stream_interval == engine._stream_interval == 1
    finally:
        engine.close()


def test_health_shows_the_interval_auto_resolved_to(server) -> None:  # type: ignore[no-untyped-def]
    row = httpx.get(server.base_url + "/health", timeout=10).json()["models"][MODEL]
    setting = Settings().stream_interval or "auto"  # EDGEVLM_STREAM_INTERVAL, if set, reaches the server too
    assert row["stream_interval"] == resolve_stream_interval(setting, default_threads(), cpu_info.cpu_budget().usable)
