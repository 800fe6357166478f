"""Quantize a GGUF model to other types with llama.cpp's own quantizer.

Outputs are written under a temporary name and renamed into place only when complete, so
a model directory the server scans never holds a half-written file under a final name.
Quantizing an already-quantized file (the shipped default is Q4_1) is a *requantization*:
its errors add to the source's, so every figure made from such variants must say so.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp

from models.gguf_info import FTYPE_NAMES
from models.llama_lib import ensure_backend, load_vocab, meta_str

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
_UNQUANTIZED = {"F32", "F16", "BF16"}


# Types llama.cpp cannot make well without an importance matrix (refused unless forced),
# and types that lose noticeably without one (a warning).
NEEDS_IMATRIX = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"})
BETTER_WITH_IMATRIX = frozenset({"Q2_K", "Q2_K_S", "Q3_K_S", "IQ3_XXS"})


IMATRIX_FILE_KEY = "quantize.imatrix.file"


class QuantizeError(ValueError):
    """An unknown type, an unreadable source, or llama.cpp refusing the conversion."""


def parse_types(spec: str | Sequence[str]) -> list[str]:
    """``"q8_0,Q4_K_M"`` -> ``["Q8_0", "Q4_K_M"]``; an unknown name raises before any work."""
    names = [t.strip().upper() for t in (spec.split(",") if isinstance(spec, str) else spec) if t.strip()]
    unknown = [n for n in names if n not in QUANT_TYPES]
    if unknown or not names:
        raise QuantizeError(f"unknown quantization type(s) {', '.join(unknown) or '(none given)'}; "
                            f"known: {', '.join(QUANT_TYPES)}")
    return names


def source_type(src: str | os.PathLike[str]) -> str:
    """The file type of a GGUF model, e.g. ``Q4_1``, read by llama.cpp from its header and
    vocabulary only; raises :class:`QuantizeError` for a missing or unreadable file."""
    if not Path(src).is_file():
        raise QuantizeError(f"{src}: no such file")
    readable, declared = _header_value(src, "general.file_type")  # a vocab-only load leaves the ftype unset
    if not readable:
        raise QuantizeError(f"{src}: not a GGUF model llama.cpp can read")
    if declared is None or not declared.isdigit():
        return "unknown"
    ftype = int(declared) & ~1024
    return FTYPE_NAMES.get(ftype, f"ftype_{ftype}")


def imatrix_of(path: str | os.PathLike[str]) -> str | None:
    """The importance matrix a variant was quantized with (``quantize.imatrix.file``, as
    llama.cpp's own quantize tool records it), or None."""
    return _header_value(path, IMATRIX_FILE_KEY)[1]


def _header_value(path: str | os.PathLike[str], key: str) -> tuple[bool, str | None]:
    """(whether llama.cpp could read the file, one metadata value), from a vocab-only load."""
    model = load_vocab(str(path))
    if model is None:
        return False, None
    try:
        return True, meta_str(model, key)
    finally:
        llama_cpp.llama_model_free(model)


def _imatrix_overrides(imatrix: "Imatrix") -> ctypes.Array:
    """The keys llama.cpp's quantize tool writes when it uses a matrix, so either tool's
    output says which matrix shaped it."""
    values: list[tuple[str, int, object]] = [
        (IMATRIX_FILE_KEY, llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, imatrix.source or "unnamed"),
        ("quantize.imatrix.dataset", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR,  # llama.cpp: the first one
         imatrix.datasets[0] if imatrix.datasets else "unknown"),
        ("quantize.imatrix.entries_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, len(imatrix.entries)),
        ("quantize.imatrix.chunks_count", llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, imatrix.chunk_count),
    ]
    arr = (llama_cpp.llama_model_kv_override * (len(values) + 1))()  # zeroed: the last one ends it
    for o, (key, tag, value) in zip(arr, values):
        o.key = key.encode()
        o.tag = tag
        if tag == llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR:
            o.value.val_str = str(value).encode()[:127]
        else:
            o.value.val_i64 = int(value)  # type: ignore[arg-type]
    return arr


def is_requantization(src_type: str) -> bool:
    """True when the source is already quantized: its variants carry its error too."""
    return src_type not in _UNQUANTIZED


def output_name(src: str | os.PathLike[str], type_name: str) -> str:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` + ``Q8_0`` -> ``SmolLM2-135M-Instruct.Q8_0.gguf``."""
    stem = Path(src).stem
    base = re.sub(r"[.\-_](?:I?Q\d\w*|F16|BF16|F32)$", "", stem, flags=re.IGNORECASE) or stem
    return f"{base}.{type_name}.gguf"


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], type_name: str,
             *, threads: int = 0, imatrix: "Imatrix | None" = None, force: bool = False) -> Path:
    """Write ``src`` quantized to ``type_name`` at ``dst`` (atomically); returns ``dst``.

    With ``imatrix`` (see :mod:`models.imatrix`) the quantizer spends precision on the
    input columns the calibration activations lean on; a matrix made for another model
    is refused. Types that are unusable without a matrix are refused unless ``force``.
    """
    name = parse_types([type_name])[0]
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
        overrides = _imatrix_overrides(imatrix)
        keep.append(overrides)
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
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


def quantize_all(src: str | os.PathLike[str], types: Sequence[str], out_dir: str | os.PathLike[str], *,
                 threads: int = 0, progress: Callable[[str], None] | None = None,
                 imatrix: "Imatrix | None" = None, force: bool = False) -> list[Path]:
    """Quantize ``src`` to every type into ``out_dir`` (as ``<base>.<TYPE>.gguf``, the names
    ``serve --models-dir`` scans); checks every type, the source and the matrix before
    writing anything."""
    names = parse_types(types)
    source_type(src)  # unreadable -> QuantizeError before any output exists
    missing = [n for n in names if n in NEEDS_IMATRIX] if imatrix is None and not force else []
    if missing:
        raise QuantizeError(f"{', '.join(missing)} unusable without an importance matrix: run "
                            "`edgevlm calibrate` and pass --imatrix (or --force)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names:
        # a matrix that does not fit is refused by the first call, before anything is written
        written.append(quantize(src, out / output_name(src, name), name, threads=threads,
                                imatrix=imatrix, force=force))
        if progress is not None:
            progress(name)
    return written
