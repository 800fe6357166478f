"""``edgevlm quality MODEL --reference REF``: how far a quantized model's next-token
distributions drift from a reference model's, with llama.cpp's definitions.

Same measures as ``llama-perplexity --kl-divergence``: the text is cut into chunks of
``ctx`` tokens, the first token of each is BOS, and only the second half of each chunk
is scored (every scored token then has at least ``ctx/2`` tokens of context). For each
scored position: KL(reference || model) over the whole vocabulary, the probability each
gives the actual next token (Δp), and whether both put the same token on top.
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from models.llama_lib import OneSequence, tokenize

# Bundled evaluation text: written for this project (MIT, like the code), never used for
# calibration (imatrix) so quality is not measured on what a quantization was tuned on.
EVAL_TEXT = "eval_text.txt"


class QualityError(ValueError):
    """A missing model or a text too short for one chunk."""


def bundled_text() -> str:
    return resources.files("bench").joinpath("data", EVAL_TEXT).read_text(encoding="utf-8")


@dataclass
class QualityResult:
    tokens_scored: int
    ppl_model: float
    ppl_reference: float
    ln_ppl_ratio: float  # mean ln(PPL(Q)/PPL(base))
    kld_mean: float
    kld_stderr: float
    kld_max: float
    kld_p99_9: float
    kld_p99: float
    kld_p95: float
    kld_p90: float
    kld_median: float
    rms_dp_pct: float
    same_top_p_pct: float

    def lines(self) -> list[str]:
        return [
            f"tokens scored:        {self.tokens_scored}",
            f"PPL(Q):               {self.ppl_model:.4f}",
            f"PPL(base):            {self.ppl_reference:.4f}",
            f"Mean ln(PPL(Q)/PPL(base)): {self.ln_ppl_ratio:+.6f}",
            f"Mean    KLD:          {self.kld_mean:.6f} ± {self.kld_stderr:.6f}",
            f"Maximum KLD:          {self.kld_max:.6f}",
            f"99.9%   KLD:          {self.kld_p99_9:.6f}",
            f"99.0%   KLD:          {self.kld_p99:.6f}",
            f"95.0%   KLD:          {self.kld_p95:.6f}",
            f"90.0%   KLD:          {self.kld_p90:.6f}",
            f"Median  KLD:          {self.kld_median:.6f}",
            f"RMS Δp:               {self.rms_dp_pct:.3f} %",
            f"Same top p:           {self.same_top_p_pct:.3f} %",
        ]

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


class ScoredModel:
    """One model's log-probabilities over the scored positions of a text.

    Loaded with the CPU fast paths the self-test chose (``models.cpu_paths``): a plain
    ``llama_cpp.Llama`` would take every fast path the CPU advertises, and crash where AMX
    is broken.
    """

    def __init__(self, path: str | os.PathLike[str], *, ctx: int = 512, threads: int = 2,
                 mmproj: str | os.PathLike[str] | None = None) -> None:
        import llama_cpp

        from models import cpu_paths
        from models.llama_lib import meta_str

        if not Path(path).is_file():
            raise QualityError(f"{path}: no such file")
        self.path = str(path)
        self.ctx = ctx
        verdict = cpu_paths.choose(self.path, "auto", threads)
        self.model = cpu_paths.load_model(self.path, verdict.allowed)
        if not self.model:
            raise QualityError(f"{path}: llama.cpp could not load it")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.name = meta_str(self.model, "general.name") or ""
        self.vision = None  # a models.vision.VisionEncoder when the model is scored with its projector
        try:
            n_embd = int(llama_cpp.llama_model_n_embd_inp(self.model)) if mmproj is not None else 0
            self.seq = OneSequence(self.model, n_ctx=ctx, n_batch=ctx, n_threads=threads, n_embd=n_embd)
        except RuntimeError as exc:
            llama_cpp.llama_model_free(self.model)
            raise QualityError(f"{path}: {exc}") from None
        if mmproj is not None:
            from models.vision import VisionEncoder, VisionError

            try:
                self.vision = VisionEncoder(str(mmproj), self.model, n_threads=threads)
            except (VisionError, ValueError) as exc:
                self.close()
                raise QualityError(f"{mmproj}: {exc}") from None

    @property
    def is_random_weight_test_model(self) -> bool:
        """A ``bench.tinymodels`` file: its figures show the mechanics work, not quality."""
        return self.name.startswith("edgevlm tiny")

    def n_vocab(self) -> int:
        return self.seq.n_vocab

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self.vocab, text)

    def logprobs(self, tokens: list[int], max_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(log-probabilities at the scored positions [N, vocab], the tokens that came next [N])."""
        import llama_cpp

        n = self.ctx
        chunks = len(tokens) // n
        if max_chunks is not None:
            chunks = min(chunks, max_chunks)
        if chunks < 1:
            raise QualityError(f"the text has {len(tokens)} tokens, fewer than one chunk of {n}; "
                               "give a longer --text or a smaller --ctx")
        first = n // 2
        out, targets = [], []
        bos = int(llama_cpp.llama_vocab_bos(self.vocab))
        for c in range(chunks):
            chunk = list(tokens[c * n:(c + 1) * n])
            if bos >= 0:
                chunk[0] = bos
            self.seq.clear()
            if self.seq.decode(chunk, 0, logits=lambda i: first <= i < n - 1) != 0:
                raise QualityError(f"{self.path}: llama_decode failed on chunk {c}")
            scores = np.stack([self.seq.logits(i) for i in range(first, n - 1)]).astype(np.float32)
            out.append(_log_softmax(scores))
            targets.append(np.asarray(chunk[first + 1:n]))
        return np.concatenate(out), np.concatenate(targets)

    def close(self) -> None:
        import llama_cpp

        if self.vision is not None:
            self.vision.close()
        self.seq.close()
        llama_cpp.llama_model_free(self.model)


