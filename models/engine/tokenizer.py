"""A model's tokenizer and chat template, over a llama.cpp vocabulary.

The engine tokenizes with its loaded model; a runner's client in the HTTP process
(``models.runner``) does the same over a vocab-only load, which holds no weights and no
context. One class serves both, so the two tokenize identically.
"""

from __future__ import annotations

import ctypes
import functools

import llama_cpp

from models.llama_lib import meta_str, tokenize
from models.templates import CHATML_TEMPLATE, ChatTemplate


class Tokenizer:
    """Text <-> tokens for ``self.vocab``; call ``_init_tokenizer`` once the model is loaded."""

    vocab: llama_cpp.llama_vocab_p

    def _init_tokenizer(self, model: llama_cpp.llama_model_p, chat_template: str | None) -> None:
        self.vocab = llama_cpp.llama_model_get_vocab(model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self.bos_id = int(llama_cpp.llama_vocab_bos(self.vocab))
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        # Each generated token's text, looked up once per token id: a ctypes call and a
        # buffer per token is a measurable share of a decode step's Python work.
        self._pieces: dict[int, bytes] = {}
        self.template = ChatTemplate(
            chat_template or meta_str(model, "tokenizer.chat_template") or CHATML_TEMPLATE,
            bos_token=self.token_text(self.bos_id),
            eos_token=self.token_text(int(llama_cpp.llama_vocab_eos(self.vocab))),
        )

    @functools.cached_property
    def eog_ids(self) -> tuple[int, ...]:
        """Every end-of-generation token (EOS, EOT, ``<|im_end|>``...): what ``ignore_eos``
        keeps from being sampled. Found once, by asking the vocabulary about each id."""
        return tuple(t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t))

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize with special tokens parsed; drops a BOS the template already wrote."""
        add = add_special and self.add_bos
        tokens = tokenize(self.vocab, text, add_special=add, parse_special=True)
        if add and len(tokens) > 1 and tokens[0] == self.bos_id and tokens[1] == self.bos_id:
            tokens.pop(0)
        return tokens

    def token_bytes(self, token: int, *, special: bool = False) -> bytes:
        if not special:
            piece = self._pieces.get(token)
            if piece is None:
                piece = self._pieces[token] = self._token_piece(token, special=False)
            return piece
        return self._token_piece(token, special=True)

    def _token_piece(self, token: int, *, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)  # per call: the worker and request threads both use this
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self.token_bytes(token, special=True).decode("utf-8", errors="replace")

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")
