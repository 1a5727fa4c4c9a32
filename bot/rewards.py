"""Emoji → reward, and how votes add up. Pure functions, no I/O.

The rule (also in the README):
- each emoji in the map has a value in [-1, 1] (default 👍 = +1, 👎 = -1);
- a user's vote on a reply is the sum of the values of the distinct mapped emoji they
  put on it, clipped to [-1, 1] (👍 and 👎 together cancel out);
- a reply's reward is the mean of its voters' values; a reply with no voter is unrated.
Removing a reaction removes its part. Skin tones and Slack's names (+1, thumbsup, ...)
count as the emoji they stand for.
"""

from __future__ import annotations

from typing import Iterable

THUMBS_UP = "\N{THUMBS UP SIGN}"
THUMBS_DOWN = "\N{THUMBS DOWN SIGN}"
DEFAULT_MAP = {THUMBS_UP: 1.0, THUMBS_DOWN: -1.0}

# Slack sends short names; these are the ones people use to vote.
SLACK_NAMES = {
    "+1": THUMBS_UP, "thumbsup": THUMBS_UP, "thumbs_up": THUMBS_UP,
    "-1": THUMBS_DOWN, "thumbsdown": THUMBS_DOWN, "thumbs_down": THUMBS_DOWN,
    "heart": "\N{HEAVY BLACK HEART}", "tada": "\N{PARTY POPPER}", "joy": "\N{FACE WITH TEARS OF JOY}",
    "fire": "\N{FIRE}", "rage": "\N{POUTING FACE}", "confused": "\N{CONFUSED FACE}",
}
_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_VARIATION_SELECTORS = {"\ufe0e", "\ufe0f"}


def canonical(emoji: str) -> str:
    """One spelling per emoji: Slack names → unicode, skin tones and variation selectors dropped."""
    name = emoji.strip()
    if name.startswith(":") and name.endswith(":") and len(name) > 2:
        name = name[1:-1]
    name = name.split("::skin-tone-")[0]          # Slack: "+1::skin-tone-3"
    name = SLACK_NAMES.get(name, name)
    return "".join(ch for ch in name if ch not in _SKIN_TONES and ch not in _VARIATION_SELECTORS)


class RewardMap:
    """Looks up the value of a (possibly oddly spelled) emoji."""

    def __init__(self, mapping: dict[str, float] | None = None):
        self.values = {canonical(k): float(v) for k, v in (mapping or DEFAULT_MAP).items()}

    def value(self, emoji: str) -> float | None:
        """The emoji's reward value, or None when it is not a voting emoji."""
        return self.values.get(canonical(emoji))

    @property
    def seed_emoji(self) -> list[str]:
        """Emoji the bot adds to its own replies: the best and the worst valued ones."""
        if not self.values:
            return []
        best = max(self.values, key=self.values.get)
        worst = min(self.values, key=self.values.get)
        return [best] if best == worst else [best, worst]


def user_value(values: Iterable[float]) -> float:
    """A user's vote: the sum of their distinct emoji values, clipped to [-1, 1]."""
    return max(-1.0, min(1.0, sum(values)))


def reply_reward(votes: Iterable[tuple[str, str, float]]) -> float | None:
    """Mean of the per-user values over (user, emoji, value) rows; None without votes."""
    per_user: dict[str, dict[str, float]] = {}
    for user, emoji, value in votes:
        per_user.setdefault(user, {})[emoji] = value
    if not per_user:
        return None
    return sum(user_value(v.values()) for v in per_user.values()) / len(per_user)
