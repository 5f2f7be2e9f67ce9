"""`epic show`: the picture exists, has one panel per method, and marks exactly the kept patches."""

from __future__ import annotations

from PIL import Image

from epic.cli import main
from epic.data.shapes import SynthConfig, vocabulary_texts
from epic.data.templates import get_template
from epic.eval.show import PANEL, TITLE, draw_kept, kept_patches
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
    picture = draw_kept(image, results)
    assert picture.size == (PANEL * 3, PANEL + TITLE)
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
    assert (
        main(["show", str(tmp_path / "in.png"), "--tokens", "12", "--methods", "dart,fastv,random", "--out", str(out)])
        == 0
    )
    assert Image.open(out).size == (PANEL * 4, PANEL + TITLE)
    assert "dart kept 12" in capsys.readouterr().out
