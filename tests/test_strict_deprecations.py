"""tests/strict_deprecations.py: with EPIC_STRICT_DEPRECATIONS=1 a deprecation transformers warns or logs fails the
test that triggered it; exempted ones and other packages' warnings do not; without it nothing changes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.strict_deprecations import ENV

ROOT = Path(__file__).parent.parent
PROBE = """
import logging
import warnings


def test_warned():
    warnings.warn_explicit("`old` is deprecated", FutureWarning, "modeling_x.py", 1, module="transformers.models.x")


def test_logged():
    logging.getLogger("transformers.utils.generic").warning("`past_key_values` is deprecated. Use `cache` instead.")


def test_exempt():
    message = "`is_gradient_checkpointing` is deprecated and will be removed in v6."
    warnings.warn_explicit(message, FutureWarning, "modeling_utils.py", 1, module="transformers.modeling_utils")


def test_other_package():
    warnings.warn_explicit("`x` is deprecated", FutureWarning, "other.py", 1, module="otherpackage")
"""


@pytest.mark.parametrize("strict", [True, False])
def test_strict_mode_fails_exactly_the_tests_that_hit_a_transformers_deprecation(tmp_path, strict):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_probe.py").write_text(PROBE)
    command = [sys.executable, "-m", "pytest", "-p", "tests.strict_deprecations", "-p", "no:cacheprovider", "-rA"]
    result = subprocess.run(
        [*command, "-c", str(tmp_path / "pytest.ini"), str(tmp_path / "test_probe.py")],
        cwd=ROOT,
        env={**os.environ, ENV: "1" if strict else "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    outcomes = {
        line.split("::")[1].split()[0]: line.split()[0]
        for line in result.stdout.splitlines()
        if line.startswith(("PASSED", "FAILED")) and "::" in line
    }
    failing = {"test_warned", "test_logged"} if strict else set()
    assert outcomes == {
        name: "FAILED" if name in failing else "PASSED"
        for name in ("test_warned", "test_logged", "test_exempt", "test_other_package")
    }, result.stdout[-3000:]
