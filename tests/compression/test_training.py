"""Backward through a compressed forward, with and without gradient checkpointing, with and without trimming."""

from __future__ import annotations

import pytest
import torch

import epic
from epic.distill import distilled_positions
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch, method_stages

SPEC = TinyLlavaSpec()


def gradients(method: str, checkpointing: dict | None, layer: int = 2) -> tuple[float, dict[str, torch.Tensor]]:
    model = build_tiny_llava(seed=1).train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    batch = make_batch(SPEC, [Row(), Row(before=8, answer=5), Row(images=0)], "right")
    with epic.compress(model, method, tokens=6, layer=layer, seed=3):
        loss = model(**batch).loss
        loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize(("method", "layer"), method_stages())
def test_gradients_are_finite_and_checkpointing_changes_nothing(method, layer):
    loss, plain = gradients(method, None, layer)
    assert torch.isfinite(torch.tensor(loss))
    assert all(torch.isfinite(g).all() for g in plain.values())
    assert any(name.startswith("model.language_model.layers.3") for name in plain)
    assert plain["model.multi_modal_projector.linear_1.weight"].abs().sum() > 0
    for kwargs in ({"use_reentrant": False}, {"use_reentrant": True}):
        checkpointed_loss, checkpointed = gradients(method, kwargs, layer)
        assert checkpointed_loss == pytest.approx(loss, abs=1e-6)
        assert plain.keys() == checkpointed.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(checkpointed[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_step_reduces_loss_on_the_kept_sequence():
    """Each step trains on the compressed sequence (8 kept visual tokens per row, a loss other than the full
    sequence's), and the loss falls."""
    model = build_tiny_llava(seed=2).train()
    batch = make_batch(SPEC, [Row(), Row(before=8)], "right")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with epic.compress(model, "dart", tokens=8) as compression:
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            loss = model(**batch).loss
            assert [len(kept) for kept in compression.kept] == [8, 8]
            with torch.no_grad(), compression.paused():
                full = model(**batch).loss
            assert full.item() != pytest.approx(loss.item(), abs=1e-6)  # not the full sequence's loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]


def rows_and_gradients(trim: bool, checkpointing: dict | None, padding: str) -> tuple[torch.Tensor, dict, list[int]]:
    """Logits at the supervised-next positions (a boolean logits_to_keep), their sum's gradients, and how many rows
    the last layer's MLP saw."""
    model = build_tiny_llava(seed=1).train()
    if checkpointing is not None:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpointing)
    batch = make_batch(SPEC, [Row(), Row(before=8, answer=5, images=2), Row(images=0, answer=2)], padding)
    wanted = distilled_positions(batch.pop("labels"))
    mlp_rows: list[int] = []
    model.model.language_model.layers[-1].mlp.register_forward_hook(
        lambda module, args, output: mlp_rows.append(output.shape[:-1].numel())
    )
    with epic.compress(model, "dart", tokens=6, layer=2, seed=3, trim_last_layer=trim):
        rows = model(**batch, logits_to_keep=wanted).logits
        (rows * torch.linspace(-1, 1, rows.shape[-1])).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return rows.detach(), grads, mlp_rows


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": False}, {"use_reentrant": True}])
def test_trimming_the_last_layer_changes_no_kept_logit_nor_gradient(padding, checkpointing):
    rows, grads, full_rows = rows_and_gradients(False, None, padding)
    trimmed_rows, trimmed_grads, trimmed = rows_and_gradients(True, checkpointing, padding)
    assert full_rows[0] > rows.shape[0]
    assert trimmed and set(trimmed) == {rows.shape[0]}  # the forward (and any recomputation) ran those rows only
    torch.testing.assert_close(trimmed_rows, rows, atol=1e-5, rtol=0)
    assert grads.keys() == trimmed_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(trimmed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_trimming_applies_only_with_a_boolean_logits_to_keep_and_not_while_paused():
    model = build_tiny_llava(seed=1)
    batch = make_batch(SPEC, [Row(), Row(before=8)], "right", labels=False)
    mlp_rows: list[int] = []
    model.model.language_model.layers[-1].mlp.register_forward_hook(
        lambda module, args, output: mlp_rows.append(output.shape[:-1].numel())
    )
    with torch.no_grad(), epic.compress(model, "dart", tokens=6, trim_last_layer=True) as trimming:
        model(**batch)
        with trimming.paused():
            model(**batch, logits_to_keep=batch["attention_mask"].bool())
    kept_length = 2 * (batch["input_ids"].shape[1] - SPEC.image_tokens + 6)
    assert mlp_rows == [kept_length, 2 * batch["input_ids"].shape[1]]


def test_trimming_needs_an_mlp_in_the_last_layer():
    model = build_tiny_llava()
    del model.model.language_model.layers[-1].mlp
    with pytest.raises(ValueError, match="trim_last_layer needs decoder layers with a position-wise `mlp`"):
        epic.compress(model, "dart", tokens=6, trim_last_layer=True)
