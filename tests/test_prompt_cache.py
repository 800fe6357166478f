"""The prompt cache through the server: flag, environment and TOML, and what a client sees."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from models.registry import DEFAULT_MODEL_ID
from server.app import registry_from
from server.settings import Settings
from tests.conftest import assert_refused, live_server, serve_settings, two_model_config

# A question with a clear answer: with the cache off the document is prefilled again among
# other cells, in another summation order, and an open reply to it was a near-tie at its
# first token (0.1 logit).
DOC = ("Work order 7, press four: " + "replace the drive belt, then test the guard and log it. " * 10
       + "Which part is replaced?")


def _ask(client: openai.OpenAI, text: str) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=[{"role": "user", "content": text}],
                                          max_tokens=12, temperature=0)


@pytest.mark.parametrize("layout, cache_mb", [("per-slot", 256), ("shared", 256), ("shared", 0)])
def test_a_work_order_asked_about_again_after_other_chats_comes_back_cached(
        tmp_path: Path, layout: str, cache_mb: int) -> None:
    # two slots, three other conversations between: the work order's slot went to another
    with live_server(tmp_path, parallel=2, ctx_size=2048, kv_layout=layout, prompt_cache_mb=cache_mb) as srv:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
        first = _ask(client, DOC)
        for i in range(3):
            _ask(client, f"Shift {i} note: " + "the line stopped twice and restarted. " * 8)
        again = _ask(client, DOC)
    cached = again.usage.prompt_tokens_details.cached_tokens
    if not cache_mb:  # only the chat template's first tokens match what the slots hold
        assert cached < again.usage.prompt_tokens // 4
        assert again.choices[0].message.content == first.choices[0].message.content
        return
    assert cached == again.usage.prompt_tokens - 1  # all but the last prompt token
    if layout == "per-slot":
        # the copy lands at the start of an emptied stream, where the first prefill put it:
        # the same sums, the same answer. In the shared pool it lands among other cells,
        # which changes the order attention sums in (a near-tie may part; see test_batching).
        assert again.choices[0].message.content == first.choices[0].message.content


def test_size_from_flag_environment_and_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = two_model_config(tmp_path, "prompt_cache_mb = 0")
    monkeypatch.setenv("EDGEVLM_PROMPT_CACHE_MB", "7")
    settings = Settings(config=str(config), embedded_model=False)
    assert settings.prompt_cache_mb == 7
    specs = registry_from(settings).specs
    assert specs["own"].engine_config().prompt_cache_mb == 0  # the model's own key wins
    assert specs["flag"].engine_config().prompt_cache_mb == 7
    flagged = serve_settings("--prompt-cache-mb", "64", "--config", str(config))
    assert flagged.prompt_cache_mb == 64  # the flag wins over the environment
    assert registry_from(flagged).specs["flag"].engine_config().prompt_cache_mb == 64
    assert_refused(tmp_path, monkeypatch, "EDGEVLM_PROMPT_CACHE_MB=-1", "prompt_cache_mb = -5", "prompt_cache_mb")
