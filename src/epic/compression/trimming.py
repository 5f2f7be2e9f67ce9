"""Running the last decoder layer's MLP only at the rows whose logits are used (training)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def mlp_at_rows(mlp: nn.Module, rows: Callable[[], torch.Tensor | None]) -> list[RemovableHandle]:
    """Hooks that run a position-wise `mlp` ([B, L, d] -> [B, L, d]) only where `rows()` ([B, L] bool) is True and
    give zeros elsewhere; inactive while `rows()` is None.

    The layer's output is then exact at those rows and its residual alone at the others, so only those rows may be
    read: this is for the last decoder layer, when only some positions' logits are used (training).
    """

    def before(module: nn.Module, args: tuple) -> tuple | None:
        mask = rows()
        return None if mask is None else (args[0][mask],)

    def after(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        mask = rows()
        if mask is None:
            return None
        return output.new_zeros(*mask.shape, output.shape[-1]).index_put((mask,), output)

    return [mlp.register_forward_pre_hook(before), mlp.register_forward_hook(after)]


def last_mlp_of(language_model: nn.Module) -> nn.Module | None:
    """The last decoder layer's position-wise `mlp` module, or None where the layer has none."""
    mlp = getattr(language_model.layers[-1], "mlp", None)
    return mlp if isinstance(mlp, nn.Module) else None
