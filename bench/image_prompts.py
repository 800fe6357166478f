"""The bundled image prompts: small pictures drawn with Pillow at run time, each with a question.

They serve two measures: image-prompt quality against a reference (``bench.image_quality``:
the question is the prompt, the reference's own answer is scored) and image QA (the known
answer, scored by ``bench.qa``'s normalised match, "unknown" right where the picture does
not show the answer). Drawn by this code, so no image licence applies beyond the project's
own (MIT); the drawing is deterministic, so every run sees the same pixels.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from bench.qa import QAItem

SIZE = (160, 120)  # small enough for tiny test models, large enough to read for a real VLM
# The system instruction of the image QA, as bench/data/qa.json's instruction is for text.
INSTRUCTION = ("Answer the question about the image in as few words as possible. If the image does not "
               "show the answer, reply exactly: unknown")


@dataclass(frozen=True)
class ImagePrompt:
    name: str
    question: str
    answers: tuple[str, ...] | None  # None: the picture does not show it, "unknown" is right
    draw: Callable[[ImageDraw.ImageDraw], None]

    def image(self) -> Image.Image:
        img = Image.new("RGB", SIZE, (255, 255, 255))
        self.draw(ImageDraw.Draw(img))
        return img

    def png_data_url(self) -> str:
        buf = io.BytesIO()
        self.image().save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def qa_item(self) -> QAItem:
        return QAItem(self.question, self.answers)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow's bundled font (FreeType builds)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _gauge(d: ImageDraw.ImageDraw) -> None:
    cx, cy, r = 80, 100, 70
    d.arc((cx - r, cy - r, cx + r, cy + r), 180, 360, fill=(0, 0, 0), width=3)
    for value in range(0, 101, 20):
        a = math.pi * (1 - value / 100)
        x, y = cx + r * math.cos(a), cy - r * math.sin(a)
        d.line((x, y, cx + (r - 10) * math.cos(a), cy - (r - 10) * math.sin(a)), fill=(0, 0, 0), width=2)
        d.text((cx + (r - 22) * math.cos(a), cy - (r - 22) * math.sin(a)), str(value), fill=(0, 0, 0),
               font=_font(11), anchor="mm")
    a = math.pi * (1 - 60 / 100)
    d.line((cx, cy, cx + (r - 34) * math.cos(a), cy - (r - 34) * math.sin(a)), fill=(200, 0, 0), width=4)


def _label(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((10, 30, 150, 90), fill=(250, 240, 200), outline=(0, 0, 0), width=2)
    d.text((80, 48), "PART NO.", fill=(0, 0, 0), font=_font(14), anchor="mm")
    d.text((80, 72), "4711-B", fill=(0, 0, 0), font=_font(22), anchor="mm")


def _circle(d: ImageDraw.ImageDraw) -> None:
    d.ellipse((45, 25, 115, 95), fill=(220, 20, 20))


def _square(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((45, 25, 115, 95), fill=(20, 60, 220))


def _dots(d: ImageDraw.ImageDraw) -> None:
    for x in (30, 80, 130):
        d.ellipse((x - 14, 46, x + 14, 74), fill=(20, 160, 40))


def _sign(d: ImageDraw.ImageDraw) -> None:
    d.polygon(((80, 15), (140, 105), (20, 105)), fill=(250, 200, 0), outline=(0, 0, 0))
    d.text((80, 72), "!", fill=(0, 0, 0), font=_font(40), anchor="mm")


def _blank(d: ImageDraw.ImageDraw) -> None:
    d.rectangle((0, 0, SIZE[0], SIZE[1]), fill=(128, 128, 128))


PROMPTS: tuple[ImagePrompt, ...] = (
    ImagePrompt("gauge", "What value does the red needle of the gauge point to?", ("60", "sixty"), _gauge),
    ImagePrompt("label", "What is the part number on the label?", ("4711-B", "4711B"), _label),
    ImagePrompt("circle", "What colour is the circle?", ("red",), _circle),
    ImagePrompt("square", "What colour is the square?", ("blue",), _square),
    ImagePrompt("dots", "How many green dots are there?", ("3", "three"), _dots),
    ImagePrompt("sign", "What shape is the yellow sign?", ("triangle",), _sign),
    ImagePrompt("blank", "What is the serial number printed on this machine?", None, _blank),
)


def prompts() -> list[ImagePrompt]:
    return list(PROMPTS)
