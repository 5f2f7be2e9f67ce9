"""What each method keeps: FastV against eager attentions, DART against random, Random against seeds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import epic
from epic.compression import METHODS, ImageSelection, register_method
from epic.compression.methods.dart import Dart, split_evenly
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch

SPEC = TinyLlavaSpec()


def test_registry_lists_builtin_methods():
    assert {"dart", "fastv", "random"} <= set(METHODS)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_keeps_top_attention_of_last_prompt_token(padding_side, layer):
    model = build_tiny_llava(attn_implementation="eager")
    batch = make_batch(SPEC, [Row(), Row(before=8, after=2, answer=5)], padding_side)
    with torch.no_grad():
        stock = model(**batch, output_attentions=True)
        with epic.compress(model, "fastv", tokens=10, layer=layer) as state:
            model(**batch)
    attentions = stock.attentions[layer - 1]  # [B, H, L, L]
    for row in range(2):
        last_prompt = int((batch["labels"][row] != -100).int().argmax()) - 1
        scores = attentions[row, :, last_prompt].mean(dim=0)
        visual = (batch["input_ids"][row] == model.config.image_token_id).nonzero().squeeze(1)
        expected = visual[scores[visual].topk(10).indices].sort().values
        assert torch.equal(state.kept[row], expected)


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    normed = F.normalize(features.float(), dim=-1)
    similarity = normed @ normed.T
    n = similarity.shape[0]
    return float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1)))


def test_dart_keeps_less_redundant_tokens_than_random():
    model = build_tiny_llava()
    layer, tokens = 2, 8
    batch = make_batch(SPEC, [Row(before=3 + i) for i in range(6)], labels=False, seed=3)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[layer]  # entering layer K
        with epic.compress(model, "dart", tokens=tokens, layer=layer) as state:
            model(**batch)
    dart_kept = state.kept
    generator = torch.Generator().manual_seed(0)
    dart_scores, random_scores = [], []
    for row, kept in enumerate(dart_kept):
        visual = (batch["input_ids"][row] == model.config.image_token_id).nonzero().squeeze(1)
        dart_scores.append(mean_pairwise_cosine(hidden[row, kept]))
        for _ in range(50):
            draw = visual[torch.randperm(visual.numel(), generator=generator)[:tokens]]
            random_scores.append(mean_pairwise_cosine(hidden[row, draw]))
    dart_mean = sum(dart_scores) / len(dart_scores)
    random_mean = sum(random_scores) / len(random_scores)
    spread = torch.tensor(random_scores).std().item()
    assert dart_mean < random_mean - spread / 2, (dart_mean, random_mean, spread)


def test_dart_budget_spread_and_pivots_kept():
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    assert split_evenly(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]
    generator = torch.Generator().manual_seed(0)
    length, dim = 40, 16
    features = torch.randn(length, dim, generator=generator)
    key_norms = torch.rand(length, generator=generator)
    positions = torch.arange(10, 30)
    key_norms[positions[5]] = 100.0  # the strongest visual pivot
    image = ImageSelection(
        positions=positions,
        budget=7,
        text_positions=torch.arange(0, 10),
        attention=torch.zeros(length),
        key_norms=key_norms,
        features=features,
        generator=generator,
    )
    kept = Dart(pivots_image=2, pivots_text=3).select(image)
    assert kept.numel() == 7 and kept.unique().numel() == 7
    assert positions[5] in kept
    assert torch.isin(kept, positions).all()


def test_random_is_reproducible_and_varies_with_seed():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(), Row()], labels=False)

    def kept(seed: int) -> list[list[int]]:
        with torch.no_grad(), epic.compress(model, "random", tokens=6, seed=seed) as state:
            model(**batch)
        return [k.tolist() for k in state.kept]

    assert kept(1) == kept(1)
    assert kept(1) != kept(2)


@pytest.mark.parametrize("method", ["dart", "fastv", "random"])
def test_answer_tokens_do_not_change_what_is_kept(method):
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(answer=6), Row(before=7, answer=4)])
    altered = {k: v.clone() for k, v in batch.items()}
    answers = altered["labels"] != -100
    altered["input_ids"][answers] = (altered["input_ids"][answers] + 17) % 200 + 3
    altered["labels"][answers] = altered["input_ids"][answers]
    results = []
    for inputs in (batch, altered):
        with torch.no_grad(), epic.compress(model, method, tokens=7, seed=5) as state:
            model(**inputs)
        results.append([k.tolist() for k in state.kept])
    assert results[0] == results[1]


def test_a_new_method_is_one_decorated_dataclass():
    from dataclasses import dataclass

    @register_method("test-first-tokens")
    @dataclass
    class FirstTokens:
        needs_features = False

        def select(self, image: ImageSelection) -> torch.Tensor:
            return image.positions[: image.budget]

    try:
        model = build_tiny_llava()
        batch = make_batch(SPEC, [Row()], labels=False)
        with torch.no_grad(), epic.compress(model, "test-first-tokens", tokens=3) as state:
            model(**batch)
        visual = (batch["input_ids"][0] == model.config.image_token_id).nonzero().squeeze(1)
        assert state.kept[0].tolist() == visual[:3].tolist()
    finally:
        METHODS.pop("test-first-tokens")
