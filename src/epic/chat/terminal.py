"""The terminal front end of `epic chat`: read questions and `/commands`, print streamed answers and cost lines."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from epic.chat.answers import ChatError
from epic.chat.session import FULL, ChatSession
from epic.compression.registry import method_names


def commands() -> tuple[tuple[str, str], ...]:
    """(usage, what it does) of every command between turns, the methods as the registry lists them."""
    return (
        ("/tokens N", "keep N visual tokens per image (the conversation starts over)"),
        ("/method NAME", f"compress with NAME ({', '.join(method_names())}, or {FULL}); starts over"),
        ("/image PATH", "talk about another image (starts over)"),
        ("/reset", "forget the conversation, keep the settings"),
        ("/help", "this list"),
        ("/quit", "leave (or Ctrl-D)"),
    )


def run_command(session: ChatSession, line: str) -> str:
    """Apply one `/command` to the session; the message to show. Raises `ChatError` on a bad command."""
    name, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    if name == "/reset":
        session.reset()
        return f"conversation reset ({session.settings()})"
    if name == "/help":
        return "\n".join(f"  {usage:<14} {what}" for usage, what in commands())
    if name in ("/tokens", "/method", "/image") and not argument:
        raise ChatError(
            f"{name} needs a value, e.g. "
            + {"/tokens": "/tokens 36", "/method": "/method fastv"}.get(name, "/image photo.png")
        )
    if name == "/tokens":
        try:
            tokens = int(argument)
        except ValueError:
            raise ChatError(f"/tokens takes a whole number, got {argument!r}") from None
        return session.set_tokens(tokens)
    if name == "/method":
        return session.set_method(argument)
    if name == "/image":
        return session.set_image(argument)
    raise ChatError(f"unknown command {name!r}; commands: {', '.join(usage.split()[0] for usage, _ in commands())}")


def chat_loop(session: ChatSession, read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> int:
    """Read questions and `/commands` until `/quit` or end of input; stream each answer, then its cost line.
    Errors are printed and the loop goes on; Ctrl-C stops an answer (and starts the conversation over)."""
    print(f"epic chat: {session.settings()}. /help lists the commands.", file=out)
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return 0
        if not line:
            continue
        if line == "/quit":
            return 0
        try:
            if line.startswith("/"):
                print(run_command(session, line), file=out)
                continue
            print("model> ", end="", file=out, flush=True)
            answer = session.ask(line, lambda piece: print(piece, end="", file=out, flush=True))
            print(f"\n{answer.cost.line()}", file=out, flush=True)
        except ChatError as error:
            print(f"error: {error}", file=out, flush=True)
        except KeyboardInterrupt:
            print(f"\n(answer interrupted; the conversation starts over: {session.settings()})", file=out, flush=True)
