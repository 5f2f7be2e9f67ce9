"""`epic show`: the picture exists, has one panel per method, marks exactly the kept patches, and says the question
and each method's answer."""

from __future__ import annotations

from PIL import Image

from epic.cli import main
from epic.data.shapes import SynthConfig, vocabulary_texts
from epic.data.templates import get_template
from epic.eval.show import PANEL, QUESTION, TITLE, draw_kept, kept_patches
from epic.models.factory import build_tiny_llava_with_processor
from epic.models.tiny import TinyLlavaSpec


def test_kept_patches_and_picture(tmp_path):
    Image.new("RGB", (100, 60), (200, 30, 30)).save(tmp_path / "in.png")
    model, processor = build_tiny_llava_with_processor(vocabulary_texts(SynthConfig()), TinyLlavaSpec())
    image, results = kept_patches(
        model,
        processor,
        get_template("vicuna_v1"),
        tmp_path / "in.png",
        "What color is the shape at the center?",
        ["dart", "fastv"],
        tokens=9,
    )
    assert [len(result.patches) for result in results] == [9, 9]
    assert all(0 <= patch < 64 and result.side == 8 for result in results for patch in result.patches)
    assert all(result.answer for result in results)  # a random model says something, never nothing
    picture = draw_kept(image, results)
    assert picture.size == (PANEL * 3, PANEL + TITLE)
    titled = draw_kept(image, results, "What color is the shape at the center?")
    assert titled.size == (PANEL * 3, QUESTION + TITLE + PANEL)
    assert titled.crop((0, QUESTION, PANEL * 3, QUESTION + TITLE)) == picture.crop((0, 0, PANEL * 3, TITLE))
    question_band = titled.crop((0, 0, PANEL * 3, QUESTION)).convert("L")
    assert question_band.getextrema()[0] < 100  # the question is written there
    answers_line = picture.crop((PANEL, 4 + 15 + 4, PANEL * 2, TITLE)).convert("L")
    assert answers_line.getextrema()[0] < 200  # the DART panel's answer line is written
    blank = draw_kept(image, [type(r)(r.method, r.tokens, r.patches, r.side) for r in results])
    assert blank.crop((PANEL, 4 + 15 + 4, PANEL * 2, TITLE)).convert("L").getextrema()[0] == 255
    cell = PANEL / 8
    for patch in range(64):  # the centre of every patch of the DART panel: untouched if kept, dimmed if dropped
        row, column = divmod(patch, 8)
        x, y = int((column + 0.5) * cell), TITLE + int((row + 0.5) * cell)
        original, shown = sum(picture.getpixel((x, y))), sum(picture.getpixel((PANEL + x, y)))
        if patch in results[0].patches:
            assert shown == original
        else:
            assert shown < 0.5 * original


def test_show_command_writes_a_png(tmp_path, capsys):
    Image.new("RGB", (64, 64), (20, 200, 30)).save(tmp_path / "in.png")
    out = tmp_path / "kept.png"
    methods = ["--methods", "dart,fastv,divprune@0"]
    assert main(["show", str(tmp_path / "in.png"), "--tokens", "12", *methods, "--out", str(out)]) == 0
    assert Image.open(out).size == (PANEL * 4, QUESTION + TITLE + PANEL)
    printed = capsys.readouterr().out
    assert "visual tokens from layer 2 (divprune@0 at their own)" in printed.splitlines()[0]
    assert "question: What is in the image?" in printed
    assert all(f"{method:<10} kept 12 of 196: '" in printed for method in ("dart", "fastv", "divprune@0"))
