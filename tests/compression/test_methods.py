"""What each method keeps: FastV against eager attentions, DART against its rule and random, Random against seeds."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import epic
from epic.compression import METHODS, ImageSelection, register_method
from epic.compression.methods.dart import Dart, split_evenly
from epic.compression.methods.dart_pre import DartPre
from epic.compression.registry import method_spec
from epic.models.tiny import TinyLlavaSpec, build_tiny_llava
from tests.helpers import Row, make_batch, method_stages

SPEC = TinyLlavaSpec()


def test_registry_lists_builtin_methods():
    assert {"dart", "dart_pre", "divprune", "fastv", "random"} <= set(METHODS)


def test_a_method_list_entry_names_its_layer_after_an_at_sign():
    assert method_spec("dart", 2) == ("dart", 2)
    assert method_spec("divprune@0", 2) == ("divprune", 0)
    assert method_spec("fastv@5", 2) == ("fastv", 5)
    with pytest.raises(ValueError, match=r"'fastv@x': the layer after @ must be a non-negative integer"):
        method_spec("fastv@x", 2)
    with pytest.raises(ValueError, match=r"unknown compression method 'nope' in 'nope@0'"):
        method_spec("nope@0", 2)


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


def test_dart_keeps_the_tokens_least_similar_to_its_pivot():
    """One text pivot, no visual pivot: the budget goes to the candidates of lowest cosine similarity to it."""
    direction = torch.tensor([1.0, 0.0])
    angles = torch.tensor([0.1, 2.9, 0.5, 1.6, 2.2, 0.9])  # cosine to the pivot falls as the angle grows
    features = torch.cat([torch.stack([angles.cos(), angles.sin()], dim=1), direction[None]])  # pivot at 6
    image = ImageSelection(
        positions=torch.arange(0, 6),
        budget=3,
        text_positions=torch.tensor([6]),
        attention=torch.zeros(7),
        key_norms=torch.ones(7),
        features=features,
        generator=torch.Generator(),
    )
    kept = Dart(pivots_image=0, pivots_text=1).select(image)
    assert kept.tolist() == [1, 3, 4]  # angles 2.9, 1.6 and 2.2: the three least similar, not the most similar


def reference_dart(image: ImageSelection, pivots_image: int, pivots_text: int, text_pivots_from: str) -> list[int]:
    """DART's rule written out with Python loops: pivots by key norm (text pivots from the text after the image or
    from all prompt text), the rest of the budget shared evenly over the pivots in order, each taking the
    not-yet-kept candidates least cosine-similar to it."""
    norms = image.key_norms.tolist()
    candidates = image.positions.tolist()
    text = [p for p in image.text_positions.tolist() if text_pivots_from == "prompt" or p > max(candidates)]
    image_pivots = sorted(candidates, key=lambda p: -norms[p])[: min(pivots_image, image.budget)]
    text_pivots = sorted(text, key=lambda p: -norms[p])[:pivots_text]
    pivots = image_pivots + text_pivots
    kept = list(image_pivots)
    remaining = image.budget - len(image_pivots)
    shares = [remaining // len(pivots) + (1 if i < remaining % len(pivots) else 0) for i in range(len(pivots))]
    for pivot, share in zip(pivots, shares, strict=True):
        pool = [p for p in candidates if p not in kept]
        similarity = {p: float(F.cosine_similarity(image.features[pivot], image.features[p], dim=0)) for p in pool}
        kept += sorted(pool, key=lambda p: similarity[p])[:share]
    return sorted(kept)


@pytest.mark.parametrize("text_pivots_from", ["after_image", "prompt"])
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("budget", "pivots_image", "pivots_text"), [(3, 1, 1), (9, 2, 3), (12, 4, 4), (2, 4, 4)])
def test_dart_matches_its_rule_written_out(seed, budget, pivots_image, pivots_text, text_pivots_from):
    generator = torch.Generator().manual_seed(seed)
    length = 30
    image = ImageSelection(
        positions=torch.arange(8, 24),
        budget=budget,
        text_positions=torch.cat([torch.arange(0, 8), torch.arange(24, 30)]),
        attention=torch.zeros(length),
        key_norms=torch.rand(length, generator=generator),
        features=torch.randn(length, 12, generator=generator),
        generator=generator,
    )
    dart = Dart(pivots_image=pivots_image, pivots_text=pivots_text, text_pivots_from=text_pivots_from)
    assert dart.select(image).tolist() == reference_dart(image, pivots_image, pivots_text, text_pivots_from)


def test_dart_text_pivots_come_from_the_text_after_the_image_by_default():
    """The strongest-key text token sits before the image: it is a pivot only with text_pivots_from="prompt"."""
    length = 12
    key_norms = torch.ones(length)
    key_norms[1] = 50.0  # before the image (a system prompt token)
    key_norms[10] = 20.0  # after the image (the question)
    image = ImageSelection(
        positions=torch.arange(3, 9),
        budget=2,
        text_positions=torch.tensor([0, 1, 2, 9, 10, 11]),
        attention=torch.zeros(length),
        key_norms=key_norms,
        features=torch.randn(length, 8, generator=torch.Generator().manual_seed(0)),
        generator=torch.Generator(),
    )
    assert Dart(pivots_image=0, pivots_text=1).text_candidates(image).tolist() == [9, 10, 11]
    assert Dart(pivots_image=0, pivots_text=1, text_pivots_from="prompt").text_candidates(image).tolist() == [
        0,
        1,
        2,
        9,
        10,
        11,
    ]
    features = image.features
    by_after = F.cosine_similarity(features[10][None], features[3:9]).argsort()[:2] + 3
    by_prompt = F.cosine_similarity(features[1][None], features[3:9]).argsort()[:2] + 3
    assert Dart(pivots_image=0, pivots_text=1).select(image).tolist() == sorted(by_after.tolist())
    kept_prompt = Dart(pivots_image=0, pivots_text=1, text_pivots_from="prompt").select(image)
    assert kept_prompt.tolist() == sorted(by_prompt.tolist())


def test_dart_refuses_an_unknown_text_pivot_span():
    with pytest.raises(ValueError, match="text_pivots_from='question' is not one of"):
        Dart(text_pivots_from="question")


@pytest.mark.parametrize("seed", range(4))
def test_dart_before_the_llm_is_darts_rule_with_feature_norms_for_key_norms(seed):
    generator = torch.Generator().manual_seed(seed)
    length = 30
    image = ImageSelection(
        positions=torch.arange(8, 24),
        budget=9,
        text_positions=torch.cat([torch.arange(0, 8), torch.arange(24, 30)]),
        attention=None,
        key_norms=None,
        features=torch.randn(length, 12, generator=generator),
        generator=generator,
    )
    as_keys = replace(image, key_norms=image.features.abs().sum(dim=-1))
    assert DartPre(pivots_image=2, pivots_text=3).select(image).tolist() == reference_dart(as_keys, 2, 3, "after_image")


def test_random_is_reproducible_and_varies_with_seed():
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(), Row()], labels=False)

    def kept(seed: int) -> list[list[int]]:
        with torch.no_grad(), epic.compress(model, "random", tokens=6, seed=seed) as state:
            model(**batch)
        return [k.tolist() for k in state.kept]

    assert kept(1) == kept(1)
    assert kept(1) != kept(2)


@pytest.mark.parametrize(("method", "layer"), method_stages())
def test_answer_tokens_do_not_change_what_is_kept(method, layer):
    model = build_tiny_llava()
    batch = make_batch(SPEC, [Row(answer=6), Row(before=7, answer=4)])
    altered = {k: v.clone() for k, v in batch.items()}
    answers = altered["labels"] != -100
    altered["input_ids"][answers] = (altered["input_ids"][answers] + 17) % 200 + 3
    altered["labels"][answers] = altered["input_ids"][answers]
    results = []
    for inputs in (batch, altered):
        with torch.no_grad(), epic.compress(model, method, tokens=7, seed=5, layer=layer) as state:
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
