"""Quality over image prompts (KLD, PPL, same-top-p of a VLM's answers) and image QA scoring.

The tiny VLMs have random weights: these tests check the mechanics (0 against itself, > 0
against another quantization), which is all such figures can show.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import image_prompts, qa
from bench.image_quality import ImageReference
from bench.tinymodels import tiny_vlm
from models.quantize import quantize
from server.cli import main


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_vlm(tmp_path_factory.mktemp("tinyvlm"), "pixtral")


def test_a_vlm_against_itself_over_image_prompts_prints_zero_kld(vlm: tuple[Path, Path],
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    llm, mmproj = vlm
    assert main(["quality", str(llm), "--reference", str(llm), "--mmproj", str(mmproj), "--ctx", "64",
                 "--chunks", "1", "--answer-tokens", "4"]) == 0
    text, images = capsys.readouterr().out.split("\nimage prompts: ")
    assert "Mean    KLD:          0.000000 ± 0.000000" in text  # the text section is still there
    assert images.startswith(f"{len(image_prompts.prompts())} bundled pictures")
    scored = int(images.split("tokens scored:")[1].split()[0])
    assert len(image_prompts.prompts()) <= scored <= 4 * len(image_prompts.prompts())
    assert "Mean    KLD:          0.000000 ± 0.000000" in images
    assert "Same top p:           100.000 %" in images
    assert "RMS Δp:               0.000 %" in images
    assert "mechanics work, not quality" in images  # random weights, and the output says so


def test_another_quantization_of_the_vlm_drifts_over_image_prompts(vlm: tuple[Path, Path], tmp_path: Path) -> None:
    llm, mmproj = vlm
    q4 = quantize(llm, tmp_path / "tiny-vlm.Q4_0.gguf", "Q4_0")
    ref = ImageReference(llm, mmproj, answer_tokens=4)
    assert ref.random_weights and len(ref.answers) == len(image_prompts.prompts())
    same, drifted = ref.measure(llm), ref.measure(q4, mmproj)
    assert same.kld_mean == 0 and same.same_top_p_pct == 100 and same.ppl_model == pytest.approx(same.ppl_reference)
    assert drifted.tokens_scored == same.tokens_scored
    assert drifted.kld_mean > 0 and drifted.kld_max >= drifted.kld_p99 >= drifted.kld_median >= 0
    assert drifted.rms_dp_pct > 0


def test_image_quality_says_m_rope_projectors_are_not_supported_yet(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    llm, mmproj = tiny_vlm(tmp_path, "qwen2vl")
    assert main(["quality", str(llm), "--reference", str(llm), "--mmproj", str(mmproj), "--ctx", "64",
                 "--chunks", "1", "--answer-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgevlm: error:") and "M-RoPE" in err


def test_image_qa_scoring_on_hand_made_answers() -> None:
    pictures = image_prompts.prompts()
    assert [p.name for p in pictures] == ["gauge", "label", "circle", "square", "dots", "sign", "blank"]
    answers = ["60", "The part number is 4711-B.", "Blue", "blue", "three", "a circle", "unknown"]
    s = qa.score([p.qa_item() for p in pictures], answers)
    # right: gauge, label, square, dots and the abstention on the blank picture
    assert (s.correct, s.answerable, s.abstained, s.fabricated) == (4, 6, 1, 0)
    assert s.accuracy == pytest.approx(5 / 7)
    assert qa.score([p.qa_item() for p in pictures], answers[:-1] + ["SN 12345"]).fabricated == 1


def test_image_prompts_are_drawn_the_same_every_time_and_differ_from_each_other() -> None:
    pictures = image_prompts.prompts()
    drawn = [p.image().tobytes() for p in pictures]
    assert drawn == [p.image().tobytes() for p in image_prompts.prompts()]
    assert len(set(drawn)) == len(drawn)
    assert all(p.image().size == image_prompts.SIZE for p in pictures)
    assert pictures[1].png_data_url().startswith("data:image/png;base64,")
