"""LLaVA-format records: reading a JSON array or JSONL file, and every check a row must pass.

A record: `{"id": ..., "image": "a.jpg" | ["a.jpg", "b.jpg"] (optional), "conversations": [{"from": "human",
"value": "<image>\\nWhat is ..."}, {"from": "gpt", "value": "..."}, ...]}`. Image paths are checked lexically: no
absolute path and no `..` that leaves the folder; symbolic links inside the folder (LLaVA's usual
`images/coco -> /datasets/coco`) are followed. Problems are reported with the
line (JSONL) or the array index (JSON) and the id, never silently dropped: `strict` raises on the first file with
problems (listing them all), `skip` drops the bad rows and counts them.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from epic.data.templates import IMAGE_PLACEHOLDER, Turn

logger = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Problem:
    where: str  # "line 12" or "item 12"
    record_id: str | None
    kind: str  # a short category, e.g. "missing image"
    detail: str

    def __str__(self) -> str:
        name = f" (id {self.record_id})" if self.record_id is not None else ""
        return f"{self.where}{name}: {self.kind}: {self.detail}"


@dataclass
class Record:
    """One valid row: where it came from, its turns and its image paths (absolute, inside the image folder)."""

    where: str
    record_id: str | None
    turns: list[Turn]
    images: list[Path]
    raw: dict[str, Any] = field(repr=False)


class DataError(ValueError):
    """A data file failed its checks in strict mode; `problems` lists every one."""

    def __init__(self, path: Path, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        shown = "\n".join(f"  {problem}" for problem in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} problem(s)\n{shown}{more}")

    def first_line(self) -> str:
        """The count, the first problem and where to see them all, on one line (for the command line)."""
        return (
            f"{self.path}: {len(self.problems)} problem(s), the first: {self.problems[0]}; "
            f"`epic data check {self.path}` lists every one"
        )


def read_raw(path: Path) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """(where, parsed object) for every row of a JSON array or JSONL file, plus the rows that are not JSON."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as error:
            return [], [Problem(f"line {error.lineno}", None, "malformed JSON", f"{error.msg} (column {error.colno})")]
        return [(f"item {index}", item) for index, item in enumerate(items)], []
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as error:
            problems.append(Problem(f"line {number}", None, "malformed JSON", f"{error.msg} (column {error.colno})"))
    return rows, problems


def _image_paths(item: dict[str, Any]) -> list[str] | None:
    """The row's image names, or None when `image` is neither a string nor a list of strings."""
    image = item.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(name, str) and name for name in names):
        return None
    return names


def check_record(where: str, item: Any, image_folder: Path | None, open_images: bool = True) -> Record | Problem:
    """Validate one parsed row; return the `Record` or the first `Problem` found."""
    if not isinstance(item, dict):
        return Problem(where, None, "malformed record", f"expected an object, got {type(item).__name__}")
    record_id = None if item.get("id") is None else str(item.get("id"))

    def problem(kind: str, detail: str) -> Problem:
        return Problem(where, record_id, kind, detail)

    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return problem("empty conversation", "`conversations` is missing or empty")
    turns = []
    for index, message in enumerate(conversations):
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            return problem("malformed record", f"message {index} has no string `value`")
        sender = message.get("from")
        role = ROLES.get(sender) if isinstance(sender, str) else None
        if role is None:
            return problem("malformed record", f"message {index} is from {message.get('from')!r}")
        turns.append(Turn(role, message["value"]))
    if not any(turn.role == "assistant" for turn in turns):
        return problem("no assistant turn", "the conversation has no reply to learn")
    for index, turn in enumerate(turns):
        expected = "user" if index % 2 == 0 else "assistant"
        if turn.role != expected:
            return problem("malformed record", f"message {index} is from {turn.role}; turns must alternate")

    image_names = _image_paths(item)
    if image_names is None:
        return problem("malformed record", f"`image` must be a path or a list of paths, got {item.get('image')!r}")
    placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
    if placeholders != len(image_names):
        return problem(
            "image count mismatch", f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(image_names)} image(s)"
        )
    if any(IMAGE_PLACEHOLDER in turn.text for turn in turns if turn.role == "assistant"):
        return problem("image count mismatch", f"{IMAGE_PLACEHOLDER} inside an assistant reply")
    images = []
    for name in image_names:
        if image_folder is None:
            return problem("missing image", f"{name!r} but no image folder was given")
        folder = Path(os.path.abspath(image_folder))
        path = Path(os.path.normpath(folder / name))
        if os.path.isabs(name) or not path.is_relative_to(folder):
            return problem("image path escapes folder", f"{name!r} is absolute or leaves {folder}")
        if not path.is_file():
            return problem("missing image", f"{name!r} not found in {folder}")
        if open_images:
            try:
                with Image.open(path) as image:
                    image.load()  # decodes every byte: catches truncated files that verify() lets through
            except Exception as error:  # PIL raises many types for broken files
                return problem("unreadable image", f"{name!r}: {error}")
        images.append(path)
    return Record(where, record_id, turns, images, item)


@dataclass
class ReadReport:
    """Valid records and every problem met, with counts per kind."""

    records: list[Record]
    problems: list[Problem]

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind] = counts.get(problem.kind, 0) + 1
        return counts


def read_records(path: Path, image_folder: Path | None, open_images: bool = True) -> ReadReport:
    """Read and check every row of a LLaVA-format file."""
    rows, problems = read_raw(Path(path))
    records = []
    for where, item in rows:
        result = check_record(where, item, None if image_folder is None else Path(image_folder), open_images)
        (problems if isinstance(result, Problem) else records).append(result)
    return ReadReport(records, problems)


def load_records(
    path: Path, image_folder: Path | None, on_error: str = "strict", verify_images: bool = True
) -> list[Record]:
    """Valid records of a file; `strict` raises `DataError` listing every problem, `skip` logs and drops them.

    `verify_images=False` only checks that image files exist (opening 665K images takes minutes).
    """
    if on_error not in ("strict", "skip"):
        raise ValueError(f"on_error must be 'strict' or 'skip', got {on_error!r}")
    report = read_records(path, image_folder, open_images=verify_images)
    if report.problems:
        if on_error == "strict":
            raise DataError(Path(path), report.problems)
        logger.warning("%s: skipped %d row(s): %s", path, len(report.problems), report.counts())
    return report.records
