"""Speculative decoding through the HTTP API: the flag, the per-request opt-out, timings and spans."""

from __future__ import annotations

import json
from pathlib import Path

from openai import OpenAI

from tests.test_speculative import WORK_ORDER

COPY = f"Copy the following work order exactly, word for word.\n\n{WORK_ORDER}"
MODEL = "smollm2-135m-instruct-q4_1"


def spans(path: Path) -> list[dict]:
    """Request spans (OTLP JSON lines) with their attributes as a flat dict.

    None yet while the exporter has not written its first batch: the file is created then.
    """
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for s in ss["spans"]:
                    if s["name"].startswith("chat "):
                        attrs = {a["key"]: int(a["value"]["intValue"]) if "intValue" in a["value"]
                                 else next(iter(a["value"].values())) for a in s["attributes"]}
                        out.append(attrs)
    return out


def without_and_with_drafts(client: OpenAI, max_tokens: int) -> tuple[object, object]:
    """The copy prompt at temperature 0, refusing drafts and then allowing them: same text."""
    msgs = [{"role": "user", "content": COPY}]
    plain = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0,
                                           extra_body={"edgevlm": {"speculative": False}})
    fast = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=max_tokens, temperature=0)
    assert fast.choices[0].message.content == plain.choices[0].message.content
    assert "drafted_tokens" not in plain.model_extra["timings"]
    return plain, fast


def test_speculation_is_on_by_default_reported_and_can_be_refused_per_request(make_server, tmp_path) -> None:
    traces = tmp_path / "traces.jsonl"
    srv = make_server(parallel=2, ctx_size=2048, traces=str(traces))
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    msgs = [{"role": "user", "content": COPY}]
    # 100 tokens: the copy's greedy answer has a near-tie at token 109 (a 0.04 logit margin
    # with the plain attention kernel, 0.11 with flash), where any change in summation parts it
    plain, fast = without_and_with_drafts(client, 100)
    t_fast = fast.model_extra["timings"]
    # how much it drafts is the planner's call on this machine's step costs (a compute-bound
    # CPU drafts little); that the copy drafted and had drafts accepted is not
    assert t_fast["drafted_tokens"] >= t_fast["accepted_tokens"] > 0
    # streamed: the last chunk's timings carry the same counts
    stream = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=100, temperature=0,
                                            stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    t_stream = next(c.model_extra["timings"] for c in reversed(chunks) if (c.model_extra or {}).get("timings"))
    srv.stop()
    found = spans(traces)  # in the order the requests finished
    assert len(found) == 3
    key = "edgevlm.speculative.{}_tokens".format
    assert key("drafted") not in found[0] and key("accepted") not in found[0]  # refused per request
    for span, timings in ((found[1], t_fast), (found[2], t_stream)):
        # the span and the (last chunk's) timings carry the same counts; by now this
        # engine has measured what rows cost here, and whether it drafts again is its call
        assert span.get(key("drafted"), 0) == timings.get("drafted_tokens", 0)
        assert span.get(key("accepted"), 0) == timings.get("accepted_tokens", 0)


def test_speculation_off_by_flag(make_server) -> None:
    srv = make_server(parallel=1, ctx_size=2048, speculative="off")
    client = OpenAI(base_url=srv.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": COPY}],
                                       max_tokens=60, temperature=0)
    assert "drafted_tokens" not in r.model_extra["timings"]


def test_a_bad_speculative_value_is_a_400(server) -> None:
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}],
                                                 "edgevlm": {"speculative": "yes"}})
    assert r.status_code == 400 and "speculative" in r.text
