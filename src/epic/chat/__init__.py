"""Talk to a LLaVA model about an image, compressed.

`ChatSession` (`epic.chat.session`) is the library part: a conversation under a compression that keeps its KV cache
across turns, streams greedy answers and reports each one's `Cost`; it reads no input and prints nothing, and
`epic web` builds on it. `epic.chat.terminal` is the front end of `epic chat` (reading lines, `/commands`,
printing). `open_image` reads a named or uploaded image file within limits.
"""

from epic.chat.answers import Answer, ChatError, Cost, format_bytes
from epic.chat.image_files import open_image
from epic.chat.session import FULL, ChatSession

__all__ = ["FULL", "Answer", "ChatError", "ChatSession", "Cost", "format_bytes", "open_image"]
