"""Quantize a GGUF model to another type with llama.cpp's own quantizer.

Outputs are written under a temporary name and renamed into place only when complete, so
a model directory the server scans never holds a half-written file under a final name.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp

from models.llama_lib import ensure_backend

if TYPE_CHECKING:
    from models.imatrix import Imatrix

# The types users ask for by name, and llama.cpp's file-type constants for them.
QUANT_TYPES: dict[str, int] = {
    name: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    for name in ("F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q5_1", "Q4_K_M", "Q4_K_S",
                 "Q4_0", "Q4_1", "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q3_K_S", "Q3_K_L", "IQ3_XXS", "IQ3_S",
                 "Q2_K", "Q2_K_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")
    if hasattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
}


# Types llama.cpp cannot make well without an importance matrix (refused unless forced),
# and types that lose noticeably without one (a warning).
NEEDS_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"})
BETTER_WITH_IMATRIX = frozenset({"Q2_K", "Q2_K_S", "Q3_K_S", "IQ3_XXS"})


class QuantizeError(ValueError):
    """An unknown type, an unreadable source, or llama.cpp refusing the conversion."""


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], type_name: str,
             *, threads: int = 0, imatrix: "Imatrix | None" = None, force: bool = False) -> Path:
    """Write ``src`` quantized to ``type_name`` at ``dst`` (atomically); returns ``dst``.

    With ``imatrix`` (see :mod:`models.imatrix`) the quantizer spends precision on the
    input columns the calibration activations lean on; a matrix made for another model
    is refused. Types that are unusable without a matrix are refused unless ``force``.
    """
    name = type_name.upper()
    if name not in QUANT_TYPES:
        raise QuantizeError(f"unknown quantization type {type_name!r}; known: {', '.join(QUANT_TYPES)}")
    if name in NEEDS_IMATRIX and imatrix is None and not force:
        raise QuantizeError(f"{name} is unusable without an importance matrix: run `edgevlm calibrate` "
                            "and pass --imatrix (or force it)")
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise QuantizeError(f"{src}: no such file")
    keep: list[object] = []
    if imatrix is not None:
        from models.imatrix import ImatrixError, check_fits, quantize_params_data

        try:
            check_fits(imatrix, str(src), check_hash=not force)
        except ImatrixError as exc:
            raise QuantizeError(str(exc)) from None
        items, keep = quantize_params_data(imatrix)
    ensure_backend()  # also routes llama.cpp's per-tensor progress lines away from stderr
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[name]
    params.allow_requantize = True  # the shipped default is already Q4_1
    params.nthread = threads
    if imatrix is not None:
        params.imatrix = ctypes.cast(items, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    tmp = dst.with_name(f".{dst.name}.partial")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src} to {name} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
        del keep  # the matrix buffers lived until llama.cpp was done with them
    return dst
