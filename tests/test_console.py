"""The web console (``/``) and the API docs, in headless Chromium against live servers.

Each page is loaded with the network to anything but 127.0.0.1 blocked, and every URL
the browser requested is checked to be the server's own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from bench.tinymodels import tiny_vlm
from models.registry import model_id_for
from tests.browser import (all_by_testid, by_testid, console_errors, require_browser, requested_urls,
                           screenshot, start_browser, wait_for)
from tests.conftest import LiveServer, chat_body, live_server
from tests.test_vision_api import png_bytes

REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url\(\s*["']?([^"')]+)|@import\s+["']([^"']+)""")
EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+""", re.I)


def own_urls(base: str, urls: list[str]) -> list[str]:
    """The URLs that are neither the server's own nor inline (data:, blob:) nor the
    browser's own pages (chrome://, never on the network)."""
    inline = ("data:", "blob:", "about:", "chrome://", "chrome-untrusted://")
    return [u for u in urls if not (u.startswith(base + "/") or u.startswith(inline))]


def references(text: str) -> list[str]:
    return [next(g for g in m.groups() if g) for m in REFERENCE.finditer(text)]


def test_pages_and_their_assets_reference_no_external_origin(server: LiveServer) -> None:
    """Every src/href/url() of / and /docs is a path on this server, and the
    console's own scripts and styles name no other origin at all."""
    with server.client() as c:
        seen: set[str] = set()
        assert c.get("/redoc").headers["location"] == "/docs"
        for page in ("/", "/docs"):
            r = c.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            csp = r.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "script-src 'self';" in csp
            assert not EXTERNAL.search(csp) and "*" not in csp
            refs = references(r.text)
            assert refs, page
            for ref in refs:
                assert ref.startswith("/") and not ref.startswith("//"), f"{page} loads {ref}"
                seen.add(ref)
        own = [p for p in seen if p.startswith("/console/") and "/vendor/" not in p]
        own += ["/console/js/" + p.name for p in Path("server/console/js").glob("*.js")]
        for path in set(own):
            r = c.get(path)
            assert r.status_code == 200, path
            assert not EXTERNAL.search(r.text), f"{path} names another origin"
        for path in (p for p in seen if p.endswith(".css")):
            r = c.get(path)
            assert r.status_code == 200, path
            for ref in references(r.text):
                assert ref.startswith(("data:", "#")) or not EXTERNAL.match(ref), f"{path} loads {ref}"
        # the libraries come with their licences
        for lib in ("uplot", "swagger-ui"):
            assert c.get(f"/console/vendor/{lib}/LICENSE").status_code == 200


# --- browser ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_browser()
    driver = start_browser(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser: Any) -> Any:
    """The browser on a blank page with its logs drained; session storage cleared after."""
    browser.get("about:blank")
    requested_urls(browser)
    console_errors(browser)
    yield browser
    try:
        browser.execute_script("sessionStorage.clear()")
    except Exception:
        pass


def open_console(driver: Any, srv: LiveServer) -> None:
    driver.get(srv.base_url + "/")
    wait_for(lambda: by_testid(driver, "model-select").find_elements("css selector", "option"),
             what="the model list")


def ask(driver: Any, question: str, max_tokens: int | None = None) -> tuple[Any, Any]:
    """Type and send a question; the new answer and timings elements."""
    before = len(all_by_testid(driver, "chat-answer"))
    if max_tokens is not None:
        box = by_testid(driver, "chat-max-tokens")
        box.clear()
        box.send_keys(str(max_tokens))
    by_testid(driver, "chat-input").send_keys(question)
    by_testid(driver, "chat-send").click()
    wait_for(lambda: len(all_by_testid(driver, "chat-answer")) > before, what="the answer box")
    return all_by_testid(driver, "chat-answer")[-1], all_by_testid(driver, "chat-timings")[-1]


def finished(timings: Any) -> str | None:
    return timings.get_attribute("data-state")


def assert_offline(driver: Any, srv: LiveServer) -> None:
    urls = requested_urls(driver)
    assert urls, "the performance log recorded no requests"
    assert own_urls(srv.base_url, urls) == []
    errors = console_errors(driver)
    assert not [e for e in errors if "Content Security Policy" in e or "Refused" in e], errors


