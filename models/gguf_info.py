"""Facts about a GGUF model file that explain its speed and memory.

The On-device LLMs study found system metrics track effective bits per weight almost
linearly, so every trace carries the quantization type and BPW of the file it ran.
"""

from __future__ import annotations

import os

import llama_cpp

# llama_ftype values (llama.h) for the types users actually ship.
FTYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE",
}


def quantization_name(model: llama_cpp.llama_model_p) -> str:
    ftype = int(llama_cpp.llama_model_ftype(model)) & ~1024  # drop the "guessed" flag
    return FTYPE_NAMES.get(ftype, f"ftype_{ftype}")


def bits_per_weight(model: llama_cpp.llama_model_p) -> float | None:
    """Effective BPW: tensor bytes x 8 / parameters (embeddings and norms included)."""
    n_params = int(llama_cpp.llama_model_n_params(model))
    size = int(llama_cpp.llama_model_size(model))
    if n_params <= 0:
        return None
    return round(size * 8.0 / n_params, 3)


def file_bytes(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
