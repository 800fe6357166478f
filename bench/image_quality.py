"""Quality against a reference over image prompts: KLD, PPL and same-top-p of a VLM's answers.

Text chunks say little about a VLM's projector path, so the bundled image prompts
(``bench.image_prompts``) are scored too. For each picture the reference model (with its
projector) answers the question greedily (up to ``answer_tokens`` tokens, its end-of-turn
token included); that answer is then teacher-forced through both models after the same
templated image + question prompt, and the next-token distributions at the answer positions
are compared with ``bench.quality.compare`` (llama.cpp's definitions). Each model encodes
the image with its own projector through ``models.vision`` as the server does, and the
chunks go into the sequence as the engine prefills them (text as tokens, image rows as
embeddings).

With the random-weight tiny VLMs of ``bench.tinymodels`` the figures show the mechanics
work (0 against itself, > 0 against another quantization), nothing about quality.
"""

from __future__ import annotations

import os

import numpy as np

from bench.image_prompts import ImagePrompt, prompts
from bench.quality import QualityError, QualityResult, ScoredModel, _log_softmax, check_vocabulary, compare

MECHANICS_NOTE = ("random-weight test model (bench.tinymodels): these image-prompt figures show the "
                  "mechanics work, not quality")


def prompt_chunks(m: ScoredModel, item: ImagePrompt) -> list:
    """The templated image + question prompt as ``models.vision`` chunks (image encoded)."""
    from models.templates import ChatTemplateError, model_template
    from models.vision import TextChunk, VisionError

    vision = m.vision
    if vision is None:
        raise QualityError(f"{m.path}: no projector given, image prompts need --mmproj")
    if vision.uses_mrope:
        raise QualityError(f"{vision.mmproj_path}: M-RoPE projectors (Qwen2-VL family) are not supported "
                           "by image-prompt quality yet")
    try:
        text = model_template(m.model).render([{"role": "user",
                                                "content": f"{vision.media_marker}\n{item.question}"}])
        chunks = vision.tokenize(text, [item.image()])
    except (ChatTemplateError, VisionError, ValueError) as exc:
        raise QualityError(f"{m.path}: image prompt {item.name!r}: {exc}") from None
    if not chunks or not isinstance(chunks[-1], TextChunk) or not chunks[-1].tokens:
        raise QualityError(f"{m.path}: image prompt {item.name!r} does not end in text")
    return chunks


def _prefill(m: ScoredModel, chunks: list, tail: list[int], first_output: int) -> int:
    """Decode every chunk but the last, then the last text chunk followed by ``tail``, with
    logits from row ``first_output`` of that final decode on. Returns its length."""
    from models.vision import ImageChunk

    final = list(chunks[-1].tokens) + list(tail)
    need = sum(c.n_tokens for c in chunks[:-1]) + len(final)
    if need > m.ctx or len(final) > m.ctx:
        raise QualityError(f"{m.path}: an image prompt and its answer take {need} positions, more than "
                           f"--image-ctx {m.ctx}")
    m.seq.clear()
    pos = 0
    for c in chunks[:-1]:
        if isinstance(c, ImageChunk):
            rc = m.seq.decode_embeddings(c.embeddings, pos, non_causal=c.non_causal)
        else:
            rc = m.seq.decode(c.tokens, pos, logits=False) if c.tokens else 0
        if rc != 0:
            raise QualityError(f"{m.path}: llama_decode failed on an image prompt ({rc})")
        pos += c.n_tokens
    if m.seq.decode(final, pos, logits=lambda i: i >= first_output) != 0:
        raise QualityError(f"{m.path}: llama_decode failed on an image prompt")
    return len(final)


def greedy_answer(m: ScoredModel, chunks: list, answer_tokens: int) -> list[int]:
    """The model's greedy answer: up to ``answer_tokens`` tokens, stopping after end-of-generation."""
    import llama_cpp

    n_prompt = len(chunks[-1].tokens)
    _prefill(m, chunks, [], n_prompt - 1)
    pos = sum(c.n_tokens for c in chunks)
    tok = int(np.argmax(m.seq.logits(n_prompt - 1)))
    answer = [tok]
    while len(answer) < answer_tokens and not llama_cpp.llama_vocab_is_eog(m.vocab, tok) and pos < m.ctx:
        if m.seq.decode([tok], pos) != 0:
            raise QualityError(f"{m.path}: llama_decode failed while answering an image prompt")
        pos += 1
        tok = int(np.argmax(m.seq.logits(0)))
        answer.append(tok)
    return answer


def forced_logprobs(m: ScoredModel, chunks: list, answer: list[int]) -> np.ndarray:
    """Log-probabilities ``[len(answer), vocab]`` of the positions that predict each answer token."""
    n_prompt = len(chunks[-1].tokens)
    _prefill(m, chunks, answer[:-1], n_prompt - 1)
    rows = np.stack([m.seq.logits(i) for i in range(n_prompt - 1, n_prompt - 1 + len(answer))])
    return _log_softmax(rows.astype(np.float32))


class ImageReference:
    """The reference VLM's answers to the image prompts and its log-probabilities over them."""

    def __init__(self, path: str | os.PathLike[str], mmproj: str | os.PathLike[str], *, threads: int = 2,
                 answer_tokens: int = 16, ctx: int = 2048, items: list[ImagePrompt] | None = None) -> None:
        if answer_tokens < 1:
            raise QualityError("--answer-tokens must be at least 1")
        self.path, self.mmproj = str(path), str(mmproj)
        self.items = prompts() if items is None else items
        self.ctx, self.threads = ctx, threads
        ref = ScoredModel(path, ctx=ctx, threads=threads, mmproj=mmproj)
        try:
            self.random_weights = ref.is_random_weight_test_model
            self.n_vocab = ref.n_vocab()
            self.answers: list[list[int]] = []
            logprobs = []
            for item in self.items:
                chunks = prompt_chunks(ref, item)
                answer = greedy_answer(ref, chunks, answer_tokens)
                self.answers.append(answer)
                logprobs.append(forced_logprobs(ref, chunks, answer))
        finally:
            ref.close()
        self.logprobs = np.concatenate(logprobs)
        self.targets = np.concatenate([np.asarray(a) for a in self.answers])

    def measure(self, model_path: str | os.PathLike[str], mmproj: str | os.PathLike[str] | None = None
                ) -> QualityResult:
        """The model (with ``mmproj``, default the reference's) against the reference's answers."""
        model = ScoredModel(model_path, ctx=self.ctx, threads=self.threads, mmproj=mmproj or self.mmproj)
        try:
            check_vocabulary(model, self.n_vocab, self.path)
            lp = np.concatenate([forced_logprobs(model, prompt_chunks(model, item), answer)
                                 for item, answer in zip(self.items, self.answers)])
        finally:
            model.close()
        return compare(lp, self.logprobs, self.targets)
