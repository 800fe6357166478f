"""Runners that compute at the same time share the cores instead of oversubscribing them.

The split itself (``share_threads``, ``CpuShare``), an engine taking up a new thread
count between steps with unchanged greedy output, and a live server whose two models
stream at once: each runner is told half the cores while both are busy, and the one
still streaming gets them all back when the other ends.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from models.engine import Engine, EngineConfig
from models.runner import cpu_share
from models.runner.cpu_share import CpuShare, share_threads
from tests.browser import wait_for
from tests.conftest import chat_body
from tests.test_batching import submit
from tests.test_runners import runner_row


def test_share_threads_keeps_what_fits_and_splits_what_does_not() -> None:
    assert share_threads({"a": 2}, 2) == {"a": 2}
    assert share_threads({"a": 1, "b": 1}, 2) == {"a": 1, "b": 1}
    assert share_threads({"a": 2, "b": 2}, 2) == {"a": 1, "b": 1}
    assert share_threads({"a": 16, "b": 16, "c": 16}, 16) == {"a": 6, "b": 5, "c": 5}
    assert share_threads({"a": 2, "b": 8}, 8) == {"a": 2, "b": 6}  # the even split, then the spare
    assert share_threads({"a": 4, "b": 4, "c": 4}, 2) == {"a": 1, "b": 1, "c": 1}  # never below one
    assert share_threads({}, 4) == {}


class FakeRunner:
    def __init__(self, n_threads: int):
        self.n_threads = n_threads
        self.jobs = 0
        self.told: list[int] = []

    @property
    def busy(self) -> bool:
        return self.jobs > 0

    def tell_threads(self, n: int) -> None:
        self.told.append(n)


def test_cpu_share_tells_busy_runners_their_share_and_gives_it_back() -> None:
    share = CpuShare(cores=4)
    a, b = FakeRunner(4), FakeRunner(4)
    a.jobs = 1
    share.update(a)
    assert a.told == [] and share.told(a) == 4  # alone: its own count, nothing to say
    b.jobs = 1
    share.update(b)
    assert a.told == [2] and b.told == [2]
    b.jobs = 0
    share.update(b)
    assert a.told == [2, 4] and b.told == [2]  # b keeps 2 until its next request
    b.jobs = 1
    share.update(b)
    assert a.told == [2, 4, 2] and b.told == [2]  # already told 2: no message
    # An update that arrives late (b's request ended, then a new one came, then the
    # first update ran) still reads the truth.
    share.update(b)
    assert a.told == [2, 4, 2]
    share.forget(b)  # b's process died: a gets the cores, a new b starts at its own count
    assert a.told == [2, 4, 2, 4] and share.told(b) == 4


def test_an_engine_takes_up_a_new_thread_count_with_the_same_greedy_output(tiny_llm: Path) -> None:
    engine = Engine(EngineConfig("tiny", str(tiny_llm), n_ctx=512, n_threads=2, n_parallel=1))
    try:
        assert engine.threads == 2
        two = submit(engine, "The grey heron", max_tokens=24).wait().text
        engine.set_threads(1)
        one = submit(engine, "The grey heron", max_tokens=24).wait().text
        assert engine.threads == 1 and one == two and one
        with pytest.raises(ValueError):
            engine.set_threads(0)
    finally:
        engine.close()


def test_two_models_streaming_at_once_split_the_cores(make_server, tmp_path: Path, default_gguf: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_share.CPU_SHARE, "cores", 2)  # as on a 2-core box, whatever this one has
    models = tmp_path / "models"
    models.mkdir()
    for name in ("main", "second"):  # the default model twice: both decode for seconds
        (models / f"{name}.gguf").symlink_to(default_gguf)
    srv = make_server(runners="on", models_dir=str(models), threads=2, parallel=1, ctx_size=2048,
                      speculative="off")
    httpx.post(srv.base_url + "/v1/chat/completions", json=chat_body("Hi", model="second", max_tokens=2), timeout=120)
    assert runner_row(srv, "main")["threads"] == runner_row(srv, "second")["threads"] == 2

    def stream(model: str, max_tokens: int):  # type: ignore[no-untyped-def]
        body = chat_body("Count to a thousand.", model=model, max_tokens=max_tokens, ignore_eos=True, stream=True)
        return httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=120)

    with stream("main", 1500) as long_one:
        lines = long_one.iter_lines()
        next(ln for ln in lines if ln.startswith("data: ") and '"content"' in ln)  # main is decoding
        with stream("second", 100) as short_one:
            short = short_one.iter_lines()
            next(ln for ln in short if ln.startswith("data: ") and '"content"' in ln)
            assert runner_row(srv, "main")["threads"] == runner_row(srv, "second")["threads"] == 1
            assert [ln for ln in short if ln.startswith("data: ")][-1] == "data: [DONE]"
        # second is idle again: main, still streaming, gets both cores back
        wait_for(lambda: runner_row(srv, "main")["threads"] == 2, 30, "main's cores back")
        assert [ln for ln in lines if ln.startswith("data: ")][-1] == "data: [DONE]"
