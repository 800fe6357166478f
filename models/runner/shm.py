"""Messages on a runner socket whose large numpy arrays cross through shared memory.

An image's pixels (a 4 MP RGB image is 12 MB) and its projector output (thousands of
rows of thousands of floats) would otherwise be pickled into the socket: copied into
the pickle, pushed through the kernel in socket-buffer-sized pieces, and copied out
again. Here each array of at least ``THRESHOLD`` bytes is written to a file in a tmpfs
(``/dev/shm``; the temp directory where there is none, e.g. macOS) and the pickle holds
only its name, shape and dtype; the receiver copies the array out and removes the file
at once. Small arrays and everything else stay in the pickle.

Why files and not ``multiprocessing.shared_memory``: on Python 3.11 every
``SharedMemory`` registers its name with the ``resource_tracker`` on create *and* on
attach, which starts a tracker process and warns about "leaked" blocks the other
process already removed. A file needs no tracker, and its name says who made it.

A block is named ``edgevlm-<creator pid>-<tag>-<n>``. When a receiver dies before it
reads a message, nobody would remove the blocks in flight: ``remove_blocks`` deletes
by name (what a dead runner made: its pid; what was sent to it: the sender's pid and
the channel's tag), which the runner client calls when a runner dies and a runner calls
when its server goes away.
"""

from __future__ import annotations

import io
import itertools
import os
import pickle
import tempfile
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["THRESHOLD", "Channel", "SHM_DIR", "remove_blocks"]

THRESHOLD = 64 << 10  # bytes; below this a pickle copy costs less than a file
SHM_DIR = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
PREFIX = "edgevlm-"

_counter = itertools.count()  # next() on it is atomic under the GIL


def _attach(name: str, shape: tuple[int, ...], dtype: str, writeable: bool) -> np.ndarray:
    """Unpickling side: copy a block's array out and remove the block."""
    path = SHM_DIR / name
    try:
        arr = np.fromfile(path, dtype=np.dtype(dtype)).reshape(shape)
    finally:
        path.unlink(missing_ok=True)
    arr.flags.writeable = writeable  # a read-only (cached) array stays read-only
    return arr


class _Pickler(pickle.Pickler):
    """Pickles large plain ndarrays as references to blocks it writes; ``blocks`` lists them."""

    def __init__(self, file: io.BytesIO, tag: str):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tag = tag
        self.blocks: list[Path] = []

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is not np.ndarray or obj.nbytes < THRESHOLD or obj.dtype.hasobject:
            return NotImplemented
        path = SHM_DIR / f"{PREFIX}{os.getpid()}-{self.tag}-{next(_counter)}"
        self.blocks.append(path)
        obj.tofile(path)  # C order whatever the array's layout
        return _attach, (path.name, obj.shape, obj.dtype.str, bool(obj.flags.writeable))


class Channel:
    """One end of a runner socket: ``send``/``recv`` whole messages, thread-safe to send.

    ``tag`` goes into the names of the blocks this end creates, so that the blocks sent
    over one channel can be told from another's (``remove_blocks``).
    """

    def __init__(self, conn: Connection, tag: str):
        self.conn = conn
        self.tag = tag
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        """Pickle ``message`` (large arrays to blocks) and send it; no block outlives a failed send."""
        buf = io.BytesIO()
        pickler = _Pickler(buf, self.tag)
        try:
            pickler.dump(message)
            with self._lock:
                self.conn.send_bytes(buf.getbuffer())
        except BaseException:
            for path in pickler.blocks:
                path.unlink(missing_ok=True)
            raise

    def recv(self) -> Any:
        """The next message, its arrays copied out of their blocks (which are removed)."""
        return pickle.loads(self.conn.recv_bytes())

    def close(self) -> None:
        self.conn.close()


def remove_blocks(pid: int, tag: str | None = None) -> int:
    """Remove the blocks process ``pid`` made (only those of channel ``tag`` when given).

    For blocks whose receiver died before reading them; returns how many were removed.
    """
    pattern = f"{PREFIX}{pid}-{tag}-*" if tag is not None else f"{PREFIX}{pid}-*"
    removed = 0
    for path in SHM_DIR.glob(pattern):
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
