"""Per-request sampler chains built from OpenAI sampling parameters."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import llama_cpp


PENALTY_LAST_N = 64
"""How many of the latest tokens the penalties look back over (llama.cpp's default)."""


class SamplingError(ValueError):
    """Sampling parameters llama.cpp cannot honour (e.g. a grammar that does not parse)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    grammar: str | None = None  # GBNF, root rule "root"

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing that reshapes the logits: an argmax needs no sampler chain."""
        return (self.greedy and not self.grammar and not self.presence_penalty
                and not self.frequency_penalty and self.repeat_penalty == 1.0)


def build_sampler(params: SamplingParams, vocab: llama_cpp.llama_vocab_p,
                  banned: Sequence[int] = ()) -> llama_cpp.llama_sampler_p:
    """A llama.cpp sampler chain; the caller frees it with ``llama_sampler_free``.

    ``banned`` tokens are never sampled (their logits go to -inf first): the
    end-of-generation tokens of a request that asked to ``ignore_eos``.
    """
    chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
    try:
        if banned:
            biases = (llama_cpp.llama_logit_bias * len(banned))(
                *(llama_cpp.llama_logit_bias(token, float("-inf")) for token in banned))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
                llama_cpp.llama_vocab_n_tokens(vocab), len(banned), biases))
        if params.grammar:
            grammar = llama_cpp.llama_sampler_init_grammar(vocab, params.grammar.encode(), b"root")
            if not grammar:
                raise SamplingError("response_format could not be compiled into a grammar")
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if params.presence_penalty or params.frequency_penalty or params.repeat_penalty != 1.0:
            llama_cpp.llama_sampler_chain_add(
                chain,
                # The pinned binding takes the vocabulary size first (5 arguments).
                llama_cpp.llama_sampler_init_penalties(
                    llama_cpp.llama_vocab_n_tokens(vocab), PENALTY_LAST_N,
                    params.repeat_penalty, params.frequency_penalty, params.presence_penalty,
                ),
            )
        if params.greedy:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
        if params.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else random.getrandbits(32)
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain
    except BaseException:
        llama_cpp.llama_sampler_free(chain)
        raise
