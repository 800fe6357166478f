"""The ctypes ``struct ggml_tensor`` matches the pinned library: read known tensors through it."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
from gguf import GGUFReader

from models import cpu_paths
from models.ggml import EvalCallback, ggml, tensor_at
from models.llama_lib import OneSequence


def test_eval_callback_sees_weights_with_their_gguf_names_shapes_and_types(tiny_llm: Path) -> None:
    gguf_tensors = {t.name: t for t in GGUFReader(str(tiny_llm)).tensors}
    g = ggml()
    seen: list[tuple[str, list[int], int, list[int], int]] = []

    def on_node(address: int, ask: bool, _user: object) -> bool:
        t = tensor_at(address).contents
        if g.op_name(t.op) != "MUL_MAT":
            return False if ask else True
        if ask:
            return True
        w, x = t.src[0].contents, t.src[1].contents
        data = g.read_f32(t.src[1])
        seen.append((w.name.decode(), list(w.ne), w.type, list(x.ne), len(data)))
        return True

    callback = EvalCallback(on_node)
    model = cpu_paths.load_model(str(tiny_llm), ())
    try:
        with OneSequence(model, n_ctx=64, n_batch=16, n_threads=2, cb_eval=callback) as seq:
            assert seq.decode([100 + i for i in range(10)], 0, logits=lambda i: i == 9) == 0
    finally:
        llama_cpp.llama_model_free(model)

    by_name = {name: (ne, ty, xne, nbytes) for name, ne, ty, xne, nbytes in seen}
    q = by_name["blk.0.attn_q.weight"]
    ref = gguf_tensors["blk.0.attn_q.weight"]
    assert q[0][:2] == [int(ref.shape[0]), int(ref.shape[1])] and q[0][2:] == [1, 1]
    assert q[1] == int(ref.tensor_type)
    assert q[2][0] == int(ref.shape[0]) and q[2][1] == 10  # activations: one row per token
    assert q[3] == 4 * q[2][0] * q[2][1] * q[2][2] * q[2][3]
    assert {n for n in by_name if n.startswith("blk.")} >= {
        f"blk.{i}.{w}.weight" for i in range(2)
        for w in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
