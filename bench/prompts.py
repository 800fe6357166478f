"""Deterministic prompts of roughly known token length.

Words are common English words that the SmolLM2/GPT-2 style BPE vocabularies keep as
single tokens (with their leading space), grouped into ten-word sentences, so the
length in tokens is close to the requested one. The benchmarks report the exact
count from the server's ``usage.prompt_tokens``.

Every prompt starts with a nonce in the system message, so two prompts with
different nonces share at most the chat template's first few tokens: no server
gets a prompt-cache hit from an earlier repetition.
"""

from __future__ import annotations

import random
import uuid

WORDS = (
    "the people time year way day thing man world life hand part child eye woman place work week "
    "case point number group problem fact water room mother area money story month lot right study "
    "book job word business issue side kind head house service friend father power hour game line "
    "end member law car city name team minute idea kid body back parent face others level office door "
    "health person art war history party result change morning reason research girl guy moment air "
    "teacher force education river garden window market bridge station letter music paper table"
).split()

# "<|im_start|>system\n" + nonce sentence + "<|im_end|>\n<|im_start|>user\n" ... "<|im_start|>assistant\n"
CHAT_OVERHEAD_TOKENS = 30


def new_salt() -> str:
    """A short random string that makes this process's nonces unique."""
    return uuid.uuid4().hex[:6]


def filler(n_tokens: int, seed: str | int = 0) -> str:
    """About ``n_tokens`` tokens of plain text (ten-word sentences, about 11 tokens each)."""
    rng = random.Random(str(seed))
    words: list[str] = []
    budget = max(1, n_tokens)
    sentence: list[str] = []
    while budget > 0:
        sentence.append(rng.choice(WORDS))
        budget -= 1
        if len(sentence) == 10 or budget <= 0:
            text = " ".join(sentence)
            words.append(text[0].upper() + text[1:] + ".")
            budget -= 1  # the period
            sentence = []
    return " ".join(words)


def chat_prompt(n_tokens: int, nonce: str) -> list[dict[str, str]]:
    """Chat messages whose rendered prompt is about ``n_tokens`` tokens, unique per ``nonce``."""
    user_tokens = max(4, n_tokens - CHAT_OVERHEAD_TOKENS)
    return [
        {"role": "system", "content": f"Session {nonce}. Answer briefly."},
        {"role": "user", "content": filler(user_tokens, seed=nonce)},
    ]


def follow_up(turn: int) -> dict[str, str]:
    """A short user message for turn ``turn`` (2, 3, ...) of a multi-turn chat."""
    return {"role": "user", "content": f"Thanks. Now say more about point {turn}, in other words."}


def shared_system_prompt(n_tokens: int, nonce: str, question: str) -> list[dict[str, str]]:
    """One operator's request: a ~``n_tokens`` system prompt every request with ``nonce``
    shares (an app's manual), then that operator's own short question."""
    return [
        {"role": "system", "content": f"Shift {nonce}. " + filler(n_tokens - CHAT_OVERHEAD_TOKENS, seed=nonce)},
        {"role": "user", "content": question},
    ]