def compare(model_lp: np.ndarray, ref_lp: np.ndarray, targets: np.ndarray) -> QualityResult:
    """llama.cpp's KLD statistics from two sets of log-probabilities over the same positions."""
    if model_lp.shape != ref_lp.shape:
        raise QualityError(f"the two models disagree on shape {model_lp.shape} vs {ref_lp.shape} "
                           "(different vocabularies cannot be compared)")
    p_ref = np.exp(ref_lp.astype(np.float64))
    kld = np.sum(p_ref * (ref_lp.astype(np.float64) - model_lp.astype(np.float64)), axis=-1)
    kld = np.maximum(kld, 0.0)  # rounding can leave -1e-9 for identical rows
    idx = np.arange(len(targets))
    nll_q = -model_lp[idx, targets].astype(np.float64)
    nll_b = -ref_lp[idx, targets].astype(np.float64)
    dp = np.exp(-nll_q) - np.exp(-nll_b)
    same = np.argmax(model_lp, axis=-1) == np.argmax(ref_lp, axis=-1)
    n = len(kld)
    return QualityResult(
        tokens_scored=n,
        ppl_model=math.exp(nll_q.mean()), ppl_reference=math.exp(nll_b.mean()),
        ln_ppl_ratio=float((nll_q - nll_b).mean()),
        kld_mean=float(kld.mean()), kld_stderr=float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        kld_max=float(kld.max()), kld_p99_9=float(np.percentile(kld, 99.9)),
        kld_p99=float(np.percentile(kld, 99)), kld_p95=float(np.percentile(kld, 95)),
        kld_p90=float(np.percentile(kld, 90)), kld_median=float(np.median(kld)),
        rms_dp_pct=float(math.sqrt(np.mean(dp * dp)) * 100.0), same_top_p_pct=float(same.mean() * 100.0))


def check_vocabulary(model: ScoredModel, n_vocab: int, reference: str) -> None:
    """Distributions over different vocabularies cannot be compared: refuse early and say why."""
    if model.n_vocab() != n_vocab:
        raise QualityError(f"{model.path} has a vocabulary of {model.n_vocab()} tokens, the reference "
                           f"{reference} {n_vocab}: only models of one family can be compared")


class Reference:
    """The reference model's log-probabilities, computed once and compared with many variants."""

    def __init__(self, path: str | os.PathLike[str], text: str | None = None, *, ctx: int = 512,
                 threads: int = 2, max_chunks: int | None = None) -> None:
        self.text = bundled_text() if text is None else text
        self.path = str(path)
        self.ctx, self.threads, self.max_chunks = ctx, threads, max_chunks
        ref = ScoredModel(path, ctx=ctx, threads=threads)
        try:
            self.n_vocab = ref.n_vocab()
            self.tokens = ref.tokenize(self.text)
            self.logprobs, self.targets = ref.logprobs(self.tokens, max_chunks)
        finally:
            ref.close()

    def measure(self, model_path: str | os.PathLike[str]) -> QualityResult:
        model = ScoredModel(model_path, ctx=self.ctx, threads=self.threads)
        try:
            check_vocabulary(model, self.n_vocab, self.path)
            lp, targets = model.logprobs(self.tokens, self.max_chunks)
        finally:
            model.close()
        return compare(lp, self.logprobs, targets)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="edgevlm quality", description=__doc__.splitlines()[0])
    p.add_argument("model", help="GGUF model to judge")
    p.add_argument("--reference", required=True, help="reference GGUF (same vocabulary)")
    p.add_argument("--text", default=None, help="evaluation text file (default: the bundled one)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk; the second half is scored")
    p.add_argument("--chunks", type=int, default=None, help="score at most this many chunks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mmproj", default=None, help="the model's vision projector: also score the bundled "
                   "image prompts")
    p.add_argument("--reference-mmproj", default=None, help="the reference's projector (default: --mmproj)")
    p.add_argument("--answer-tokens", type=int, default=16, help="tokens of the reference's answer scored "
                   "per image prompt (default 16)")
    p.add_argument("--image-ctx", type=int, default=2048, help="context for an image prompt and its answer")
    args = p.parse_args(argv)
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except OSError as exc:
            raise QualityError(f"{args.text}: {exc.strerror or exc}") from exc
    if args.ctx < 8:
        raise QualityError("--ctx must be at least 8")
    ref = Reference(args.reference, text, ctx=args.ctx, threads=args.threads, max_chunks=args.chunks)
    print(f"model:     {args.model}\nreference: {args.reference}")
    print("\n".join(ref.measure(args.model).lines()))
    if args.mmproj is not None:
        from bench.image_quality import MECHANICS_NOTE, ImageReference

        images = ImageReference(args.reference, args.reference_mmproj or args.mmproj, threads=args.threads,
                                answer_tokens=args.answer_tokens, ctx=args.image_ctx)
        print(f"\nimage prompts: {len(images.items)} bundled pictures, the reference's greedy answer "
              f"(up to {args.answer_tokens} tokens) teacher-forced through both\n"
              f"mmproj:    {args.mmproj}\nreference mmproj: {images.mmproj}")
        print("\n".join(images.measure(args.model, args.mmproj).lines()))
        if images.random_weights:
            print(f"note: {MECHANICS_NOTE}")
    return 0
