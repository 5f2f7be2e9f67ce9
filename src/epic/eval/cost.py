"""Cost accounting for compressed prefill: FLOPs and KV-cache bytes by formula, and the cache as measured.

Conventions (SPEC section 4, FastV): one decoder layer over n tokens costs
    4 n d^2 + 2 n^2 d + k n d m
multiply-accumulates, with k = 3 for a gated (SwiGLU) MLP and 2 for a plain one. With grouped-query attention the
key and value projections are narrower: the projections cost n d (2 d + 2 d_kv) instead of 4 n d^2 (equal for
multi-head attention). `torch.utils.flop_counter` counts 2 FLOPs per multiply-accumulate.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedConfig

from epic.compat import cache_tensors


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder-only LLM that cost depends on."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    gated_mlp: bool = True

    @classmethod
    def from_config(cls, config: PreTrainedConfig) -> DecoderShape:
        """Read the shape of a transformers text config (Llama, Qwen2, Mistral and alike: gated MLPs)."""
        config = config.get_text_config()
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
        )


def layer_macs(shape: DecoderShape, tokens: int) -> int:
    """Multiply-accumulates of one decoder layer over `tokens` tokens (prefill, causal mask not exploited)."""
    n, d = tokens, shape.hidden
    kv_width = shape.kv_heads * shape.head_dim
    q_width = shape.heads * shape.head_dim
    projections = n * d * (2 * q_width + 2 * kv_width)
    attention = 2 * n * n * q_width
    mlp = (3 if shape.gated_mlp else 2) * n * d * shape.intermediate
    return projections + attention + mlp


def _per_layer(shape: DecoderShape, tokens: int, stages: list[tuple[int, int]]) -> list[int]:
    """The sequence length each decoder layer runs over: `tokens` below the first stage, then each stage's
    (layer, kept length) from its layer on."""
    lengths = [tokens] * shape.layers
    for layer, kept in stages:
        lengths[layer:] = [kept] * (shape.layers - layer)
    return lengths


def prefill_macs(
    shape: DecoderShape,
    tokens: int,
    kept_tokens: int | None = None,
    layer: int = 0,
    *,
    stages: list[tuple[int, int]] | None = None,
) -> int:
    """Decoder MACs of a prefill over `tokens`, compressed to `kept_tokens` from layer `layer` on (or, with
    `stages`, to each stage's kept length from its layer on)."""
    stages = stages if stages is not None else [] if kept_tokens is None else [(layer, kept_tokens)]
    return sum(layer_macs(shape, length) for length in _per_layer(shape, tokens, stages))


def kv_cache_bytes(
    shape: DecoderShape,
    tokens: int,
    kept_tokens: int | None = None,
    layer: int = 0,
    bytes_per_value: int = 2,
    *,
    stages: list[tuple[int, int]] | None = None,
) -> int:
    """KV-cache bytes: 2 (K and V) x tokens held per layer x kv_heads x head_dim x bytes, summed over layers."""
    per_token_layer = 2 * shape.kv_heads * shape.head_dim * bytes_per_value
    stages = stages if stages is not None else [] if kept_tokens is None else [(layer, kept_tokens)]
    return sum(_per_layer(shape, tokens, stages)) * per_token_layer


def measured_cache_bytes(cache) -> int:
    """Bytes held by the key and value tensors of a transformers `Cache`, read from the tensors themselves."""
    return sum(tensor.numel() * tensor.element_size() for tensor in cache_tensors(cache))
