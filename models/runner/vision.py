"""``RemoteVision``: a runner's vision encoder, as the HTTP process sees it.

It stands where an in-process ``models.vision.VisionEncoder`` would (``LoadedModel.vision``)
with the same attributes and methods the request path uses. The facts (projector,
media marker, M-RoPE, attention) came with the runner's READY and are read without a
round trip; ``tokenize`` and ``count_tokens`` run in the runner, where libmtmd and the
embedding cache live. Images go as RGB pixels with the pixel hash computed here, as an
in-process encoder computes it, so the runner's cache keys are the same.
"""

from __future__ import annotations

from typing import Sequence

from models.engine import EngineError
from models.runner.client import RunnerEngine
from models.vision import Chunk, ImageInput, ProjectorFacts, rgb_pixels

STATS_TIMEOUT_S = 5.0  # a /metrics scrape does not hang on a runner that does not answer
_NO_STATS = {"entries": 0, "bytes": 0, "max_bytes": 0, "hits": 0, "misses": 0, "evictions": 0}


class RemoteCache:
    """The runner's embedding-cache counters (``EmbeddingCache.stats`` / ``nbytes``)."""

    def __init__(self, engine: RunnerEngine):
        self._engine = engine
        self._last = dict(_NO_STATS)

    def stats(self) -> dict[str, int]:
        """The runner's counters; while it restarts, failed or does not answer, the last ones it gave."""
        try:
            self._last = self._engine.call("cache_stats", timeout=STATS_TIMEOUT_S)
        except (EngineError, TimeoutError):
            pass
        return dict(self._last)

    @property
    def nbytes(self) -> int:
        return self.stats()["bytes"]


class RemoteVision:
    """The vision encoder in ``engine``'s runner; see the module docstring."""

    def __init__(self, engine: RunnerEngine):
        facts = engine.facts.vision
        if facts is None:
            raise EngineError(f"the runner of model {engine.config.model_id} has no vision encoder")
        self._engine = engine
        self.cache = RemoteCache(engine)
        # The runner's facts (the same after a restart: same files, same settings).
        self.projector: ProjectorFacts = facts.projector
        self.media_marker: str = facts.media_marker
        self.uses_mrope: bool = facts.uses_mrope
        self.uses_non_causal: bool = facts.uses_non_causal
        self.n_embd: int = facts.n_embd

    def tokenize(self, prompt: str, images: Sequence[ImageInput], *, add_special: bool = True,
                 parse_special: bool = True) -> list[Chunk]:
        """As ``VisionEncoder.tokenize``, run in the runner; raises what it raised there,
        or ``ModelCrashed`` when the runner dies meanwhile."""
        pixels = [rgb_pixels(item, i) for i, item in enumerate(images)]
        return self._engine.call("tokenize", (prompt, pixels),
                                 {"add_special": add_special, "parse_special": parse_special})

    def count_tokens(self, width: int, height: int) -> int:
        """As ``VisionEncoder.count_tokens``, run in the runner."""
        return self._engine.call("count_tokens", (width, height))

    def close(self) -> None:
        """Nothing here: the encoder goes with its runner (``RunnerEngine.close``)."""
