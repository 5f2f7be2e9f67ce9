"""Every bad-input case is reported with its line or id; strict raises, skip counts."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from epic.cli import main
from epic.data.dataset import LlavaDataset
from epic.data.records import DataError, load_records, read_records
from epic.data.templates import get_template


def good(record_id: str, image: str | None = "ok.png") -> dict:
    question = "<image>\nWhat color is the shape at the center?" if image else "What color is red?"
    row = {"id": record_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}
    if image:
        row["image"] = image
    return row


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (20, 10), (255, 0, 0)).save(images / "ok.png")
    (images / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "outside.png").write_bytes((images / "ok.png").read_bytes())
    return tmp_path


BAD_ROWS = {
    "malformed record": {**good("t"), "image": ["ok.png", None]},
    "missing image": good("m", "nowhere.png"),
    "unreadable image": good("u", "broken.png"),
    "image path escapes folder": good("e", "../outside.png"),
    "image count mismatch": {**good("c"), "image": ["ok.png", "ok.png"]},
    "empty conversation": {"id": "z", "conversations": []},
    "no assistant turn": {"id": "n", "conversations": [{"from": "human", "value": "hi"}]},
}


def write_jsonl(path, rows: list, raw_lines: tuple[str, ...] = ()) -> None:
    path.write_text("\n".join([*(json.dumps(row) for row in rows), *raw_lines]) + "\n")


def test_every_problem_is_reported_with_line_and_id(folder):
    data = folder / "data.jsonl"
    write_jsonl(data, [good("a"), *BAD_ROWS.values(), good("b", None)], raw_lines=("{not json",))
    report = read_records(data, folder / "images")
    assert [record.record_id for record in report.records] == ["a", "b"]
    kinds = {problem.kind: problem for problem in report.problems}
    assert set(kinds) == {*BAD_ROWS, "malformed JSON"}
    assert str(kinds["missing image"]).startswith("line 3 (id m): missing image")
    assert kinds["malformed JSON"].where == f"line {len(BAD_ROWS) + 3}"
    assert report.counts()["missing image"] == 1


def test_json_array_and_malformed_array(folder):
    data = folder / "data.json"
    data.write_text(json.dumps([good("a"), good("b", None)]))
    assert len(read_records(data, folder / "images").records) == 2
    data.write_text('[{"id": 1,}]')
    problems = read_records(data, folder / "images").problems
    assert problems[0].kind == "malformed JSON"


def test_strict_raises_listing_everything_and_skip_counts(folder, caplog):
    data = folder / "data.jsonl"
    write_jsonl(data, [good("a"), *BAD_ROWS.values()])
    with pytest.raises(DataError, match=f"{len(BAD_ROWS)} problem") as error:
        load_records(data, folder / "images", on_error="strict")
    assert len(error.value.problems) == len(BAD_ROWS)
    with caplog.at_level(logging.WARNING):
        records = load_records(data, folder / "images", on_error="skip")
    assert [record.record_id for record in records] == ["a"]
    assert f"skipped {len(BAD_ROWS)} row(s)" in caplog.text


def test_over_long_rows_are_dropped_or_refused(folder, tiny):
    _, processor = tiny
    data = folder / "data.jsonl"
    long_question = "<image>\n" + "red " * 100 + "?"
    long_row = {
        "id": "long",
        "image": "ok.png",
        "conversations": [{"from": "human", "value": long_question}, {"from": "gpt", "value": "red"}],
    }
    write_jsonl(data, [good("a"), long_row])
    template = get_template("vicuna_v1")
    with pytest.raises(DataError, match="over-long row"):
        LlavaDataset(data, folder / "images", processor, template, max_length=120)
    dataset = LlavaDataset(data, folder / "images", processor, template, max_length=120, on_error="skip")
    assert len(dataset) == 1 and dataset.skipped[0].record_id == "long"


def test_data_check_command(folder, tiny, tmp_path, capsys):
    model, processor = tiny
    from epic.models.factory import save_llava

    save_llava(model, processor, tmp_path / "model", "vicuna_v1")
    data = folder / "data.jsonl"
    write_jsonl(data, [good("a"), *BAD_ROWS.values()])
    assert (
        main(["data", "check", str(data), "--images", str(folder / "images"), "--model", str(tmp_path / "model")]) == 1
    )
    out = capsys.readouterr().out
    for kind in BAD_ROWS:
        assert kind in out
    assert f"{len(BAD_ROWS) + 1} row(s), 1 valid, {len(BAD_ROWS)} problem(s)" in out
    write_jsonl(data, [good("a")])
    assert main(["data", "check", str(data), "--images", str(folder / "images")]) == 0
    assert "row lengths were not checked" in capsys.readouterr().out


def test_truncated_image_is_unreadable_and_odd_fields_are_malformed(folder):
    from io import BytesIO

    buffer = BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buffer, format="JPEG")
    (folder / "images" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    data = folder / "data.jsonl"
    odd_sender = {"id": "s", "conversations": [{"from": ["human"], "value": "hi"}, {"from": "gpt", "value": "x"}]}
    write_jsonl(data, [good("cut", "cut.jpg"), {**good("i"), "image": 5}, odd_sender])
    kinds = {problem.record_id: problem.kind for problem in read_records(data, folder / "images").problems}
    assert kinds == {"cut": "unreadable image", "i": "malformed record", "s": "malformed record"}


def test_symlinked_subfolders_are_followed(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("datasets")
    Image.new("RGB", (8, 8)).save(elsewhere / "x.png")
    (folder / "images" / "coco").symlink_to(elsewhere, target_is_directory=True)
    data = folder / "data.jsonl"
    write_jsonl(data, [good("a", "coco/x.png"), good("b", "/etc/passwd")])
    report = read_records(data, folder / "images")
    assert [record.record_id for record in report.records] == ["a"]
    assert report.problems[0].kind == "image path escapes folder"


def test_template_errors_have_their_own_kind(folder, tiny):
    _, processor = tiny
    data = folder / "data.jsonl"
    two_rounds = {
        "id": "mt",
        "image": "ok.png",
        "conversations": [
            {"from": "human", "value": "<image>"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "and?"},
            {"from": "gpt", "value": "blue"},
        ],
    }
    write_jsonl(data, [two_rounds])
    with pytest.raises(DataError, match="template error"):
        LlavaDataset(data, folder / "images", processor, get_template("plain"))
