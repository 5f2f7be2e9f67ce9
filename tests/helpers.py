"""Batches of LLaVA inputs for tests: images at known positions, prompts, answers, either padding side."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from epic.compat import attention_implementation, set_attention_implementation
from epic.compression import registry
from epic.models.tiny import TinyLlavaSpec

PAD_ID = 0
BOS_ID = 1


def method_stages(exclude: tuple[str, ...] = ()) -> list[tuple[str, int]]:
    """(method, layer) for every registered method: at layer 2 (inside the LLM) and, for a method that needs no
    layer K-1 scores, at layer 0 (before the LLM) too."""
    stages = [registry.method_spec(entry, 2) for entry in registry.method_stages(2)]
    return [(name, layer) for name, layer in stages if name not in exclude]


@dataclass(frozen=True)
class Row:
    """One sample: text, `images` images in a block, more text, then an answer (supervised)."""

    images: int = 1
    before: int = 4
    after: int = 6
    answer: int = 3


def padded(
    sequences: list[torch.Tensor], supervised: list[torch.Tensor], padding_side: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, 2D mask and labels (-100 outside the `supervised` positions and padding) of the sequences padded
    to one length on `padding_side`."""
    length = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), length), PAD_ID)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    label_ids = torch.full((len(sequences), length), -100)
    for i, (seq, sup) in enumerate(zip(sequences, supervised, strict=True)):
        span = slice(0, len(seq)) if padding_side == "right" else slice(length - len(seq), length)
        input_ids[i, span] = seq
        attention_mask[i, span] = 1
        label_ids[i, span] = torch.where(sup, seq, -100)
    return input_ids, attention_mask, label_ids


def make_batch(
    spec: TinyLlavaSpec, rows: list[Row], padding_side: str = "right", seed: int = 0, labels: bool = True
) -> dict[str, torch.Tensor]:
    """Token ids, 2D mask, labels (-100 outside answers and padding) and one pixel tensor per image."""
    generator = torch.Generator().manual_seed(seed)
    sequences, supervised = [], []
    for row in rows:
        text = lambda n: torch.randint(3, spec.image_token_id, (n,), generator=generator)  # noqa: E731
        parts = [torch.tensor([BOS_ID]), text(row.before)]
        parts += [torch.full((spec.image_tokens,), spec.image_token_id)] * row.images
        parts += [text(row.after)]
        prompt = torch.cat(parts)
        answer = text(row.answer) if labels else torch.empty(0, dtype=torch.long)
        sequences.append(torch.cat([prompt, answer]))
        is_answer = torch.cat([torch.zeros(len(prompt)), torch.ones(len(answer))]).bool()
        supervised.append(is_answer)
    input_ids, attention_mask, label_ids = padded(sequences, supervised, padding_side)
    n_images = sum(row.images for row in rows)
    pixel_values = torch.randn(n_images, 3, spec.image_size, spec.image_size, generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if n_images:
        batch["pixel_values"] = pixel_values
    if labels:
        batch["labels"] = label_ids
    return batch


def reference_logits(
    model,
    batch: dict[str, torch.Tensor],
    kept: list[torch.Tensor] | list[tuple[int, list[torch.Tensor]]],
    layer: int | None = None,
    window: int | None = None,
    windowed_layers: set[int] | None = None,
    replaced: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Stock model, eager attention, with dropped visual tokens masked out of attention from `layer` on.

    Independent of the engine: the sequence keeps its full length; only the keys of dropped visual tokens become
    invisible to every query of layers >= `layer`. Several stages: `kept` is a list of (layer, kept per row), each
    stage's mask from its layer on. `window` adds a sliding window over original positions to the layers in
    `windowed_layers` (all of them by default). `replaced` (rows, positions, embeddings [m, d]) overwrites what
    enters layer 0 at those positions (a method that merges tokens).
    """
    stages = [(layer, kept)] if layer is not None else kept
    input_ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    length = input_ids.shape[1]
    query, key = torch.arange(length)[:, None], torch.arange(length)[None, :]

    def additive_mask(allowed_positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        allowed = allowed_positions[None] & visible[:, None, :]  # [B, q, k]
        allowed |= torch.eye(length, dtype=torch.bool)[None]  # keep every row non-empty (padding queries)
        return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]

    def swap_mask(mask: torch.Tensor):
        return lambda module, args, kwargs: (args, {**kwargs, "attention_mask": mask})

    layers = model.model.language_model.layers
    handles = []
    if replaced is not None:

        def replace(module, args, kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            kwargs = {key: value for key, value in kwargs.items() if key != "hidden_states"}
            return (hidden.index_put(replaced[:2], replaced[2]), *args[1:]), kwargs

        handles.append(layers[0].register_forward_pre_hook(replace, with_kwargs=True))
    for stage, (start, stage_kept) in enumerate(stages):
        visible = valid & (input_ids != model.config.image_token_id)
        for row, positions in enumerate(stage_kept):
            visible[row, positions] = True
        causal = additive_mask(key <= query, visible)
        windowed = causal if window is None else additive_mask((key <= query) & (query - key < window), visible)
        end = stages[stage + 1][0] if stage + 1 < len(stages) else len(layers)
        for i in range(start, end):
            mask = windowed if windowed_layers is None or i in windowed_layers else causal
            handles.append(layers[i].register_forward_pre_hook(swap_mask(mask), with_kwargs=True))
    text_config = model.config.text_config
    implementation = attention_implementation(text_config)
    try:
        set_attention_implementation(text_config, "eager")
        with torch.no_grad():
            return model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    finally:
        set_attention_implementation(text_config, implementation)
        for handle in handles:
            handle.remove()


def staged_kept(state) -> list[tuple[int, list[torch.Tensor]]]:
    """(layer, kept per row) of every stage of a compression after a forward: `reference_logits`'s `kept`."""
    return [(stage.layer, kept) for stage, kept in zip(state.stages, state.stage_kept, strict=True)]


@contextmanager
def layer0_inputs(model) -> Iterator[dict[str, torch.Tensor]]:
    """Record what decoder layer 0 receives (`["hidden"]`, [B, L', d]: after a compression's gather when registered
    after it)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = model.model.language_model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def kept_embeddings(state, layer0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, original positions, embeddings) of every real slot layer 0 received under a one-stage compression
    before the LLM: `reference_logits`'s `replaced`, for a method that merges tokens."""
    rows, slots = (state.original_positions >= 0).nonzero(as_tuple=True)
    return rows, state.original_positions[rows, slots], layer0[rows, slots]


def assert_matches_masked_reference(
    model, batch: dict[str, torch.Tensor], state, out, layer0: torch.Tensor | None = None
) -> None:
    """`out` (a compressed forward under `state`, with labels) equals `reference_logits` at every real slot, and its
    loss, the CE over the kept sequence, equals the CE over the reference's supervised positions. `layer0`: what
    layer 0 received under a merging method before the LLM, written into the reference's input."""
    replaced = None if layer0 is None else kept_embeddings(state, layer0)
    reference = reference_logits(model, batch, staged_kept(state), replaced=replaced)
    real, expected = at_slots(reference, state.original_positions, batch["attention_mask"])
    torch.testing.assert_close(out.logits[real], expected[real], atol=1e-4, rtol=0)
    shift_labels = batch["labels"][:, 1:]
    reference_loss = torch.nn.functional.cross_entropy(
        reference[:, :-1][shift_labels != -100], shift_labels[shift_labels != -100]
    )
    torch.testing.assert_close(out.loss, reference_loss, atol=1e-4, rtol=0)


def at_slots(
    reference: torch.Tensor, original_positions: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of real slots [B, L'], reference values gathered at each slot's original position [B, L', ...])."""
    index = original_positions.clamp(min=0)
    real = (original_positions >= 0) & attention_mask.bool().gather(1, index)
    expected = reference.gather(1, index[..., None].expand(-1, -1, reference.shape[-1]))
    return real, expected


def save_tiny_parts(folder, texts: list[str], llm_layers: int = 3) -> dict[str, object]:
    """A tiny CLIP tower (+ its image processor), a Llama LM (+ a word tokenizer fitted to `texts`) and LLaVA-named
    stage-1 projector weights, saved as the paper's starting parts. Returns the paths and the in-memory parts."""
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from epic.models.factory import word_tokenizer

    folder = Path(folder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vision = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=48,
                patch_size=6,
            )
        )
        tokenizer = word_tokenizer(texts)
        llm = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(tokenizer),
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=llm_layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            )
        )
        projector = {  # LLaVA's own key names for an mlp2x_gelu projector
            "model.mm_projector.0.weight": torch.randn(64, 32) * 0.02,
            "model.mm_projector.0.bias": torch.zeros(64),
            "model.mm_projector.2.weight": torch.randn(64, 64) * 0.02,
            "model.mm_projector.2.bias": torch.randn(64) * 0.02,
        }
    vision.save_pretrained(folder / "vision")
    CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}).save_pretrained(
        folder / "vision"
    )
    tokenizer.save_pretrained(folder / "llm")
    llm.save_pretrained(folder / "llm")
    save_file(projector, str(folder / "projector.safetensors"))
    return {
        "vision": folder / "vision",
        "llm": folder / "llm",
        "projector": folder / "projector.safetensors",
        "vision_model": vision,
        "llm_model": llm,
        "projector_weights": projector,
    }


