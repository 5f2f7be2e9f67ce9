"""The training tests' tiny synthetic set, for the replay tests."""

from tests.train.conftest import shapes  # noqa: F401 (a fixture)
