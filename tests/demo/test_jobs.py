"""The demo's subprocesses: a failure stops the demo with its log, finished jobs are skipped, a job must produce its
output, and a job showing its progress keeps its errors."""

from __future__ import annotations

import sys

import pytest

from epic.demo.jobs import Job, run_jobs


def test_failed_job_stops_with_its_log(tmp_path):
    failing = Job("broken", [sys.executable, "-c", "print('the cause'); raise SystemExit(3)"], tmp_path / "never")
    with pytest.raises(RuntimeError, match=r"broken failed \(exit 3\)[\s\S]*the cause"):
        run_jobs([failing], 2, tmp_path / "logs", "test")


def test_finished_jobs_are_skipped_and_a_job_must_produce_its_output(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    run_jobs([Job("done", [sys.executable, "-c", "raise SystemExit(1)"], done)], 1, tmp_path / "logs", "test")
    silent = Job("silent", [sys.executable, "-c", "pass"], tmp_path / "missing")
    with pytest.raises(RuntimeError, match="silent failed"):
        run_jobs([silent], 1, tmp_path / "logs", "test")


def test_a_job_showing_progress_keeps_its_errors_for_the_failure_message(tmp_path, capfd):
    noisy = [sys.executable, "-c", "import sys; sys.stderr.write('step 3/9\\rboom: the cause\\n'); sys.exit(2)"]
    with pytest.raises(RuntimeError, match=r"loud failed \(exit 2\).*loud\.stderr\.log[\s\S]*boom: the cause"):
        run_jobs([Job("loud", noisy, tmp_path / "never", show_progress=True)], 1, tmp_path / "logs", "test")
    assert "boom: the cause" in capfd.readouterr().err  # the terminal saw it too
