"""A pytest plugin: with EPIC_STRICT_DEPRECATIONS=1, transformers' deprecations are errors, so a removal it announces
for a later release fails the tests a release ahead (the README's test command sets it; docs/compatibility.md).

transformers announces deprecations in two ways: `warnings` (FutureWarning, DeprecationWarning) and its logger
(`warning_once`); both become errors. `EXEMPT` lists deprecated calls made by other packages, not by epic.
"""

from __future__ import annotations

import logging
import os
import re

import pytest

ENV = "EPIC_STRICT_DEPRECATIONS"
EXEMPT = {  # message start -> why it is not ours
    "`is_gradient_checkpointing` is deprecated": "peft 0.18-0.21 reads it when wrapping a model for LoRA",
}


class TransformersDeprecation(RuntimeError):
    """transformers logged that something the test ran is deprecated."""


class RaiseOnDeprecation(logging.Handler):
    """A handler for the `transformers` logger that raises on a logged deprecation (an exemption aside)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.levelno < logging.WARNING or "deprecated" not in message.lower():
            return
        if not any(message.startswith(start) for start in EXEMPT):
            raise TransformersDeprecation(f"{record.name}: {message}")


def pytest_configure(config: pytest.Config) -> None:
    if os.environ.get(ENV) != "1":
        return
    for category in ("FutureWarning", "DeprecationWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}:transformers")
    for start in EXEMPT:  # later lines take precedence
        config.addinivalue_line("filterwarnings", f"ignore:{re.escape(start)}:FutureWarning")
    logging.getLogger("transformers").addHandler(RaiseOnDeprecation())
