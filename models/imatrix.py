"""Importance matrices: which input columns of each weight matrix the activations lean on.

This is llama.cpp's practical form of activation-aware quantization (the idea behind
AWQ): run the model over calibration text, and for every matrix multiplication with a
model weight accumulate the sum of squared input activations per input column. The
quantizer then spends precision on the columns with large activations. Calibrating on
the device's own text (its manuals, work orders, operators' questions) protects what
that device actually computes.

The statistics are gathered through llama.cpp's eval callback (``cb_eval``) and written
in llama.cpp's own imatrix GGUF format (``<weight>.in_sum2`` and ``<weight>.counts`` as
F32 tensors, ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``), so
a file made here works with ``llama-quantize --imatrix`` and the other way round.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import llama_cpp
import numpy as np

from models import cpu_paths
from models.engine import default_threads
from models.ggml import EvalCallback, GgmlTensor, ggml, tensor_at
from models.llama_lib import OneSequence, meta_str, tokenize

MODEL_HASH_KEY = "edgevlm.imatrix.model_sha256"


class ImatrixError(ValueError):
    """Calibration or a matrix that cannot be used (MoE model, wrong model, bad file)."""


@dataclass
class Entry:
    """One weight's statistics: ``sums`` is (n_mat, n_cols), ``counts`` is (n_mat,)."""

    sums: np.ndarray
    counts: np.ndarray

    def mean_squares(self) -> np.ndarray:
        """What the quantizer takes: sum / count per matrix (1 where nothing was seen)."""
        out = np.ones_like(self.sums, dtype=np.float32)
        seen = self.counts > 0
        out[seen] = (self.sums[seen] / self.counts[seen, None]).astype(np.float32)
        return out.reshape(-1)


@dataclass
class Imatrix:
    entries: dict[str, Entry] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    model_sha256: str | None = None
    tokens: int = 0  # tokens evaluated (not stored in the file)
    source: str | None = None  # the file it was read from (its name goes into quantized outputs)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The file's sha256, computed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    return _sha256(os.path.realpath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, _size: int, _mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weight_name(raw: bytes) -> str:
    """llama.cpp's filter_tensor_name: ``a#name#b`` -> ``name``."""
    name = raw.decode(errors="replace")
    if "#" in name:
        name = name.split("#")[1]
    return name


class _Collector:
    """The eval callback: asks for MUL_MAT nodes on ``blk.*`` weights, accumulates their inputs."""

    def __init__(self) -> None:
        self.g = ggml()
        self.entries: dict[str, Entry] = {}
        self.error: str | None = None
        self._ops: dict[int, str] = {}
        self.callback = EvalCallback(self._on_node)

    def _op(self, op: int) -> str:
        name = self._ops.get(op)
        if name is None:
            name = self._ops[op] = self.g.op_name(op)
        return name

    def _on_node(self, address: int, ask: bool, _user: ctypes.c_void_p) -> bool:
        try:
            t = tensor_at(address).contents
            op = self._op(t.op)
            if op not in ("MUL_MAT", "MUL_MAT_ID"):
                return False if ask else True
            src0 = t.src[0].contents
            wname = _weight_name(src0.name)
            if not wname.startswith("blk."):
                return False if ask else True
            if op == "MUL_MAT_ID":
                self.error = "mixture-of-experts models (MUL_MAT_ID) are not supported by calibrate"
                return False
            if ask:
                return True
            self._accumulate(wname, src0, t.src[1])
            return True
        except Exception as exc:  # never let an exception cross into C
            self.error = f"{type(exc).__name__}: {exc}"
            return False

    def _accumulate(self, wname: str, src0: GgmlTensor, src1_ptr: ctypes._Pointer) -> None:
        src1 = src1_ptr.contents
        if src1.type != 0:  # GGML_TYPE_F32
            raise ImatrixError(f"{wname}: activations of type {src1.type}, expected F32")
        raw = self.g.read_f32(src1_ptr)
        ne = list(src1.ne)
        nb = list(src1.nb)
        x = np.lib.stride_tricks.as_strided(np.frombuffer(raw, dtype=np.float32),
                                            shape=(ne[3], ne[2], ne[1], ne[0]),
                                            strides=(nb[3], nb[2], nb[1], nb[0]))
        n_mat2, n_mat3 = src0.ne[2], src0.ne[3]
        n_mat = n_mat2 * n_mat3
        e = self.entries.get(wname)
        if e is None:
            e = self.entries[wname] = Entry(np.zeros((n_mat, ne[0]), dtype=np.float64),
                                            np.zeros(n_mat, dtype=np.float64))
        sq = np.square(x, dtype=np.float64).sum(axis=2)  # (ne3, ne2, ne0): summed over rows
        for i3 in range(ne[3]):
            for i2 in range(ne[2]):
                e.sums[(i3 % n_mat3) * n_mat2 + (i2 % n_mat2)] += sq[i3, i2]
        e.counts += (ne[1] * ne[2] * ne[3]) / n_mat
        if not np.isfinite(e.sums).all():
            raise ImatrixError(f"non-finite activations in {wname}")


