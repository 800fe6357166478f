"""Measurement client for any OpenAI-compatible server (edgevlm, llama-server, ...).

Every request streams (SSE), so the client sees each token as it arrives:

* TTFT: from just before the request is sent to the first chunk carrying content,
* per-chunk arrival times of content (one token per chunk on llama-server and edgevlm),
* completion tokens from ``usage`` (asked for with ``stream_options.include_usage``);
  when the server reports no usage, the number of content chunks,
* total latency, up to ``data: [DONE]`` / end of stream.

Requests use temperature 0 and ``"ignore_eos": true`` (llama-server's field; edgevlm
accepts the same extension) so both servers decode exactly ``max_tokens`` tokens.

    async with BenchClient(server.base_url, server.model) as client:
        result = await client.chat([{"role": "user", "content": "Hi"}], max_tokens=64)
        print(result.ttft_s, result.completion_tokens, result.decode_tps)
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx


class BenchRequestError(RuntimeError):
    """The server answered a benchmark request with an error."""

    def __init__(self, status_code: int, body: str) -> None:
        super().__init__(f"HTTP {status_code}: {body[:500]}")
        self.status_code = status_code
        self.body = body


@dataclass
class StreamResult:
    """What one streamed request measured. Times are seconds since the request was sent."""

    ttft_s: float | None  # first content chunk; None if no content arrived
    token_times_s: list[float]  # arrival time of every content chunk
    completion_tokens: int  # from usage when reported, else len(token_times_s)
    prompt_tokens: int | None  # from usage, when reported
    usage_reported: bool
    total_s: float  # until the stream ended
    text: str
    finish_reason: str | None = None
    server_timings: dict[str, Any] | None = None  # llama-server's "timings" extension, if sent

    @property
    def chunks(self) -> int:
        return len(self.token_times_s)

    @property
    def decode_s(self) -> float:
        """First to last content chunk."""
        if len(self.token_times_s) < 2:
            return 0.0
        return self.token_times_s[-1] - self.token_times_s[0]

    @property
    def decode_tps(self) -> float | None:
        """Decode speed seen by the client: tokens after the first / time from first to last chunk."""
        if self.decode_s <= 0 or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / self.decode_s

    @property
    def inter_token_s(self) -> list[float]:
        """Gaps between consecutive content chunks."""
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]


@dataclass
class ConcurrentResult:
    """Several requests started together."""

    wall_s: float  # first request sent -> last stream ended
    results: list[StreamResult] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.results)

    @property
    def useful_tps(self) -> float:
        """Total completion tokens / wall time."""
        return self.completion_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def latencies_s(self) -> list[float]:
        return [r.total_s for r in self.results]


def _chunk_content(choice: dict[str, Any]) -> str:
    """Text a streamed choice carries: chat delta content (or reasoning), or completion text."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choice.get("text") or ""


class BenchClient:
    """Async streaming client for ``/v1/chat/completions`` and ``/v1/completions``.

    ``base_url`` is the server root (``http://127.0.0.1:8080``; a trailing ``/v1`` is
    accepted). ``include_usage`` asks for the usage chunk; if the server rejects
    ``stream_options`` (HTTP 400/422) the request is retried once without it and the
    client stops sending it. ``extra_body`` is merged into every request body.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        timeout_s: float = 600.0,
        include_usage: bool = True,
        ignore_eos: bool = True,
        extra_body: dict[str, Any] | None = None,
        max_connections: int = 32,
        api_key: str | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.api_url = base if base.endswith("/v1") else f"{base}/v1"
        self.model = model
        self.include_usage = include_usage
        self.ignore_eos = ignore_eos
        self.extra_body = dict(extra_body or {})
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits, headers=headers)

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _body(self, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
        }
        if self.ignore_eos:
            body["ignore_eos"] = True
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(self.extra_body)
        body.update(extra)
        return body

    async def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int, **extra: Any) -> StreamResult:
        """Stream a chat completion; ``extra`` fields go into the body as-is."""
        return await self._request("chat/completions", {"messages": list(messages)}, max_tokens, extra)

    async def complete(self, prompt: str, max_tokens: int, **extra: Any) -> StreamResult:
        """Stream a (legacy) text completion."""
        return await self._request("completions", {"prompt": prompt}, max_tokens, extra)

    async def _request(
        self, path: str, payload: dict[str, Any], max_tokens: int, extra: dict[str, Any]
    ) -> StreamResult:
        body = {**self._body(max_tokens, extra), **payload}
        try:
            return await self.stream(path, body)
        except BenchRequestError as exc:
            if exc.status_code in (400, 422) and "stream_options" in body and "stream_options" not in extra:
                self.include_usage = False
                body.pop("stream_options")
                return await self.stream(path, body)
            raise

    async def stream(self, path: str, body: dict[str, Any]) -> StreamResult:
        """POST ``body`` to ``/v1/{path}`` and measure the SSE stream it returns."""
        url = f"{self.api_url}/{path.lstrip('/')}"
        token_times: list[float] = []
        parts: list[str] = []
        usage: dict[str, Any] | None = None
        finish_reason: str | None = None
        timings: dict[str, Any] | None = None
        start = time.perf_counter()
        async with self._http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                raw = await response.aread()
                raise BenchRequestError(response.status_code, raw.decode(errors="replace"))
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, "event:" lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    continue
                if "error" in chunk and not chunk.get("choices"):
                    raise BenchRequestError(500, data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("timings"):
                    timings = chunk["timings"]
                for choice in chunk.get("choices") or ():
                    content = _chunk_content(choice)
                    if content:
                        token_times.append(now - start)
                        parts.append(content)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
        total = time.perf_counter() - start
        completion_tokens = len(token_times)
        prompt_tokens = None
        if usage:
            completion_tokens = int(usage.get("completion_tokens", completion_tokens))
            if usage.get("prompt_tokens") is not None:
                prompt_tokens = int(usage["prompt_tokens"])
        return StreamResult(
            ttft_s=token_times[0] if token_times else None,
            token_times_s=token_times,
            completion_tokens=completion_tokens,
            prompt_tokens=prompt_tokens,
            usage_reported=usage is not None,
            total_s=total,
            text="".join(parts),
            finish_reason=finish_reason,
            server_timings=timings,
        )


async def run_concurrent(requests: Iterable[Awaitable[StreamResult]]) -> ConcurrentResult:
    """Start all requests at once; wall time runs until the last one ends."""
    start = time.perf_counter()
    results = await asyncio.gather(*requests)
    return ConcurrentResult(wall_s=time.perf_counter() - start, results=list(results))


# ---- statistics and tables -------------------------------------------------------


def median(values: Iterable[float | None]) -> float | None:
    """Median of the non-None values, or None when there are none."""
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def maximum(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_ratios(a: Sequence[float | None], b: Sequence[float | None]) -> list[float]:
    """a[i] / b[i] for the figures measured back to back (both present, b non-zero): drift
    on a shared machine, often larger than the difference measured, cancels in each pair."""
    return [x / y for x, y in zip(a, b) if x is not None and y]


def fmt(value: Any, spec: str = ".1f") -> str:
    """Format a number, '-' for None; strings pass through."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[fmt(c) if not isinstance(c, str) else c for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        out = []
        for i, width in enumerate(widths):
            cell = row[i] if i < len(row) else ""
            out.append(cell.ljust(width) if i == 0 else cell.rjust(width))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    if title:
        print(f"\n{title}")
    print(format_table(headers, rows))
