"""A teacher resumed from the student's recorded prefix equals a full teacher forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Cache

import epic
from epic.compat import Layout, cache_length
from epic.compression import run_suffix
from epic.distill import distilled_positions
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize(
    ("method", "teacher"),
    [("dart", (20, 2)), ("fastv", (20, 2)), ("dart", (5, 3)), ("fastv", (64, 2)), ("random", (20, 2)), ("dart", None)],
)
@pytest.mark.parametrize("teacher_trims", [False, True])
def test_suffix_from_the_students_prefix_equals_a_full_teacher_forward(attention, method, teacher, teacher_trims):
    model = build_tiny_llava(attn_implementation=attention)
    batch = make_batch(SPEC, [Row(answer=4), Row(before=9, answer=2, images=2), Row(images=0)], "right")
    wanted = distilled_positions(batch.pop("labels"))
    with torch.no_grad():
        if teacher is None:
            expected = model(**batch, logits_to_keep=wanted).logits
        else:
            with epic.compress(model, method, tokens=teacher[0], layer=teacher[1], seed=1) as reference:
                expected = model(**batch, logits_to_keep=wanted).logits
        with epic.compress(model, method, tokens=5, layer=2, record_prefix=True, trim_last_layer=True) as student:
            model(**batch, logits_to_keep=wanted)
            handle = (
                None
                if teacher is None
                else epic.compress(
                    model, method, tokens=teacher[0], layer=teacher[1], seed=1, trim_last_layer=teacher_trims
                )
            )
            with student.paused():
                rows = run_suffix(model, student.prefix, 2, wanted, handle)
            if handle is not None:
                handle.remove()
                assert [k.tolist() for k in handle.kept] == [k.tolist() for k in reference.kept]
    torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)


def test_prefix_is_recorded_only_when_asked_and_reset_per_forward():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row()], labels=False)
    with torch.no_grad(), epic.compress(model, "dart", tokens=5) as plain:
        model(**batch)
    assert plain.prefix is None
    with torch.no_grad(), epic.compress(model, "dart", tokens=5, record_prefix=True) as recording:
        model(**batch)
        assert recording.prefix.hidden_states.shape[1] == batch["input_ids"].shape[1]
        model(input_ids=torch.tensor([[5, 6, 7]]))  # a text-only forward: nothing compressed, nothing recorded
        assert recording.prefix is None


def test_a_suffix_cannot_compress_below_its_start():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row()])
    wanted = distilled_positions(batch.pop("labels"))
    with torch.no_grad(), epic.compress(model, "dart", tokens=5, layer=3, record_prefix=True) as student:
        model(**batch)
        refused = pytest.raises(ValueError, match="cannot compress at layer 2")
        with student.paused(), epic.compress(model, "dart", tokens=9, layer=2) as teacher, refused:
            run_suffix(model, student.prefix, 3, wanted, teacher)


def test_the_teachers_suffix_never_receives_nor_changes_the_students_cache():
    model = build_tiny_llava()
    layout = Layout.of(model)
    layers = model.model.language_model.layers
    batch = make_batch(SPEC, [Row(), Row(before=9, images=2)], "right")
    wanted = distilled_positions(batch.pop("labels"))
    seen = []
    spies = [
        layer.register_forward_pre_hook(
            lambda m, a, kwargs: seen.append(kwargs.get(layout.layer_cache)), with_kwargs=True
        )
        for layer in layers[2:]
    ]
    with torch.no_grad(), epic.compress(model, "dart", tokens=5, layer=2, record_prefix=True) as student:
        cache = layout.output_cache_of(model(**batch, logits_to_keep=wanted, use_cache=True))
        assert isinstance(seen[0], Cache)  # the student's forward did run with a cache
        lengths = [cache_length(cache, index) for index in range(len(layers))]
        assert not any(isinstance(value, Cache) for value in student.prefix.layer_kwargs.values())
        seen.clear()
        with student.paused(), epic.compress(model, "dart", tokens=20, layer=2) as teacher:
            run_suffix(model, student.prefix, 2, wanted, teacher)
        leaked = dataclasses.replace(student.prefix, layer_kwargs={**student.prefix.layer_kwargs, "cache": cache})
        with (
            student.paused(),
            pytest.raises(RuntimeError, match=r"the teacher's suffix received a KV cache \(`cache`\)"),
        ):
            run_suffix(model, leaked, 2, wanted)
    for spy in spies:
        spy.remove()
    assert len(seen) == len(layers) - 2 and all(value is None for value in seen)
    assert [cache_length(cache, index) for index in range(len(layers))] == lengths