@dataclass(frozen=True)
class GridRow:
    """One Qwen-VL sample: text, images of the given (h, w) patch grids (each wrapped in vision start/end), more
    text, then an answer."""

    grids: tuple[tuple[int, int], ...] = ((4, 4),)
    before: int = 4
    after: int = 6
    answer: int = 3


def make_grid_batch(
    model, rows: list[GridRow], padding_side: str = "right", seed: int = 0, labels: bool = True
) -> dict[str, torch.Tensor]:
    """A Qwen2-VL / Qwen2.5-VL batch: token ids, 2D mask, `mm_token_type_ids`, labels, flattened patches and
    `image_grid_thw` (one frame per image; an image of h x w patches has h * w / 4 tokens)."""
    config = model.config
    vision = config.vision_config
    generator = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(3, config.image_token_id - 3, (n,), generator=generator)  # noqa: E731
    sequences, supervised, grids = [], [], []
    for row in rows:
        parts = [torch.tensor([BOS_ID]), text(row.before)]
        for h, w in row.grids:
            tokens = h * w // vision.spatial_merge_size**2
            parts += [torch.tensor([config.vision_start_token_id]), torch.full((tokens,), config.image_token_id)]
            parts.append(torch.tensor([config.vision_end_token_id]))
            grids.append([1, h, w])
        prompt = torch.cat([*parts, text(row.after)])
        answer = text(row.answer) if labels else torch.empty(0, dtype=torch.long)
        sequences.append(torch.cat([prompt, answer]))
        supervised.append(torch.cat([torch.zeros(len(prompt)), torch.ones(len(answer))]).bool())
    input_ids, attention_mask, label_ids = padded(sequences, supervised, padding_side)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": (input_ids == config.image_token_id).long(),
    }
    if grids:
        grid = torch.tensor(grids)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(int(grid.prod(dim=-1).sum()), patch, generator=generator)
        batch["image_grid_thw"] = grid
    if labels:
        batch["labels"] = label_ids
    return batch
