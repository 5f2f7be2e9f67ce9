"""The lazy public names of `epic` and `epic.compression` resolve to the objects their modules define."""

from __future__ import annotations

import importlib

import pytest

import epic
import epic.compression


@pytest.mark.parametrize("name", epic.compression.__all__)
def test_every_public_name_of_epic_compression_resolves(name):
    value = getattr(epic.compression, name)
    if name != "METHODS":
        module = importlib.import_module(f"epic.compression.{epic.compression._EXPORTS[name]}")
        assert value is getattr(module, name)


@pytest.mark.parametrize("name", epic.__all__)
def test_every_public_name_of_epic_resolves(name):
    assert getattr(epic, name) is not None


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="has no attribute 'compres'"):
        epic.compression.compres  # noqa: B018
