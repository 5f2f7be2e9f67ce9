"""What a chat gives back: an answer with its `Cost`, and `ChatError` for a bad setting or input."""

from __future__ import annotations

from dataclasses import dataclass


class ChatError(ValueError):
    """A bad setting or input; the message names what is wrong (the front ends show it as one line)."""


@dataclass(frozen=True)
class Cost:
    """What one answer cost: the prefill of its new tokens, the decoding steps and the cache left behind."""

    kept: int  # visual tokens kept past layer K
    total: int  # visual tokens of the image
    prefill_tokens: int  # tokens fed by this turn's prefill (the whole prompt at the first turn, new text later)
    prefill_seconds: float
    cache_bytes: int  # key and value tensors of the KV cache after the answer
    decode_tokens: int  # tokens produced by decoding steps (the first one comes from the prefill)
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float | None:
        """Decoding speed (one token per step), None when the answer took no decoding step."""
        return self.decode_tokens / self.decode_seconds if self.decode_tokens and self.decode_seconds > 0 else None

    def line(self) -> str:
        """One line: kept/total visual tokens, prefill ms (and tokens), KV cache size, decoding tokens/s."""
        speed = self.tokens_per_second
        return (
            f"[kept {self.kept}/{self.total} visual tokens | prefill {self.prefill_seconds * 1e3:.1f} ms "
            f"({self.prefill_tokens} tokens) | KV cache {format_bytes(self.cache_bytes)} | "
            + (f"{speed:.1f} tokens/s]" if speed is not None else "- tokens/s]")
        )


@dataclass(frozen=True)
class Answer:
    """One answer's text, as streamed, and what it cost."""

    text: str
    cost: Cost


def format_bytes(count: int) -> str:
    """`123 B`, `45.6 KiB`, `7.8 MiB`, `1.2 GiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"
