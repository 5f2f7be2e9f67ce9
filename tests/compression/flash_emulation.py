"""A CPU stand-in for transformers' flash-attention path, to test what the engine hands to flash without a GPU.

It goes through transformers' own `flash_attention_mask` (2D masks, None when nothing is padded) and its own
unpadding (`_upad_input`, `_pad_input`), then computes attention per sequence with FA2's varlen semantics
(bottom-right aligned causal mask). Registered under a name containing "flash", as the engine checks.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_flash_attention_utils import _pad_input, _unpad_input, _upad_input

NAME = "flash_emulated"


def _varlen(query, key, value, query_starts, key_starts, scale):
    """Causal attention per packed sequence; queries aligned to the end of their keys (FA2 varlen)."""
    out = torch.zeros_like(query)
    for index in range(len(query_starts) - 1):
        q = query[query_starts[index] : query_starts[index + 1]]
        k = key[key_starts[index] : key_starts[index + 1]]
        v = value[key_starts[index] : key_starts[index + 1]]
        if q.shape[0] == 0:
            continue
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        q_pos = torch.arange(q.shape[0])[:, None] + (k.shape[0] - q.shape[0])
        allowed = torch.arange(k.shape[0])[None, :] <= q_pos
        scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        weights = scores.softmax(-1).nan_to_num()
        out[query_starts[index] : query_starts[index + 1]] = torch.einsum("hqk,khd->qhd", weights, v.float()).to(
            q.dtype
        )
    return out


def flash_emulated(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    batch, heads, query_length, head_dim = query.shape
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    scale = scaling if scaling is not None else head_dim**-0.5
    if attention_mask is not None:
        q, k, v, query_index, (query_starts, key_starts), _ = _upad_input(
            q, k, v, attention_mask, query_length, _unpad_input
        )
        out = _varlen(q, k, v, query_starts.tolist(), key_starts.tolist(), scale)
        return _pad_input(out, query_index, batch, query_length), None
    query_starts = [i * query_length for i in range(batch + 1)]
    key_starts = [i * k.shape[1] for i in range(batch + 1)]
    out = _varlen(
        q.reshape(-1, heads, head_dim),
        k.reshape(-1, *k.shape[2:]),
        v.reshape(-1, *v.shape[2:]),
        query_starts,
        key_starts,
        scale,
    )
    return out.view(batch, query_length, heads, head_dim), None


def use_flash_emulation(model) -> None:
    """Register the stand-in (idempotent) and switch `model` to it."""
    AttentionInterface.register(NAME, flash_emulated)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    for config in (model.config, model.config.text_config):
        config._attn_implementation_internal = NAME
