"""Runner mode (``--runners on``): each model in its own supervised process.

A runner killed with SIGSEGV in the middle of a stream ends that stream with an OpenAI
error event and ``[DONE]``, its span says how the runner died, another model keeps
answering, and the model serves again after the restart; a runner that keeps crashing
marks its model failed; eviction ends the process; greedy output is the in-process
engine's, token for token.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from models.runner.supervisor import CrashLog, RestartPolicy
from tests.browser import wait_for
from tests.conftest import LiveServer, chat_body
from telemetry.record import peak_rss_bytes
from tests.test_speculative_api import spans

DEFAULT = "smollm2-135m-instruct-q4_1"


def runner_row(srv: LiveServer, model: str) -> dict:
    return httpx.get(srv.base_url + "/health", timeout=30).json()["models"][model]["runner"]


def crash(pid: int) -> None:
    os.kill(pid, signal.SIGSEGV)


def restarted(srv: LiveServer, model: str, old_pid: int) -> int | None:
    row = runner_row(srv, model)
    return row["pid"] if row["state"] == "ready" and row["pid"] not in (None, old_pid) else None


def model_dir(tmp_path: Path, default_gguf: Path, tiny_llm: Path) -> Path:
    d = tmp_path / "models"
    d.mkdir()
    (d / "main.gguf").symlink_to(default_gguf)
    (d / "tiny.gguf").symlink_to(tiny_llm)
    return d


def test_sigsegv_mid_stream_ends_it_with_model_crashed_while_another_model_answers(
        make_server, tmp_path: Path, default_gguf: Path, tiny_llm: Path) -> None:
    srv = make_server(runners="on", models_dir=str(model_dir(tmp_path, default_gguf, tiny_llm)),
                      parallel=2, ctx_size=2048, traces_flush_ms=50)
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
    assert client.chat.completions.create(**chat_body("Hi", model="tiny", max_tokens=4)).choices
    pid, tiny_pid = runner_row(srv, "main")["pid"], runner_row(srv, "tiny")["pid"]
    assert pid != tiny_pid and pid != os.getpid()

    events: list[str] = []
    body = chat_body("Count from one to a thousand.", model="main", max_tokens=1500, ignore_eos=True, stream=True)
    with httpx.stream("POST", srv.base_url + "/v1/chat/completions", json=body, timeout=120) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:  # the role announcement and two deltas: mid-stream
                crash(pid)
                # The other model answers while this one's runner is down and restarting.
                other = client.chat.completions.create(**chat_body("Hi", model="tiny", max_tokens=4))
                assert other.choices[0].finish_reason in ("stop", "length")
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "model_crashed" and "SIGSEGV" in error["message"]
    assert runner_row(srv, "tiny")["pid"] == tiny_pid

    crashed = wait_for(lambda: [s for s in spans(Path(srv.app.state.settings.traces))
                                if s.get("error.type") == "model_crashed"], 30, "the crashed span")
    assert crashed[0]["edgevlm.runner.exit"] == "SIGSEGV"
    assert crashed[0]["gen_ai.request.model"] == "main"

    # The next request waits out the restart and is answered by a new runner.
    answer = client.chat.completions.create(**chat_body("Say hello.", model="main"))
    assert answer.choices[0].message.content
    row = runner_row(srv, "main")
    assert row["pid"] != pid and row["restarts"] == 1 and row["last_exit"] == "SIGSEGV"
    assert not psutil.pid_exists(pid)


def test_a_runner_that_keeps_crashing_marks_its_model_failed(make_server) -> None:
    srv = make_server(runners="on", runner_max_crashes=2, parallel=1, ctx_size=512)
    pid = runner_row(srv, DEFAULT)["pid"]
    crash(pid)
    pid = wait_for(lambda: restarted(srv, DEFAULT, pid), 120, "the runner's restart")
    crash(pid)
    wait_for(lambda: runner_row(srv, DEFAULT)["state"] == "failed", 60, "the model marked failed")

    health = httpx.get(srv.base_url + "/health", timeout=30)
    assert health.status_code == 503
    assert "crashed 2 times" in health.json()["models"][DEFAULT]["failure"]
    card = next(m for m in httpx.get(srv.base_url + "/v1/models").json()["data"] if m["id"] == DEFAULT)
    assert "SIGSEGV" in card["meta"]["failed"]
    client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**chat_body("Hi"))
    assert info.value.status_code == 503 and info.value.body["code"] == "model_failed"


def test_metrics_show_the_runner_which_ignores_ctrl_c_and_eviction_ends_it(make_server, tmp_path: Path, default_gguf: Path, tiny_llm: Path) -> None:
    srv = make_server(runners="on", models_dir=str(model_dir(tmp_path, default_gguf, tiny_llm)),
                      max_loaded_models=1, parallel=1, ctx_size=512)
    pid = runner_row(srv, "main")["pid"]
    metrics = httpx.get(srv.base_url + "/metrics").text
    assert f'edgevlm_runner_info{{gen_ai_request_model="main",last_exit="",pid="{pid}",state="ready"}} 1.0' in metrics
    rss = next(ln for ln in metrics.splitlines() if ln.startswith('edgevlm_runner_resident_memory_bytes{gen_ai_request_model="main"}'))
    assert float(rss.split()[-1]) > 50e6  # the weights and context live there
    assert 'edgevlm_runner_restarts_total{gen_ai_request_model="main"} 0.0' in metrics
    os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group: the server decides
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=chat_body("Hi", model="main", max_tokens=2), timeout=120)
    assert r.status_code == 200 and runner_row(srv, "main")["pid"] == pid
    r = httpx.post(srv.base_url + "/v1/chat/completions", json=chat_body("Hi", model="tiny", max_tokens=2), timeout=120)
    assert r.status_code == 200
    cards = {m["id"]: m["meta"] for m in httpx.get(srv.base_url + "/v1/models").json()["data"]}
    assert not cards["main"]["loaded"] and cards["tiny"]["loaded"]
    assert not psutil.pid_exists(pid)


def test_greedy_output_is_the_in_process_engines_token_for_token(make_server) -> None:
    # Two fresh servers given the same requests: their KV caches (and so the batches
    # each prompt is prefilled in) match, as the outputs must. Drafting is off: how many
    # rows it verifies follows measured step times, and llama.cpp's batch rounding may
    # then flip a near-tie, in one process as in two.
    server = make_server(runners="off", parallel=2, ctx_size=2048, speculative="off")
    runners = make_server(runners="on", parallel=2, ctx_size=2048, speculative="off")
    assert "runner" not in httpx.get(server.base_url + "/health").json()["models"][DEFAULT]
    for prompt in ("Write a haiku about a lighthouse.", "List three uses of copper."):
        body = chat_body(prompt, max_tokens=48)
        a = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=120).json()
        b = httpx.post(runners.base_url + "/v1/chat/completions", json=body, timeout=120).json()
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["usage"] == a["usage"]


def test_crashes_older_than_the_window_are_forgotten_and_backoff_doubles() -> None:
    log = CrashLog(RestartPolicy(max_crashes=2, window_s=60, backoff_s=0.5, backoff_max_s=1.5))
    log.record(0.0)
    assert not log.given_up and log.backoff_s == 0.5
    log.record(100.0)  # the first is outside the window now
    assert not log.given_up
    log.record(130.0)
    assert log.given_up and log.backoff_s == 1.0
    log.record(140.0)
    assert log.backoff_s == 1.5


def test_a_requests_memory_and_energy_count_its_runner(make_server, tmp_path: Path) -> None:
    # The model's weights and KV live in the runner: the span's peak RSS holds the
    # runner's peak besides the server's, and the CPU-time energy estimate its compute.
    before = peak_rss_bytes()
    srv = make_server(runners="on", parallel=1, ctx_size=512, traces_flush_ms=50, energy=True,
                      energy_sysfs_root=str(tmp_path))  # no power sensor here: the CPU-time estimate
    r = httpx.post(srv.base_url + "/v1/chat/completions", timeout=120,
                   json=chat_body("Count to twenty.", max_tokens=64, ignore_eos=True))
    assert r.status_code == 200
    runner_rss = runner_row(srv, DEFAULT)["rss_bytes"]
    [span] = wait_for(lambda: spans(Path(srv.app.state.settings.traces)), 30, "the span")
    assert span["edgevlm.runner.peak_rss_bytes"] >= runner_rss > 50e6
    assert span["edgevlm.process.peak_rss_bytes"] >= before + runner_rss
    # 64 decoded tokens on a 135M model take far more CPU than serving them over HTTP
    assert span["edgevlm.energy.source"] == "estimate"
    joules, decode_s = span["edgevlm.energy.joules"], span["edgevlm.decode_ms"] / 1000
    watts = srv.app.state.telemetry.energy.meter.watts_per_core
    assert joules >= 0.5 * decode_s * watts


def test_a_step_of_four_streams_reaches_the_server_in_one_message(tiny_llm: Path) -> None:
    """The runner sends each engine step's events together: one wake-up of the HTTP process
    per step, not one per stream, and every stream still gets all of its own events."""
    from models.engine import EngineConfig, Finished, GenerationRequest, TextDelta
    from models.runner import protocol as p
    from models.runner.process import Runner
    from models.sampling import SamplingParams

    class Recorder:
        def __init__(self) -> None:
            self.sent: list[tuple] = []

        def send(self, message: tuple) -> None:
            self.sent.append(message)

    channel = Recorder()
    runner = Runner(channel)  # type: ignore[arg-type]
    # every step hands over (auto would hold steps on a box whose CPUs the threads fill)
    assert runner.load(EngineConfig("tiny", str(tiny_llm), n_ctx=1024, n_parallel=4, stream_interval=1), None)
    try:
        prompts = ["one two three", "red green blue", "a b c d", "north south"]
        for job_id, text in enumerate(prompts, 1):
            req = GenerationRequest([runner.engine.tokenize(text)], SamplingParams(temperature=0), 24,
                                    ignore_eos=True)
            runner.jobs[job_id] = runner.engine.submit(req, runner.sink_for(job_id), max_queue=8)
        wait_for(lambda: sum(1 for m in channel.sent if m[0] == p.EVENTS
                             for _, e, _ in m[1] if isinstance(e, Finished)) == 4, timeout=60)
    finally:
        runner.engine.close()
    batches = [m[1] for m in channel.sent if m[0] == p.EVENTS]
    assert not [m for m in channel.sent if m[0] == p.EVENT]
    # decode steps carried a token of every stream in one message
    assert sum(1 for b in batches if len({job for job, _, _ in b}) == 4) >= 10
    assert len(batches) < 40  # about one per step (24 tokens), not one per stream and token
    for job_id in range(1, 5):
        mine = [e for b in batches for j, e, _ in b if j == job_id]
        assert isinstance(mine[-1], Finished) and mine[-1].reason == "length"
        assert all(isinstance(e, TextDelta) for e in mine[:-1]) and len(mine) > 10


def test_runners_run_the_servers_own_code_wherever_it_was_started(tiny_llm: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Started in a directory holding another project's ``models`` package, the server's
    runner still imports the server's code, not the working directory's."""
    from bench.edgevlm_server import edgevlm_server

    other = tmp_path / "models"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('imported the working directory models package')\n")
    monkeypatch.chdir(tmp_path)
    with edgevlm_server(model=str(tiny_llm), threads=1, ctx_size=512, parallel=1, startup_timeout_s=120) as srv:
        r = httpx.post(srv.api_url + "/chat/completions", timeout=60, json={
            "model": srv.model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        row = httpx.get(srv.base_url + "/health", timeout=10).json()["models"][srv.model]
    assert row["runner"]["state"] == "ready" and row["runner"]["restarts"] == 0
