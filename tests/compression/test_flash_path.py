"""The masks the engine gives flash attention, checked through transformers' own flash mask and unpadding code."""

from __future__ import annotations

import pytest
import torch

import epic
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.compression.flash_emulation import use_flash_emulation
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("batch_rows", [1, 3])
def test_compressed_forward_under_flash_path_equals_sdpa(padding_side, batch_rows):
    rows = [Row(), Row(before=11, after=3, answer=6), Row(images=0, before=20)][:batch_rows]
    batch = make_batch(SPEC, rows, padding_side)
    outputs = []
    for flash in (False, True):
        model = build_tiny_llava(SPEC)
        if flash:
            use_flash_emulation(model)
        with torch.no_grad(), epic.compress(model, "dart", tokens=7) as state:
            out = model(**batch)
        outputs.append((out, state.original_positions))
    (sdpa, positions), (flash, flash_positions) = outputs
    assert torch.equal(positions, flash_positions)
    real = (positions >= 0) & batch["attention_mask"].bool().gather(1, positions.clamp(min=0))
    torch.testing.assert_close(flash.logits[real], sdpa.logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(flash.loss, sdpa.loss, atol=1e-5, rtol=0)


def test_compressed_generation_under_flash_path_equals_sdpa():
    batch = make_batch(SPEC, [Row(), Row(before=9), Row(images=0, before=14)], "left", labels=False)
    results = []
    for flash in (False, True):
        model = build_tiny_llava(SPEC)
        if flash:
            use_flash_emulation(model)
        with epic.compress(model, "fastv", tokens=6):
            results.append(
                model.generate(
                    **batch,
                    max_new_tokens=5,
                    do_sample=False,
                    pad_token_id=0,
                    return_dict_in_generate=True,
                    output_logits=True,
                )
            )
    assert torch.equal(results[0].sequences, results[1].sequences)
    for sdpa_logits, flash_logits in zip(results[0].logits, results[1].logits, strict=True):
        torch.testing.assert_close(flash_logits, sdpa_logits, atol=1e-4, rtol=0)


def test_binding_sliding_window_under_flash_is_refused():
    spec = TinyLlavaSpec(text_model="mistral")
    model = build_tiny_llava(spec)
    model.config.text_config.sliding_window = 16
    use_flash_emulation(model)
    batch = make_batch(spec, [Row()], labels=False)
    refused = pytest.raises(NotImplementedError, match="not supported under flash attention")
    with refused, torch.no_grad(), epic.compress(model, "dart", tokens=7):
        model(**batch)
