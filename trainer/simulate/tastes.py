"""Hidden tastes of the simulated people: ``--taste short | regex:PATTERN | python:module:function``."""

from __future__ import annotations

import importlib
import random
import re
from dataclasses import dataclass
from typing import Callable

SHORT_WORDS = 20


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class Taste:
    """A hidden preference: ``score(text)`` in [-1, 1]; liked when > 0."""

    spec: str
    score: Callable[[str], float]

    def liked(self, text: str) -> bool:
        return self.score(text) > 0

    def p_up(self, text: str) -> float:
        """Probability that one voter puts 👍 (before the flip)."""
        return (self.score(text) + 1.0) / 2.0


def _as_score(value) -> float:
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, (int, float)):
        return max(-1.0, min(1.0, float(value)))
    raise TypeError(f"a taste must return bool or a number in [-1, 1], got {type(value).__name__} ({value!r})")


def parse_taste(spec: str) -> Taste:
    """``short`` | ``coin`` | ``regex:PATTERN`` | ``python:module:function`` (see the package docstring)."""
    if spec == "coin":       # the random-votes control: a fair coin per reply text, nothing to learn
        return Taste(spec, lambda t: _as_score(random.Random(f"coin|{t}").random() < 0.5))
    if spec == "short":
        return Taste(spec, lambda t: _as_score(0 < word_count(t) < SHORT_WORDS))
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        try:
            rx = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"--taste {spec!r}: bad regular expression ({e})") from None
        return Taste(spec, lambda t: _as_score(rx.search(t) is not None))
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise ValueError(f"--taste {spec!r}: write python:module:function, e.g. python:mytastes:likes_cats")
        try:
            fn = getattr(importlib.import_module(parts[1]), parts[2])
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--taste {spec!r}: cannot load {parts[1]}.{parts[2]} ({e})") from None
        return Taste(spec, lambda t: _as_score(fn(t)))
    raise ValueError(f"--taste {spec!r}: use short, coin, regex:PATTERN or python:module:function")

