"""One supervised runner process per loaded model.

Why a process, as measured on a 2-core VM with SmolLM2-135M and 2 threads per model: in
one process, once a second model's engine has run once and sits idle, the first model's
decode drops from 154 to 87 tok/s (0.57x). With ``OMP_WAIT_POLICY=ACTIVE`` both
idle-other cases stay at full speed (163 -> 158 tok/s, the other 155), but both models
busy at once collapse to 33 + 33 tok/s (80 + 80 with the default policy); with
``PASSIVE`` everything runs at about 48 tok/s. Each engine's worker thread is its own
OpenMP master with its own team, so libgomp manages more threads than there are CPUs
and stops spinning at barriers (a small model crosses hundreds per token) and sleeps on
futexes instead. One process per model keeps each OpenMP runtime at threads <= CPUs,
which no wait policy achieves inside one process.

A process also bounds a native crash (a GGML_ASSERT, a segfault in a kernel): the
runner dies, its requests end with a 503 ``model_crashed`` naming the signal, the model
restarts with backoff, and the HTTP process and every other model go on.

- ``protocol``: the messages on the socket between the HTTP process and a runner.
- ``shm``: how they travel: pickled, with large numpy arrays (pixels, embeddings) in
  shared-memory blocks rather than in the socket.
- ``process``: the runner's entry (``python -m models.runner.process``), holding the
  llama.cpp ``Engine`` and, for a vision model, its ``VisionEncoder``.
- ``client``: ``RunnerEngine``, what the HTTP process holds instead of an ``Engine``: the
  same front door (submit, cancel, events to the sink, queue figures, ``preparing``),
  the model facts, and tokenizing and templating over a vocab-only llama.cpp load (the
  vocabulary and metadata only: no weights, no context, no compute threads).
- ``vision``: ``RemoteVision``, what the HTTP process holds instead of a
  ``VisionEncoder``: its facts, and tokenize / count_tokens run in the runner.
- ``supervisor``: the restart policy (backoff; failed after N crashes in M minutes).
- ``logs``: the runner's log records, re-emitted by the HTTP process's own loggers.
- ``cpu_share``: the cores split among the runners computing at the same time (each
  told its thread count), so two busy models never oversubscribe the CPU.

A vision model's encoder runs in its runner as well (libmtmd needs the text model's
weights beside it), so an image that crashes the encoder ends only that model's requests.
"""

from models.runner.client import RunnerEngine
from models.runner.supervisor import RestartPolicy

__all__ = ["RestartPolicy", "RunnerEngine"]
