"""The few libggml structs and functions edgevlm needs that llama-cpp-python does not bind.

Kept small and in one place, because every line here must match the pinned llama.cpp
build (llama-cpp-python 0.3.36): the CPU device's extra buffer list (fast paths), the
GGUF header reader (tensor types), and the tensor struct an eval callback receives
(importance matrices). ``tests/test_ggml_binding.py`` checks the struct layout against
the library by reading tensors whose names and shapes are known.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import llama_cpp

from models.llama_lib import ensure_backend

GGML_MAX_DIMS = 4
GGML_MAX_OP_PARAMS = 64
GGML_MAX_SRC = 10
GGML_MAX_NAME = 64


class GgmlTensor(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h)."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

# bool (*ggml_backend_sched_eval_callback)(struct ggml_tensor * t, bool ask, void * user_data), as the
# binding declares it (the tensor as an address): cast with ``tensor_at``.
EvalCallback = llama_cpp.ggml_backend_sched_eval_callback


def tensor_at(address: int) -> "ctypes._Pointer[GgmlTensor]":
    return ctypes.cast(address, ctypes.POINTER(GgmlTensor))


class GgufInitParams(ctypes.Structure):
    """``struct gguf_init_params``."""

    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


class Ggml:
    """libggml and libggml-base from llama-cpp-python's own lib directory, with prototypes."""

    def __init__(self) -> None:
        libdir = Path(llama_cpp.__file__).parent / "lib"
        names = {"ggml": ("libggml.so", "libggml.dylib", "ggml.dll"),
                 "base": ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll")}
        libs = {}
        for key, candidates in names.items():
            for name in candidates:
                if (libdir / name).exists():
                    libs[key] = ctypes.CDLL(str(libdir / name))
                    break
            else:
                raise OSError(f"{candidates[0]} not found in {libdir}")
        g, b = libs["ggml"], libs["base"]
        vp, tp = ctypes.c_void_p, ctypes.POINTER(GgmlTensor)
        for lib, fn, res, args in (
            (g, "ggml_backend_dev_by_type", vp, [ctypes.c_int]),
            (b, "ggml_backend_dev_backend_reg", vp, [vp]),
            (b, "ggml_backend_reg_get_proc_address", vp, [vp, ctypes.c_char_p]),
            (b, "ggml_backend_buft_name", ctypes.c_char_p, [vp]),
            (b, "gguf_init_from_file", vp, [ctypes.c_char_p, GgufInitParams]),
            (b, "gguf_get_n_tensors", ctypes.c_int64, [vp]),
            (b, "gguf_get_tensor_type", ctypes.c_int, [vp, ctypes.c_int64]),
            (b, "gguf_free", None, [vp]),
            (b, "ggml_type_name", ctypes.c_char_p, [ctypes.c_int]),
            (b, "ggml_op_name", ctypes.c_char_p, [ctypes.c_int]),
            (b, "ggml_nbytes", ctypes.c_size_t, [tp]),
            (b, "ggml_backend_tensor_get", None, [tp, vp, ctypes.c_size_t, ctypes.c_size_t]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
        self.lib, self.base = g, b
        ensure_backend()

    def cpu_extra_buffers(self) -> ctypes.Array | None:
        """The CPU device's NULL-terminated extra buffer list that model loads read (mutable)."""
        b = self.base
        dev = self.lib.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
        if not dev:
            return None
        fn_addr = b.ggml_backend_reg_get_proc_address(b.ggml_backend_dev_backend_reg(dev),
                                                      b"ggml_backend_dev_get_extra_bufts")
        if not fn_addr:
            return None
        arr = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn_addr)(dev)
        if not arr:
            return None
        n = 0
        while arr[n]:
            n += 1
        return ctypes.cast(arr, ctypes.POINTER(ctypes.c_void_p * (n + 1))).contents

    def buffer_type_name(self, buft: int) -> str:
        return self.base.ggml_backend_buft_name(buft).decode()

    def tensor_types(self, path: str) -> dict[str, int]:
        """How many tensors of each type a GGUF file holds (header only, no tensor data).

        llama.cpp's reader takes milliseconds where the Python ``gguf`` reader takes
        seconds on a tokenizer of 50k strings.
        """
        b = self.base
        ctx = b.gguf_init_from_file(path.encode(), GgufInitParams(True, None))
        if not ctx:
            raise ValueError(f"{path} is not a readable GGUF file")
        try:
            counts: dict[str, int] = {}
            for i in range(b.gguf_get_n_tensors(ctx)):
                name = b.ggml_type_name(b.gguf_get_tensor_type(ctx, i)).decode()
                counts[name] = counts.get(name, 0) + 1
            return dict(sorted(counts.items()))
        finally:
            b.gguf_free(ctx)

    def op_name(self, op: int) -> str:
        return self.base.ggml_op_name(op).decode()

    def read_f32(self, t: ctypes._Pointer) -> bytes:
        """A tensor's raw bytes, wherever its buffer lives (host or device)."""
        n = self.base.ggml_nbytes(t)
        buf = ctypes.create_string_buffer(n)
        self.base.ggml_backend_tensor_get(t, buf, 0, n)
        return buf.raw


@functools.cache
def ggml() -> Ggml:
    """The process's one binding (loading the libraries once)."""
    return Ggml()
