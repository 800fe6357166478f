"""``edgevlm models info FILE``: what a GGUF file holds.

A model is read by llama.cpp itself (weights mmapped, no context), so effective BPW
comes from :func:`models.gguf_info.bits_per_weight`, the function every request's
telemetry uses: the inspector and the traces never disagree. A projector (mmproj),
which llama.cpp does not load as a model, is read from its header.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import llama_cpp

from models.gguf_info import FTYPE_NAMES, bits_per_weight, quantization_name
from models.llama_lib import ensure_backend, meta_str


class InspectError(ValueError):
    """The file is missing or not a GGUF file."""


@dataclass
class GgufSummary:
    path: str
    architecture: str
    file_bytes: int
    parameters: int
    tensor_types: dict[str, int]  # type name -> number of tensors
    file_type: str | None
    bits_per_weight: float | None
    context_length: int | None = None
    chat_template: bool = False
    projector_type: str | None = None
    image_size: int | None = None
    name: str | None = None

    @property
    def is_projector(self) -> bool:
        return self.architecture == "clip"

    def lines(self) -> list[str]:
        """The report ``models info`` prints, one fact per line."""
        hist = ", ".join(f"{t}: {n}" for t, n in sorted(self.tensor_types.items(), key=lambda kv: (-kv[1], kv[0])))
        out = [f"file:            {self.path}",
               f"architecture:    {self.architecture}" + (f" ({self.name})" if self.name else ""),
               f"file size:       {self.file_bytes} bytes ({self.file_bytes / 2**20:.1f} MiB)",
               f"parameters:      {self.parameters} ({self.parameters / 1e6:.1f} M)",
               f"file type:       {self.file_type or 'not declared'}",
               f"tensor types:    {hist}",
               f"effective BPW:   {self.bits_per_weight:.3f} (tensor bytes x 8 / parameters)"
               if self.bits_per_weight is not None else "effective BPW:   unknown"]
        if self.is_projector:
            out += [f"projector type:  {self.projector_type or 'unknown'}",
                    f"image size:      {self.image_size or 'unknown'} px"]
        else:
            out += [f"context length:  {self.context_length or 'unknown'}",
                    f"chat template:   {'present' if self.chat_template else 'absent'}"]
        return out


def _model(path: str) -> GgufSummary | None:
    """A model llama.cpp can load, or None (a projector, or not a GGUF model at all)."""
    from models.ggml import ggml

    ensure_backend()
    from models.cpu_paths import load_model

    model = load_model(path, ())  # inspection only: no weight repacking, no fast path to trust
    if not model:
        return None
    try:
        arch = meta_str(model, "general.architecture") or "unknown"
        ctx = meta_str(model, f"{arch}.context_length")
        return GgufSummary(
            path=path, architecture=arch, file_bytes=os.path.getsize(path),
            parameters=int(llama_cpp.llama_model_n_params(model)),
            tensor_types={k.upper(): n for k, n in ggml().tensor_types(path).items()},
            file_type=quantization_name(model), bits_per_weight=bits_per_weight(model),
            context_length=int(ctx) if ctx and ctx.isdigit() else None,
            chat_template=bool(llama_cpp.llama_model_chat_template(model, None)),
            name=meta_str(model, "general.name"))
    finally:
        llama_cpp.llama_model_free(model)


def _projector(path: str) -> GgufSummary:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure means "not a GGUF file"
        raise InspectError(f"{path}: not a readable GGUF file ({exc})") from exc

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = str(field("general.architecture") or "unknown")
    if arch != "clip":
        raise InspectError(f"{path}: llama.cpp cannot load this {arch} model")
    types: Counter[str] = Counter(t.tensor_type.name for t in reader.tensors)
    params = sum(int(t.n_elements) for t in reader.tensors)
    nbytes = sum(int(t.n_bytes) for t in reader.tensors)
    ftype = field("general.file_type")
    size = field("clip.vision.image_size")
    return GgufSummary(
        path=path, architecture=arch, file_bytes=os.path.getsize(path), parameters=params,
        tensor_types=dict(types), file_type=FTYPE_NAMES.get(int(ftype)) if ftype is not None else None,
        # the same definition as models.gguf_info.bits_per_weight, from the header
        bits_per_weight=round(nbytes * 8.0 / params, 3) if params else None,
        projector_type=field("clip.projector_type"), image_size=int(size) if size is not None else None,
        name=field("general.name"))


def inspect(path: str | os.PathLike[str]) -> GgufSummary:
    """Summarise ``path``; raises :class:`InspectError` when it is not a readable GGUF."""
    path = str(path)
    if not os.path.isfile(path):
        raise InspectError(f"{path}: no such file")
    return _model(path) or _projector(path)
