"""PyramidDrop (Xing et al., CVPR 2025): FastV's ranking at several layers, keeping a geometric share at each."""

from __future__ import annotations

from dataclasses import dataclass

from epic.compression.budget import Budget
from epic.compression.methods.fastv import FastV
from epic.compression.registry import register_method
from epic.compression.stages import Stage


@register_method("pdrop")
@dataclass
class PDrop(FastV):
    """FastV's selection at each stage: the top visual tokens by the head-averaged attention of the last prompt
    token, computed with the stage layer's own attention over what enters it (as released: layer K's queries and
    keys, not K-1's).

    Given one stage (K, budget B), it prunes at `drops` layers K, K + e, K + 2e, ... (e = (L - K) // drops; `drops`
    defaults to 3, or to L - K where fewer layers remain), keeping B * lam**s tokens at stage s: `ratio=0.5,
    layer=8` on a 32-layer LLaVA-1.5 is the paper's 288 / 144 / 72 at layers 8 / 16 / 24. Given several stages
    (`compress(stages=...)`) it ranks at each as given.
    """

    lam: float = 0.5
    drops: int | None = None

    scores_at = "own"

    def schedule(self, stages: list[Stage], num_layers: int) -> list[Stage]:
        """The pyramid from the single stage given (see the class docstring)."""
        first = stages[0]
        remaining = num_layers - first.layer
        drops = min(3, remaining) if self.drops is None else self.drops
        if not 0.0 < self.lam <= 1.0 or drops < 1:
            raise ValueError(f"pdrop needs 0 < lam <= 1 and drops >= 1; got lam={self.lam}, drops={drops}")
        if drops > remaining:
            raise ValueError(
                f"pdrop's {drops} drops from layer {first.layer} need {drops} decoder layers from there; the model "
                f"has {num_layers}: give drops <= {remaining} or a lower layer"
            )
        every = remaining // drops
        return [Stage(first.layer + step * every, _scaled(first.budget, self.lam**step)) for step in range(drops)]


def _scaled(budget: Budget, factor: float) -> Budget:
    """`budget` keeping `factor` times as many tokens (a count rounds; a ratio scales the kept fraction)."""
    if budget.tokens is not None:
        return Budget(tokens=round(budget.tokens * factor))
    return Budget(ratio=1.0 - (1.0 - budget.ratio) * factor)
