"""Tiny deterministic GGUF models: same bytes every time, and llama.cpp loads and runs them."""

from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from bench.tinymodels import (
    default_model_path,
    projector_for,
    tiny_vlm,
    tokenizer_metadata,
    write_tiny_llm,
    write_tiny_mmproj,
)
from models import cpu_paths
from models.llama_lib import ensure_backend


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenize(model, text: str) -> list[int]:
    vocab = llama_cpp.llama_model_get_vocab(model)
    buf = (llama_cpp.llama_token * 256)()
    n = llama_cpp.llama_tokenize(vocab, text.encode(), len(text.encode()), buf, 256, False, True)
    assert n >= 0
    return list(buf[:n])


@pytest.fixture(scope="module")
def backend() -> None:
    ensure_backend()


def test_writers_are_deterministic(tmp_path: Path) -> None:
    a = write_tiny_llm(tmp_path / "a.gguf")
    b = write_tiny_llm(tmp_path / "b.gguf")
    assert sha(a) == sha(b)
    assert sha(write_tiny_llm(tmp_path / "c.gguf", seed=1)) != sha(a)
    for kind in ("pixtral", "mlp"):
        m1 = write_tiny_mmproj(tmp_path / f"{kind}1.gguf", kind)
        m2 = write_tiny_mmproj(tmp_path / f"{kind}2.gguf", kind)
        assert sha(m1) == sha(m2)
        assert m1.stat().st_size < 1 << 20


def test_llm_copies_the_default_tokenizer(tmp_path: Path) -> None:
    path = write_tiny_llm(tmp_path / "llm.gguf", n_embd=32, n_head=2, n_ff=64)
    fields = gguf.GGUFReader(path).fields
    src = {k: v for k, _, v, _ in tokenizer_metadata()}
    assert bytes(fields["tokenizer.chat_template"].parts[-1]) == src["tokenizer.chat_template"]
    assert len(fields["tokenizer.ggml.tokens"].data) == len(src["tokenizer.ggml.tokens"]) == 49152
    assert fields["tokenizer.ggml.eos_token_id"].parts[-1][0] == src["tokenizer.ggml.eos_token_id"]
    assert fields["llama.embedding_length"].parts[-1][0] == 32


def test_mmproj_metadata_has_the_types_clip_requires(tmp_path: Path) -> None:
    path = write_tiny_mmproj(tmp_path / "p.gguf", "pixtral", n_embd_text=48)
    r = gguf.GGUFReader(path)
    f = r.fields
    T = gguf.GGUFValueType
    assert f["clip.vision.image_size"].types == [T.UINT32]
    assert f["clip.vision.attention.layer_norm_epsilon"].types == [T.FLOAT32]
    assert f["clip.has_vision_encoder"].types == [T.BOOL]
    assert f["clip.vision.image_mean"].types == [T.ARRAY, T.FLOAT32]
    names = {t.name: t for t in r.tensors}
    assert {"v.token_embd.img_break", "mm.patch_merger.weight", "mm.input_norm.weight"} <= names.keys()
    assert int(names["mm.2.weight"].shape[1]) == 48  # ggml ne[1] == text embedding width


def test_bad_parameters_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_tiny_mmproj(tmp_path / "x.gguf", "mlp", n_embd=32, n_ff=32)
    with pytest.raises(ValueError):
        write_tiny_mmproj(tmp_path / "x.gguf", "qwen3vl")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        write_tiny_mmproj(tmp_path / "x.gguf", "qwen2vl", spatial_merge=3)  # the graph is 2x2 only
    with pytest.raises(ValueError):
        write_tiny_llm(tmp_path / "x.gguf", arch="qwen2vl", rope_sections=(1, 1, 1, 1))  # != head_dim/2
    with pytest.raises(ValueError):
        write_tiny_llm(tmp_path / "x.gguf", n_embd=30, n_head=4)
    assert not (tmp_path / "x.gguf").exists()


def test_tiny_vlm_caches_by_parameters(tmp_path: Path) -> None:
    llm, mm = tiny_vlm(tmp_path, "mlp")
    mtimes = (llm.stat().st_mtime_ns, mm.stat().st_mtime_ns)
    assert tiny_vlm(tmp_path, "mlp") == (llm, mm)
    assert (llm.stat().st_mtime_ns, mm.stat().st_mtime_ns) == mtimes
    llm2, mm2 = tiny_vlm(tmp_path, "mlp", llm={"n_embd": 32, "n_head": 2})
    assert llm2 != llm and mm2 != mm
    assert gguf.GGUFReader(mm2).fields["clip.vision.projection_dim"].parts[-1][0] == 32


def test_llama_cpp_loads_tokenizes_like_default_and_decodes(tmp_path: Path, backend: None) -> None:
    path = write_tiny_llm(tmp_path / "llm.gguf")
    # the plain CPU path: llama.cpp's own choice of fast paths crashes on some CPUs (models.cpu_paths)
    tiny = cpu_paths.load_model(str(path), ())
    ref = cpu_paths.load_model(str(default_model_path()), ())
    assert tiny and ref
    ctx = None
    try:
        assert llama_cpp.llama_model_n_embd(tiny) == 64
        text = "<|im_start|>user\nWhat is in the picture?<|im_end|>\n"
        assert tokenize(tiny, text) == tokenize(ref, text)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_threads, cparams.n_threads_batch = 256, 64, 2, 2
        ctx = llama_cpp.llama_init_from_model(tiny, cparams)
        assert ctx
        n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(tiny))
        tokens = tokenize(tiny, text)
        arr = (llama_cpp.llama_token * len(tokens))(*tokens)  # keep alive: the batch only points at it
        batch = llama_cpp.llama_batch_get_one(arr, len(tokens))
        assert llama_cpp.llama_decode(ctx, batch) == 0
        generated = []
        for _ in range(8):  # greedy: random but separate output weights -> varied tokens
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            generated.append(tok)
            one = (llama_cpp.llama_token * 1)(tok)
            assert llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(one, 1)) == 0
        assert len(set(generated)) > 1
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(tiny)
        llama_cpp.llama_model_free(ref)


def test_one_command_writes_a_tiny_vlm_and_says_how_to_serve_it(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from bench.tinymodels import main

    assert main([str(tmp_path / "vlm"), "--kind", "mlp"]) == 0
    out = capsys.readouterr().out
    files = sorted((tmp_path / "vlm").glob("*.gguf"))
    assert len(files) == 2 and all(str(f) in out for f in files)
    assert "edgevlm serve --model" in out and "--mmproj" in out


def test_the_server_does_not_need_the_fixture_generator() -> None:
    import subprocess
    import sys

    code = "import sys, server.app, server.cli, models.vision, models.engine; print('bench.tinymodels' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_projector_is_made_to_fit_any_text_model_once(tmp_path: Path) -> None:
    from models.vision import read_projector_facts

    for model, width in ((default_model_path(), 576), (tiny_vlm(tmp_path / "vlm", "mlp")[0], 64)):
        path = projector_for(model, tmp_path / "proj")
        assert read_projector_facts(path).n_embd_out == width
        stamp = path.stat().st_mtime_ns
        assert projector_for(model, tmp_path / "proj") == path and path.stat().st_mtime_ns == stamp
