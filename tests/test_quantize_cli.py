"""``edgevlm quantize`` and ``edgevlm models info`` on tiny GGUF files whose sizes are known."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.tinymodels import write_tiny_llm, write_tiny_mmproj
from server.cli import main


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def edgevlm(capfd: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run the CLI in this process (its imports are paid once) and capture what it prints."""
    def run(*args: str) -> Run:
        capfd.readouterr()
        rc = main(list(args))
        out, err = capfd.readouterr()
        # llama.cpp's quantizer prints per-tensor notes on the C streams; keep our own lines
        err = "\n".join(x for x in err.splitlines() if x.startswith("edgevlm:"))
        return Run(rc, out, err)
    return run


def bpw_line(out: str) -> float:
    line = next(x for x in out.splitlines() if "BPW" in x)
    return float(line.split(":", 1)[1].split()[0])


@pytest.fixture(scope="module")
def f32_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llm(tmp_path_factory.mktemp("f32") / "tiny.F32.gguf", dtype="f32", n_ctx_train=1234)


def test_quantize_two_types_outputs_load_and_bpw_order(edgevlm, f32_llm: Path, tmp_path: Path) -> None:
    out = tmp_path / "variants"
    proc = edgevlm("quantize", str(f32_llm), "--types", "q8_0,Q4_0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "already quantized" not in proc.stderr  # an F32 source is not a requantization
    files = sorted(p.name for p in out.iterdir())
    assert files == ["tiny.Q4_0.gguf", "tiny.Q8_0.gguf"]  # no partial file left
    bpw = {}
    for name in files:
        info = edgevlm("models", "info", str(out / name))  # loads the weights with llama.cpp
        assert info.returncode == 0, info.stderr
        bpw[name] = bpw_line(info.stdout)
    assert 32.0 > bpw["tiny.Q8_0.gguf"] > bpw["tiny.Q4_0.gguf"] > 4.0
    # --models-dir offers what quantize wrote
    listing = edgevlm("models", "list", "--models-dir", str(out))
    assert listing.returncode == 0, listing.stderr
    assert "tiny.q8_0" in listing.stdout and "tiny.q4_0" in listing.stdout


def test_quantize_warns_on_requantization(edgevlm, tmp_path: Path, f32_llm: Path) -> None:
    first = edgevlm("quantize", str(f32_llm), "--types", "Q8_0", "--out", str(tmp_path))
    assert first.returncode == 0, first.stderr
    again = edgevlm("quantize", str(tmp_path / "tiny.Q8_0.gguf"), "--types", "Q4_0", "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert "already quantized (Q8_0)" in again.stderr and "requantization" in again.stderr


@pytest.mark.parametrize("args, words", [
    (["--types", "Q4_0,Q9_9"], ["Q9_9", "unknown"]),
    (["--types", ""], ["unknown"]),
])
def test_quantize_refuses_unknown_types_before_writing(edgevlm, f32_llm: Path, tmp_path: Path, args: list[str],
                                                        words: list[str]) -> None:
    proc = edgevlm("quantize", str(f32_llm), *args, "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgevlm: error:") and all(w in lines[0] for w in words)
    assert not (tmp_path / "o").exists()


def test_quantize_refuses_unreadable_source(edgevlm, tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    for src in (bad, tmp_path / "missing.gguf"):
        proc = edgevlm("quantize", str(src), "--types", "Q8_0", "--out", str(tmp_path / "o"))
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("edgevlm: error:") and str(src) in proc.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_models_info_figures_of_a_known_f32_model(edgevlm, f32_llm: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(f32_llm))
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    proc = edgevlm("models", "info", str(f32_llm))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert bpw_line(out) == 32.0  # every tensor is F32: 4 bytes x 8 / 1 parameter
    assert f"parameters:      {n_params} " in out
    assert f"tensor types:    F32: {len(reader.tensors)}" in out
    assert f"file size:       {f32_llm.stat().st_size} bytes" in out
    assert "architecture:    llama" in out
    assert "context length:  1234" in out
    assert "chat template:   present" in out  # the default model's tokenizer, template included


def test_models_info_of_a_projector(edgevlm, tmp_path: Path) -> None:
    mm = write_tiny_mmproj(tmp_path / "mmproj.gguf", "mlp", image_size=96)
    proc = edgevlm("models", "info", str(mm))
    assert proc.returncode == 0, proc.stderr
    assert "architecture:    clip" in proc.stdout
    assert "projector type:  mlp" in proc.stdout and "image size:      96 px" in proc.stdout
    assert "BPW" in proc.stdout


def test_models_info_refuses_a_non_gguf(edgevlm, tmp_path: Path) -> None:
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    proc = edgevlm("models", "info", str(bad))
    assert proc.returncode == 2 and proc.stderr.startswith("edgevlm: error:") and "x.gguf" in proc.stderr
