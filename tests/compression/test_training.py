"""Backward through a compressed forward, with and without gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

import epic
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()


def gradients(method: str, checkpointing: dict | None) -> tuple[float, dict[str, torch.Tensor]]:
    model = build_tiny_llava(seed=1).train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    batch = make_batch(SPEC, [Row(), Row(before=8, answer=5), Row(images=0)], "right")
    with epic.compress(model, method, tokens=6, layer=2, seed=3):
        loss = model(**batch).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("method", ["dart", "fastv", "random"])
def test_gradients_are_finite_and_checkpointing_changes_nothing(method):
    loss, plain = gradients(method, None)
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert any(name.startswith("model.language_model.layers.3") for name in plain)
    assert plain["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        checkpointed_loss, checkpointed = gradients(method, kwargs)
        assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
        assert plain.keys() == checkpointed.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_step_reduces_loss_on_the_kept_sequence():
    model = build_tiny_llava(seed=2).train()
    batch = make_batch(SPEC, [Row(), Row(before=8)], "right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with epic.compress(model, "dart", tokens=8):
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