def trace_span(srv: LiveServer, trace: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    with srv.client(headers=headers or {}) as c:
        return wait_for(lambda: (r := c.get(f"/api/requests/{trace}")).status_code == 200 and r.json(),
                        timeout=30, what="the span in the trace file")


def test_question_streams_into_the_page_with_no_outside_requests(server: LiveServer, page: Any) -> None:
    open_console(page, server)
    assert by_testid(page, "model-select").get_attribute("value") == "smollm2-135m-instruct-q4_1"
    # Count updates of the answer box: a streamed answer arrives in several pieces.
    page.execute_script("""
        window.answerUpdates = 0;
        new MutationObserver((records) => {
          for (const r of records) if (r.target.closest && r.target.closest('[data-testid=chat-answer]'))
            window.answerUpdates++;
        }).observe(document.getElementById('chat-log'), {subtree: true, childList: true, characterData: true});
    """)
    answer, timings = ask(page, "Name three colours.", max_tokens=24)
    wait_for(lambda: finished(timings), what="the answer to finish")
    assert finished(timings) == "done", timings.text
    assert answer.text.strip()
    assert page.execute_script("return window.answerUpdates") >= 3
    assert re.search(r"TTFT \d+ ms · [\d.]+ tok/s · \d+ prompt \+ \d+ answer tokens", timings.text)
    wait_for(lambda: all_by_testid(page, "chat-energy"), what="the energy figure")
    assert "energy: off" in timings.text  # the shared test server runs with --no-energy
    assert_offline(page, server)


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The tiny random-weight VLM with the estimate energy meter on."""
    d = tmp_path_factory.mktemp("console-vlm")
    llm, mmproj = tiny_vlm(d, "pixtral")
    with live_server(d, model=str(llm), mmproj=str(mmproj), ctx_size=4096, energy=True,
                     traces_flush_ms=100) as srv:
        srv.model_id = model_id_for(llm)  # type: ignore[attr-defined]
        yield srv


def test_photo_is_answered_by_the_vlm_with_image_tokens_shown(vlm: LiveServer, page: Any,
                                                               tmp_path: Path) -> None:
    photo = tmp_path / "gauge.png"
    photo.write_bytes(png_bytes(160, 120, seed=3))
    open_console(page, vlm)
    by_testid(page, "image-input").send_keys(str(photo))
    wait_for(lambda: by_testid(page, "attachments").find_elements("css selector", "img"),
             what="the photo preview")
    page.find_element("css selector", '[data-testid=profile-select] option[value="balanced"]').click()
    answer, timings = ask(page, "What does the gauge read?", max_tokens=8)
    wait_for(lambda: finished(timings), what="the answer to finish")
    assert finished(timings) == "done", timings.text
    shown = re.search(r"image tokens (\d+) → (\d+)", timings.text)
    assert shown and int(shown.group(2)) > 0, timings.text
    energy = wait_for(lambda: all_by_testid(page, "chat-energy"), what="the energy figure")[0]
    assert re.search(r"[\d.]+ J estimated \(estimate\)", energy.text), energy.text
    # the figures shown are the server's: the span behind this answer agrees
    span = trace_span(vlm, timings.get_attribute("data-trace"))
    assert span["image_tokens_after"] == int(shown.group(2))
    assert span["profile"] == "balanced"
    screenshot(page, "console-chat")
    assert_offline(page, vlm)


def test_stop_button_cancels_the_request_on_the_server(server: LiveServer, page: Any) -> None:
    open_console(page, server)
    answer, timings = ask(page, "Write a long story about a lighthouse keeper and a storm.",
                          max_tokens=1500)
    wait_for(lambda: len(answer.text) > 5, what="the answer to start")
    by_testid(page, "chat-stop").click()
    wait_for(lambda: finished(timings), what="the stop")
    assert finished(timings) == "stopped"
    trace = wait_for(lambda: timings.get_attribute("data-trace"), what="the trace id")
    span = trace_span(server, trace)
    assert span["status"] == "client_disconnected"
    assert span["finish_reason"] == "cancelled"
    assert 0 < span["output_tokens"] < 1500


def test_page_asks_for_the_api_key_and_refuses_without_it(make_server: Any, tiny_llm: Path,
                                                          page: Any) -> None:
    srv = make_server(model=str(tiny_llm), api_key=["s3cret-key"])
    page.get(srv.base_url + "/")
    key = wait_for(lambda: by_testid(page, "api-key-input").is_displayed() and by_testid(page, "api-key-input"),
                   what="the key prompt")
    assert not page.find_element("id", "app").is_displayed()
    key.send_keys("wrong-key")
    by_testid(page, "api-key-save").click()
    wait_for(lambda: "incorrect API key" in by_testid(page, "api-key-error").text, what="the refusal")
    assert not page.find_element("id", "app").is_displayed()
    by_testid(page, "api-key-input").send_keys("s3cret-key")
    by_testid(page, "api-key-save").click()
    wait_for(lambda: by_testid(page, "model-select").find_elements("css selector", "option"),
             what="the model list")
    assert page.execute_script("return sessionStorage.getItem('edgevlm.apiKey')") == "s3cret-key"
    answer, timings = ask(page, "Hi", max_tokens=4)
    wait_for(lambda: finished(timings), what="the answer")
    assert finished(timings) == "done", timings.text
    urls = requested_urls(page)
    assert not [u for u in urls if "s3cret" in u]  # keys never go in URLs
    assert own_urls(srv.base_url, urls) == []


def test_dashboard_shows_the_request_just_made(server: LiveServer, page: Any) -> None:
    with server.client() as c:
        r = c.post("/v1/chat/completions", json=chat_body("What is a torque wrench?", max_tokens=12))
        assert r.status_code == 200, r.text
    trace = r.headers["traceparent"].split("-")[1]
    open_console(page, server)
    by_testid(page, "tab-dashboard").click()
    row = wait_for(lambda: page.find_elements("css selector", f'tr[data-trace="{trace}"]'),
                   timeout=30, what="the request in the recent table")[0]
    cells = [td.text for td in row.find_elements("css selector", "td")]
    # the profile the request ran under: the server's default here
    assert cells[1] == "smollm2-135m-instruct-q4_1" and cells[2] == "quality" and cells[-1] == "ok"
    assert cells[4].endswith(f"/ {r.json()['usage']['completion_tokens']}")
    ttft = by_testid(page, "dashboard-ttft")
    model_row = wait_for(lambda: [tr for tr in ttft.find_elements("css selector", "tbody tr")
                                  if tr.text.startswith("smollm2-135m-instruct-q4_1 chat")],
                         what="the model's row")[0]
    figures = [td.text for td in model_row.find_elements("css selector", "td")]
    # model, operation, profile, requests, errors, TTFT p50, p95, decode tok/s, J/token (source), ...
    assert figures[2] == "quality"  # the server's default profile
    assert float(figures[3]) >= 1 and float(figures[5]) > 0 and float(figures[6]) >= float(figures[5])
    row.click()
    span = wait_for(lambda: by_testid(page, "dashboard-span").is_displayed() and by_testid(page, "dashboard-span"),
                    what="the span view")
    wait_for(lambda: "decode" in span.text and "prefill" in span.text, what="the phase timings")
    assert "gen_ai.input.messages" not in span.text  # no --capture-content
    screenshot(page, "console-dashboard")
    assert_offline(page, server)


def test_dashboard_says_when_the_trace_file_is_off(make_server: Any, tiny_llm: Path, page: Any) -> None:
    srv = make_server(model=str(tiny_llm), traces="none")
    open_console(page, srv)
    by_testid(page, "tab-dashboard").click()
    note = wait_for(lambda: by_testid(page, "dashboard-traces-off").is_displayed()
                    and by_testid(page, "dashboard-traces-off"), what="the note")
    assert "--traces none" in note.text


def test_docs_render_their_operations_offline(server: LiveServer, page: Any) -> None:
    paths = httpx.get(server.base_url + "/openapi.json").json()["paths"]
    n_operations = sum(len(ops) for ops in paths.values())
    page.get(server.base_url + "/docs")
    blocks = wait_for(lambda: page.find_elements("css selector", ".opblock"), what="Swagger UI operations")
    assert len(blocks) == n_operations
    assert "/v1/chat/completions" in page.find_element("css selector", "#swagger-ui").text
    assert_offline(page, server)