def calibrate(model_path: str, texts: Iterable[str], *, n_ctx: int = 512, chunks: int | None = None,
              threads: int = 0, datasets: list[str] | None = None,
              progress: Callable[[int, int], None] | None = None) -> Imatrix:
    """Evaluate ``texts`` in chunks of ``n_ctx`` tokens and gather the importance matrix."""
    verdict = cpu_paths.choose(model_path, "auto", threads or default_threads())
    model = cpu_paths.load_model(model_path, verdict.allowed)
    if not model:
        raise ImatrixError(f"could not load model file {model_path}")
    try:
        arch = meta_str(model, "general.architecture") or ""
        experts = meta_str(model, f"{arch}.expert_count")
        if experts and int(experts) > 1:
            raise ImatrixError(f"{model_path} is a mixture-of-experts model ({experts} experts); "
                               "calibrate supports dense models only")
        vocab = llama_cpp.llama_model_get_vocab(model)
        add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        tokens = [t for text in texts for t in tokenize(vocab, text)]
        body = n_ctx - 1 if add_bos else n_ctx
        n_chunks = len(tokens) // body
        if chunks is not None:
            n_chunks = min(n_chunks, chunks)
        if n_chunks < 1:
            raise ImatrixError(f"calibration text has {len(tokens)} tokens, fewer than one chunk of {n_ctx}")
        collector = _Collector()
        try:
            seq = OneSequence(model, n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads or default_threads(),
                              cb_eval=collector.callback)
        except RuntimeError as exc:
            raise ImatrixError(str(exc)) from None
        with seq:
            bos = int(llama_cpp.llama_vocab_bos(vocab))
            for c in range(n_chunks):
                chunk = ([bos] if add_bos else []) + tokens[c * body:(c + 1) * body]
                seq.clear()
                rc = seq.decode(chunk, 0)  # every row: else the last layer computes the final row only
                if collector.error:
                    raise ImatrixError(collector.error)
                if rc != 0:
                    raise ImatrixError(f"llama_decode failed on chunk {c} ({rc})")
                if progress:
                    progress(c + 1, n_chunks)
    finally:
        llama_cpp.llama_model_free(model)
    return Imatrix(entries=collector.entries, datasets=list(datasets or []), chunk_count=n_chunks,
                   chunk_size=n_ctx, model_sha256=file_sha256(model_path), tokens=n_chunks * n_ctx)


