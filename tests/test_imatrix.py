"""Importance matrices gathered through llama.cpp's eval callback, in llama.cpp's format."""

from __future__ import annotations

from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader

from bench.tinymodels import write_tiny_llm
from models import cpu_paths, imatrix
from models.quantize import QuantizeError, imatrix_of, quantize

TEXT = ("Before starting the press, check the hydraulic oil level, the hose fittings and the "
        "guard interlock. Record every fault with the time and the operator's badge number. ") * 40


def weight_matrices(path: Path) -> dict[str, int]:
    """blk.* 2-D weights -> input columns, read from the GGUF itself."""
    return {t.name: int(t.shape[0]) for t in GGUFReader(str(path)).tensors
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}


@pytest.fixture(scope="module")
def calibrated(tiny_llm: Path) -> imatrix.Imatrix:
    return imatrix.calibrate(str(tiny_llm), [TEXT], n_ctx=64, chunks=3, threads=2, datasets=["press.txt"])


def test_one_entry_per_weight_matrix_with_its_columns(calibrated: imatrix.Imatrix, tiny_llm: Path) -> None:
    expected = weight_matrices(tiny_llm)
    assert set(calibrated.entries) == set(expected)
    for name, e in calibrated.entries.items():
        assert e.sums.shape == (1, expected[name])
        assert np.isfinite(e.sums).all() and (e.sums >= 0).all() and e.sums.sum() > 0
        assert e.counts.tolist() == [3 * 64]  # every row of every chunk
    assert calibrated.chunk_count == 3 and calibrated.chunk_size == 64


def test_same_input_same_statistics(calibrated: imatrix.Imatrix, tiny_llm: Path) -> None:
    again = imatrix.calibrate(str(tiny_llm), [TEXT], n_ctx=64, chunks=3, threads=2)
    for name, e in calibrated.entries.items():
        np.testing.assert_array_equal(e.sums, again.entries[name].sums)


def test_file_reads_back_with_llama_cpp_names_and_keys(calibrated: imatrix.Imatrix, tmp_path: Path,
                                                       tiny_llm: Path) -> None:
    path = imatrix.write(calibrated, tmp_path / "tiny.imatrix.gguf")
    r = GGUFReader(str(path))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["press.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 3
    assert r.fields["imatrix.chunk_size"].contents() == 64
    tensors = {t.name: t for t in r.tensors}
    for name, cols in weight_matrices(tiny_llm).items():
        assert [int(x) for x in tensors[f"{name}.in_sum2"].shape] == [cols, 1]
        assert [int(x) for x in tensors[f"{name}.counts"].shape] == [1, 1]
    back = imatrix.read(path)
    assert back.model_sha256 == imatrix.file_sha256(tiny_llm)
    for name, e in calibrated.entries.items():
        np.testing.assert_allclose(back.entries[name].sums, e.sums, rtol=1e-6)


def test_quantizing_with_the_matrix_gives_a_different_loadable_file(
        calibrated: imatrix.Imatrix, tiny_llm: Path, tmp_path: Path) -> None:
    plain = quantize(tiny_llm, tmp_path / "plain-q4_0.gguf", "Q4_0")
    guided = quantize(tiny_llm, tmp_path / "imatrix-q4_0.gguf", "Q4_0", imatrix=calibrated)
    assert plain.read_bytes() != guided.read_bytes()
    assert imatrix_of(guided) == "unnamed" and imatrix_of(plain) is None  # as llama-quantize records it
    model = cpu_paths.load_model(str(guided), ())
    assert model
    llama_cpp.llama_model_free(model)


def test_a_matrix_for_another_model_is_refused(calibrated: imatrix.Imatrix, tmp_path: Path) -> None:
    other = write_tiny_llm(tmp_path / "wider.gguf", n_embd=128, n_ff=256)
    with pytest.raises(QuantizeError, match="another model file"):
        quantize(other, tmp_path / "out.gguf", "Q4_0", imatrix=calibrated)
    with pytest.raises(QuantizeError, match="columns"):  # forced past the hash: the widths differ
        quantize(other, tmp_path / "out.gguf", "Q4_0", imatrix=calibrated, force=True)
    assert not (tmp_path / "out.gguf").exists()


def test_types_unusable_without_a_matrix_are_refused(tiny_llm: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizeError, match="importance matrix"):
        quantize(tiny_llm, tmp_path / "iq2.gguf", "IQ2_XXS")


def test_calibrate_command_from_text_and_from_traces(tiny_llm: Path, tmp_path: Path, make_server) -> None:
    from tests.test_cli import assert_one_line_error, edgevlm

    text = tmp_path / "manual.txt"
    text.write_text(TEXT)
    out = tmp_path / "m.imatrix.gguf"
    proc = edgevlm("calibrate", str(tiny_llm), "--text", str(text), "--ctx", "64", "--chunks", "2",
                   "--out", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{out}: 14 weight matrices, 2 chunks of 64 tokens" in proc.stdout
    assert len(imatrix.read(out).entries) == 14

    for capture, name in ((False, "plain"), (True, "captured")):
        traces = tmp_path / f"{name}.jsonl"
        srv = make_server(model=str(tiny_llm), ctx_size=512, traces=str(traces), capture_content=capture,
                          traces_flush_ms=10)
        with srv.client() as c:
            for q in ("Where is valve V-12?", "How do I reset the press guard?", "Oil level is low, what now?"):
                assert c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": q}], "max_tokens": 4}).status_code == 200
        srv.stop()  # flushes the trace file
        if not capture:
            assert_one_line_error(edgevlm("calibrate", str(tiny_llm), "--from-traces", str(traces)),
                                  "--capture-content")
            continue
        proc = edgevlm("calibrate", str(tiny_llm), "--from-traces", str(traces), "--ctx", "16",
                       "--out", str(tmp_path / "t.imatrix.gguf"), timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "calibration text from traces: 3 requests" in proc.stdout


def test_quantize_command_takes_the_matrix_and_refuses_another_models(
        calibrated: imatrix.Imatrix, tiny_llm: Path, tmp_path: Path) -> None:
    from tests.test_cli import assert_one_line_error, edgevlm

    matrix = imatrix.write(calibrated, tmp_path / "tiny.imatrix.gguf")
    proc = edgevlm("quantize", str(tiny_llm), "--types", "Q4_0", "--imatrix", str(matrix),
                   "--out", str(tmp_path / "out"), timeout=300)
    assert proc.returncode == 0, proc.stderr
    [out] = (tmp_path / "out").glob("*.Q4_0.gguf")
    assert imatrix_of(out) == "tiny.imatrix.gguf"
    other = write_tiny_llm(tmp_path / "other.gguf", seed=7)
    assert_one_line_error(edgevlm("quantize", str(other), "--types", "Q4_0", "--imatrix", str(matrix),
                                  "--out", str(tmp_path / "out2")), "another model file")
    assert not list((tmp_path / "out2").glob("*.gguf"))
    assert_one_line_error(edgevlm("quantize", str(tiny_llm), "--types", "IQ2_XXS",
                                  "--out", str(tmp_path / "out3")), "importance matrix")
