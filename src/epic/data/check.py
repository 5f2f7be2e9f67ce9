"""`epic data check`: validate a whole LLaVA-format file and report every problem with its line or id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from epic.data.dataset import encode_record, image_token_count
from epic.data.records import Problem, read_records
from epic.data.templates import Template


@dataclass
class CheckReport:
    rows: int
    valid: int
    problems: list[Problem]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for problem in self.problems:
            counts[problem.kind] = counts.get(problem.kind, 0) + 1
        detail = ", ".join(f"{kind}: {count}" for kind, count in sorted(counts.items())) or "none"
        return f"{self.rows} row(s), {self.valid} valid, {len(self.problems)} problem(s) ({detail})"


def check_file(
    path: Path,
    image_folder: Path | None,
    processor=None,
    template: Template | None = None,
    max_length: int | None = None,
) -> CheckReport:
    """Every check of training; with a processor and template, also whether each row fits `max_length`."""
    report = read_records(path, image_folder, open_images=True)
    problems = list(report.problems)
    image_tokens = image_token_count(processor) if processor is not None else 0
    valid = 0
    for record in report.records:
        if processor is not None and template is not None:
            encoded = encode_record(record, template, processor, image_tokens, max_length)
            if isinstance(encoded, Problem):
                problems.append(encoded)
                continue
        valid += 1
    problems.sort(key=lambda problem: (problem.where.split()[0], int(problem.where.split()[1])))
    return CheckReport(rows=len(report.records) + len(report.problems), valid=valid, problems=problems)
