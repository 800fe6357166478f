"""Process-wide llama.cpp set-up shared by every engine.

llama.cpp needs one backend initialisation per process and routes its (very chatty)
log output through a single C callback; both belong in one place.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import llama_cpp

log = logging.getLogger("edgevlm.llama")

_init_lock = threading.Lock()
_initialised = False


@llama_cpp.llama_log_callback
def _log_callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    # llama.cpp's INFO/DEBUG output is noise for a server; keep warnings and errors.
    if level in (3, 4) and text:  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
        msg = text.decode("utf-8", errors="replace").rstrip()
        if msg:
            log.log(logging.WARNING if level == 3 else logging.ERROR, msg)


def ensure_backend() -> None:
    """Initialise the llama.cpp backend once and silence its info logging."""
    global _initialised
    with _init_lock:
        if _initialised:
            return
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        _initialised = True


def meta_str(model: llama_cpp.llama_model_p, key: str) -> str | None:
    """Read one string metadata value from a loaded model (None when absent)."""
    size = 1 << 12
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1
