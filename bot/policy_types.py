"""What the chat core and the policy say to each other, importable without the model stack.

The chat core (``bot/chat.py``) is handed a policy and never imports torch: it only needs
these types and the :class:`PolicyLike` protocol, which ``bot.policy.Policy`` implements.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol


class Busy(Exception):
    """The generation queue is full; tell the person to try again shortly."""


class VersionError(Exception):
    """A version's files are missing, corrupt or do not fit the base model."""


@dataclass
class Turn:
    role: str          # "user" or "assistant"
    text: str
    name: str = ""     # shown before user text in group chats


@dataclass
class Generation:
    text: str
    prompt_ids: list[int]
    output_ids: list[int]          # sampled tokens, the end-of-turn token included when sampled
    logprobs: list[float]          # one per output id
    version: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seconds: float = 0.0


class PolicyLike(Protocol):
    """The part of the policy the chat core uses (``bot.policy.Policy`` is the real one)."""

    active_version: int

    async def generate(self, turns: list[Turn], on_partial: Callable[[str], None] | None = None) -> Generation:
        """Sample a reply. ``on_partial(text_so_far)``, when given, is called on the event loop
        thread as the reply grows (decoded so far, special tokens skipped, stripped), never after
        ``generate`` returns; it must be cheap (the caller paces what it does with the text)."""

    def is_loaded(self, version: int) -> bool: ...

    async def install_version(self, version: int, path: str | Path, sha256: str) -> None: ...

    def activate(self, version: int) -> None: ...
