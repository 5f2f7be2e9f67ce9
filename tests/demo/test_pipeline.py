"""`epic demo --quick` end to end, as a user runs it: every stage, a report whose every number is its stage file's,
a second run that reuses everything, then `--kd` on the `--from-base` model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from epic.demo import demo_config
from epic.demo.training import STAGE1_KEY_FILE
from tests.demo.report_checks import check_kd_report, check_report


def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "epic.cli", "demo", "--quick", "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert first.returncode == 0, first.stderr[-3000:]
    check_report(demo_config(quick=True), out)
    report = (out / "report.md").read_text()
    assert "blank images" in report and "its own questions" in report and "alpha = 0 ablation" in report
    assert report.startswith("# epic demo: the EPIC experiment in miniature (--quick)") and "not a result" in report
    assert "not a result" in first.stdout and "colour questions (chance 16.7%)" in report
    assert f"to {out / 'models' / 'stage1'}, where the stage-1 model is" in (out / "logs" / "stage1.log").read_text()
    assert (out / "accuracy.png").is_file() and (out / "headline.png").is_file()
    pictures = json.loads((out / "measures" / "pictures.json").read_text())
    assert {picture["model"] for picture in pictures} == {"sft", "tcd"}
    methods = demo_config(quick=True).methods
    assert all((out / picture["file"]).is_file() and len(picture["kept"]) == len(methods) for picture in pictures)
    cost = json.loads((out / "measures" / "cost.json").read_text())
    assert [(row["method"], row["tokens"]) for row in cost["rows"]] == [("none", 64)] + [
        ("dart", t) for t in (21, 14, 7, 4)
    ]
    logs = json.loads((out / "measures" / "training-logs.json").read_text())
    for name in ("stage1", "sft", "direct", "tcd", "tcd-nokd", "lcd"):
        assert (out / "models" / name / "model.safetensors").is_file()
        assert logs[name] == json.loads((out / "models" / name / "log_history.json").read_text())
        grid = json.loads((out / "eval" / name / "grid.json").read_text())
        assert {row["method"] for row in grid} == {"none", *methods}
    assert any("kd_loss" in entry for entry in logs["tcd"]) and not any(
        "kd_loss" in entry for entry in logs["tcd-nokd"]
    )
    assert [e["student_ratio"] for e in logs["tcd"] if "student_ratio" in e] == [
        e["student_ratio"] for e in logs["tcd-nokd"] if "student_ratio" in e
    ]  # the same draws
    second = subprocess.run(command, capture_output=True, text=True, env=environment)
    assert second.returncode == 0 and "reusing" in second.stdout
    kd_run = subprocess.run([*command, "--kd"], capture_output=True, text=True, env=environment)
    assert kd_run.returncode == 0, kd_run.stderr[-3000:]
    check_kd_report(demo_config(quick=True, from_base=True), out / "kd")
    kd_report = (out / "kd" / "kd-report.md").read_text()
    assert "PT-SFT (no KD)" in kd_report and "DPT-SFT-DFT" in kd_report and "rel_loss" in kd_report
    assert "(--quick)" in kd_report.splitlines()[0] and "not a result" in kd_report
    assert f"to {out / 'models' / 'base'}, where" in (out / "logs" / "base.log").read_text()
    assert (out / "models" / "base" / STAGE1_KEY_FILE).is_file()  # the teacher: the --from-base model
    dft = json.loads((out / "kd" / "runs" / "dpt-sft-dft-dft" / "final" / "log_history.json").read_text())
    assert any("res_loss" in entry for entry in dft)
