"""The benchmark client measures what a fake streaming server is known to send.

The fake server (http.server on 127.0.0.1, no model) answers OpenAI-style streaming
requests with a role-only chunk, then content chunks after known delays, then an
optional usage chunk and ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from bench.client import (
    BenchClient,
    BenchRequestError,
    format_table,
    maximum,
    median,
    ratio,
    run_concurrent,
)


@dataclass
class Script:
    """What the fake server sends for the next requests."""

    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    first_delay_s: float = 0.15
    gap_s: float = 0.04
    send_usage: bool = True
    prompt_tokens: int = 12
    reject_stream_options: bool = False
    status: int = 200


class FakeServer:
    def __init__(self) -> None:
        self.script = Script()
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.bodies.append(body)
                fake.paths.append(self.path)
                script = fake.script
                if script.status != 200 or (script.reject_stream_options and "stream_options" in body):
                    status = script.status if script.status != 200 else 400
                    payload = json.dumps({"error": {"message": "unsupported: stream_options"}}).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                chat = self.path.endswith("/chat/completions")
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()

                def event(obj: dict[str, Any] | str) -> None:
                    data = obj if isinstance(obj, str) else json.dumps(obj)
                    self.wfile.write(f"data: {data}\n\n".encode())
                    self.wfile.flush()

                def choice(text: str, finish: str | None = None) -> dict[str, Any]:
                    if chat:
                        return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
                    return {"index": 0, "text": text, "finish_reason": finish}

                if chat:  # role-only chunk straight away: must not count as the first token
                    event({"choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
                time.sleep(script.first_delay_s)
                for i, tok in enumerate(script.tokens):
                    if i:
                        time.sleep(script.gap_s)
                    event({"choices": [choice(tok)]})
                event({"choices": [choice("", "length")]})
                if script.send_usage and "stream_options" in body:
                    n = len(script.tokens)
                    event({"choices": [], "usage": {"prompt_tokens": script.prompt_tokens,
                                                    "completion_tokens": n,
                                                    "total_tokens": script.prompt_tokens + n}})
                event("[DONE]")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    with FakeServer() as server:
        yield server


def chat_once(fake: FakeServer, **client_kwargs: Any):
    async def go():
        async with BenchClient(fake.base_url, "fake-model", **client_kwargs) as client:
            return await client.chat([{"role": "user", "content": "hi"}], max_tokens=4), client
    return asyncio.run(go())


def test_ttft_token_times_and_usage_are_measured(fake: FakeServer) -> None:
    result, _ = chat_once(fake)

    script = fake.script
    assert result.ttft_s is not None
    assert script.first_delay_s <= result.ttft_s < script.first_delay_s + 0.25
    assert len(result.token_times_s) == len(script.tokens)
    assert all(gap >= script.gap_s * 0.8 for gap in result.inter_token_s)
    assert result.completion_tokens == 4 and result.usage_reported
    assert result.prompt_tokens == 12
    assert result.text == "Hello, world!"
    assert result.finish_reason == "length"
    assert result.total_s >= result.token_times_s[-1]
    assert result.decode_tps == pytest.approx(3 / result.decode_s)
    assert 3 / (3 * script.gap_s + 0.25) < result.decode_tps <= 3 / (3 * script.gap_s * 0.8)


def test_request_asks_for_greedy_full_length_decoding_with_usage(fake: FakeServer) -> None:
    chat_once(fake)

    body = fake.bodies[0]
    assert fake.paths == ["/v1/chat/completions"]
    assert body["model"] == "fake-model"
    assert body["stream"] is True
    assert body["temperature"] == 0
    assert body["ignore_eos"] is True
    assert body["max_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True}


def test_without_usage_tokens_are_counted_from_chunks(fake: FakeServer) -> None:
    fake.script.send_usage = False
    fake.script.tokens = ["a", "b", "c", "d", "e", "f"]
    fake.script.first_delay_s = 0.05
    fake.script.gap_s = 0.01

    result, _ = chat_once(fake)

    assert not result.usage_reported
    assert result.completion_tokens == 6 == result.chunks
    assert result.prompt_tokens is None


def test_stream_options_rejected_falls_back_once_and_stops_sending_it(fake: FakeServer) -> None:
    fake.script.reject_stream_options = True
    fake.script.first_delay_s = 0.0

    result, client = chat_once(fake)

    assert [("stream_options" in b) for b in fake.bodies] == [True, False]
    assert client.include_usage is False
    assert result.completion_tokens == len(fake.script.tokens)


def test_server_error_raises(fake: FakeServer) -> None:
    fake.script.status = 500
    with pytest.raises(BenchRequestError) as info:
        chat_once(fake)
    assert info.value.status_code == 500


def test_text_completions_are_measured(fake: FakeServer) -> None:
    fake.script.first_delay_s = 0.05

    async def go():
        async with BenchClient(fake.base_url + "/v1", "fake-model") as client:
            return await client.complete("Once upon a time", max_tokens=4)

    result = asyncio.run(go())

    assert fake.paths == ["/v1/completions"]
    assert fake.bodies[0]["prompt"] == "Once upon a time"
    assert result.text == "Hello, world!"
    assert result.ttft_s is not None and result.ttft_s >= 0.05
    assert result.completion_tokens == 4


def test_concurrent_requests_wall_time_and_useful_throughput(fake: FakeServer) -> None:
    fake.script.first_delay_s = 0.1
    fake.script.gap_s = 0.02

    async def go():
        async with BenchClient(fake.base_url, "fake-model") as client:
            return await run_concurrent(
                client.chat([{"role": "user", "content": str(i)}], max_tokens=4) for i in range(3)
            )

    conc = asyncio.run(go())

    assert len(conc.results) == 3
    assert conc.completion_tokens == 12
    assert max(conc.latencies_s) <= conc.wall_s < sum(conc.latencies_s)  # they overlapped
    assert conc.useful_tps == pytest.approx(12 / conc.wall_s)


def test_statistics_and_table_helpers() -> None:
    assert median([3.0, None, 1.0, 2.0]) == 2.0
    assert median([None]) is None
    assert maximum([1.0, None, 5.0]) == 5.0
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None

    table = format_table(["metric", "edgevlm", "llama-server"], [["decode tok/s", 101.25, None]])
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "edgevlm", "llama-server"]
    assert set(lines[1].replace(" ", "")) == {"-"}
    assert lines[2].split() == ["decode", "tok/s", "101.2", "-"]


def test_paired_ratios_compare_each_repetition_back_to_back() -> None:
    from bench.harness import EDGEVLM, LLAMA_SERVER, Results

    results = Results()
    results.metric("tps", "tok/s")
    for e, l in [(100.0, 125.0), (None, 90.0), (120.0, 100.0)]:
        results.add("tps", EDGEVLM, e)
        results.add("tps", LLAMA_SERVER, l)
    assert results.paired_ratios("tps") == [0.8, 1.2]


def test_paired_ratios_skip_missing_figures_of_either_side() -> None:
    from bench.client import paired_ratios

    assert paired_ratios([100.0, None, 120.0, 50.0], [125.0, 90.0, 100.0, 0.0]) == [0.8, 1.2]
    assert paired_ratios([], [1.0]) == []


def test_paired_summary_gives_geomean_and_how_many_pairs_met_the_target() -> None:
    from bench.harness import EDGEVLM, LLAMA_SERVER, Results, Target

    results = Results()
    results.metric("tps", "tok/s", target=Target(">= llama", lambda e, l: e >= l))
    for e, l in [(80.0, 100.0), (125.0, 100.0), (100.0, 100.0)]:
        results.add("tps", EDGEVLM, e)
        results.add("tps", LLAMA_SERVER, l)
    line = results.paired_summary("tps", "tok/s per round")
    assert "median 1.00" in line and "geomean 1.00" in line  # (0.8 * 1.25 * 1.0) ** (1/3) == 1
    assert "range 0.80-1.25, 3 pairs" in line and "met in 2/3" in line
    results.metric("none", "no figures")
    assert results.paired_summary("none", "empty") == "empty: no pairs"


def test_alternate_runs_each_step_on_every_server_before_the_next_order_flipping(fake: FakeServer) -> None:
    from bench.harness import alternate
    from bench.process import RunningServer

    fake.script.first_delay_s, fake.script.gap_s = 0.0, 0.0
    servers = [RunningServer(name, fake.base_url, "fake-model", process=None, log_path=None)  # type: ignore[arg-type]
               for name in ("a", "b")]
    visits: list[tuple[int, str, str]] = []

    def step(label: str):
        async def measure(server: RunningServer, client: BenchClient, rep: int, salt: str) -> None:
            visits.append((rep, label, server.name))
        return measure

    asyncio.run(alternate(servers, 2, step("x"), step("y")))
    assert visits == [(0, "x", "a"), (0, "x", "b"), (0, "y", "b"), (0, "y", "a"),
                      (1, "x", "b"), (1, "x", "a"), (1, "y", "a"), (1, "y", "b")]
    assert len(fake.bodies) == 2  # one discarded warm-up request per server
