"""Quantize a GGUF model to another type with llama.cpp's own quantizer.

Outputs are written under a temporary name and renamed into place only when complete, so
a model directory the server scans never holds a half-written file under a final name.
"""

from __future__ import annotations

import os
from pathlib import Path

import llama_cpp

from models.llama_lib import ensure_backend

# The types users ask for by name, and llama.cpp's file-type constants for them.
QUANT_TYPES: dict[str, int] = {
    name: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    for name in ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
                 "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q3_K_L", "Q2_K")
    if hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
}


class QuantizeError(ValueError):
    """An unknown type, an unreadable source, or llama.cpp refusing the conversion."""


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], type_name: str,
             *, threads: int = 0) -> Path:
    """Write ``src`` quantized to ``type_name`` at ``dst`` (atomically); returns ``dst``."""
    name = type_name.upper()
    if name not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {type_name!r}; known: {', '.join(QUANT_TYPES)}")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise QuantizeError(f"{src}: no such file")
    ensure_backend()  # also routes llama.cpp's per-tensor progress lines away from stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[name]
    params.allow_requantize = True  # the shipped default is already Q4_1
    params.nthread = threads
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src} to {name} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