# --------------------------------------------------------------------------- file format
def write(imatrix: Imatrix, path: str | os.PathLike[str]) -> Path:
    """Write llama.cpp's imatrix GGUF (atomically)."""
    from gguf import GGUFWriter

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    w = GGUFWriter(str(tmp), arch="imatrix")
    # GGUFWriter always writes general.architecture; llama.cpp's reader ignores it.
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", imatrix.datasets or ["unknown"])
    w.add_uint32("imatrix.chunk_count", imatrix.chunk_count)
    w.add_uint32("imatrix.chunk_size", imatrix.chunk_size)
    if imatrix.model_sha256:
        w.add_string(MODEL_HASH_KEY, imatrix.model_sha256)
    for name in sorted(imatrix.entries):
        e = imatrix.entries[name]
        w.add_tensor(f"{name}.in_sum2", e.sums.astype(np.float32))  # ggml ne = [n_cols, n_mat]
        w.add_tensor(f"{name}.counts", e.counts.astype(np.float32).reshape(-1, 1))  # ne = [1, n_mat]
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read(path: str | os.PathLike[str]) -> Imatrix:
    """Read an imatrix GGUF written here or by ``llama-imatrix``."""
    from gguf import GGUFReader

    try:
        r = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ImatrixError(f"cannot read importance matrix {path}: {exc}") from None

    def field_value(key: str) -> object:
        f = r.fields.get(key)
        return None if f is None else f.contents()

    if field_value("general.type") != "imatrix":
        raise ImatrixError(f"{path} is not an imatrix GGUF (general.type is {field_value('general.type')!r})")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in r.tensors:
        data = np.asarray(t.data, dtype=np.float32)
        if t.name.endswith(".in_sum2"):
            sums[t.name[:-len(".in_sum2")]] = data.reshape(-1, int(t.shape[0])).astype(np.float64)
        elif t.name.endswith(".counts"):
            counts[t.name[:-len(".counts")]] = data.reshape(-1).astype(np.float64)
    if set(sums) != set(counts):
        raise ImatrixError(f"{path}: in_sum2 and counts tensors do not pair up")
    datasets = field_value("imatrix.datasets") or []
    return Imatrix(entries={k: Entry(sums[k], counts[k]) for k in sums},
                   datasets=list(datasets) if isinstance(datasets, list) else [str(datasets)],
                   chunk_count=int(field_value("imatrix.chunk_count") or 0),
                   chunk_size=int(field_value("imatrix.chunk_size") or 0),
                   model_sha256=field_value(MODEL_HASH_KEY),  # type: ignore[arg-type]
                   source=Path(path).name)


def check_fits(imatrix: Imatrix, model_path: str, *, check_hash: bool = True) -> None:
    """Refuse a matrix made for another model: hash (when recorded) and tensor names/widths."""
    from gguf import GGUFReader

    if check_hash and imatrix.model_sha256 and imatrix.model_sha256 != file_sha256(model_path):
        raise ImatrixError(f"the importance matrix was made from another model file "
                           f"(sha256 {imatrix.model_sha256[:12]}..., {model_path} is "
                           f"{file_sha256(model_path)[:12]}...)")
    widths = {t.name: int(t.shape[0]) for t in GGUFReader(model_path).tensors}
    for name, e in imatrix.entries.items():
        if name not in widths:
            raise ImatrixError(f"the importance matrix has {name}, which {model_path} does not")
        if e.sums.shape[1] != widths[name]:
            raise ImatrixError(f"{name}: the importance matrix has {e.sums.shape[1]} columns, "
                               f"the model {widths[name]}")


def quantize_params_data(imatrix: Imatrix) -> tuple[ctypes.Array, list[object]]:
    """The NULL-terminated ``llama_model_imatrix_data`` array for ``llama_model_quantize_params``,
    and the buffers that must stay alive while the quantizer runs."""
    keep: list[object] = []
    items = (llama_cpp.llama_model_imatrix_data * (len(imatrix.entries) + 1))()
    for i, (name, e) in enumerate(sorted(imatrix.entries.items())):
        values = np.ascontiguousarray(e.mean_squares(), dtype=np.float32)
        cname = ctypes.create_string_buffer(name.encode())
        keep += [values, cname]
        items[i].name = ctypes.cast(cname, ctypes.c_char_p)
        items[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        items[i].size = values.size
    keep.append(items)
    return items, keep


def texts_from_traces(paths: Iterable[str]) -> tuple[list[str], int]:
    """Prompt texts recorded in trace files (only present under ``--capture-content``), and
    how many requests they came from. The texts are the rendered prompts the model saw."""
    import json

    from telemetry.report import load_spans, request_rows

    spans, _bad = load_spans(paths)
    texts = []
    for row in request_rows(spans):
        raw = row.attrs.get("gen_ai.input.messages")
        if not raw:
            continue
        try:
            messages = json.loads(raw)
        except ValueError:
            continue
        for m in messages:
            for part in m.get("parts", []):
                if part.get("type") == "text" and part.get("content"):
                    texts.append(part["content"])
    return texts, len(texts)
