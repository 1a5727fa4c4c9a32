"""No single person steers a round: each voter's share of the round's vote weight is capped.

    w = weigh(replies, votes, max_share=0.2)      # reply id → Weighted(reward, weight)

Each rated reply carries a mass of 1, shared by its voters (a reply with two voters gives
each ½); a person's mass is the sum over the replies they voted on. A person whose mass is
over ``max_share`` of the round's total is scaled down to exactly that share (water-filling:
capping the heaviest lowers the total, so repeat until nobody is over). A reply's reward is
then its voters' weighted mean vote, and its weight the sum of their scaled shares (1 when
nobody was capped), which scales its advantage in the loss and its weight in the reward
model's fit.

A round needs at least ``min_voters(max_share)`` distinct voters (5 for 0.2): with fewer,
someone must carry more than the cap. Replies on an exempt platform (the console
playground: one person by nature) are not capped and need no crowd.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from bot.store import ReplyRecord

EXEMPT_PLATFORMS = frozenset({"console"})


@dataclass(frozen=True)
class Weighted:
    reward: float
    weight: float


def min_voters(max_share: float) -> int:
    """The fewest distinct voters that can share a round with nobody above ``max_share``."""
    return math.ceil(1.0 / max_share - 1e-9)


def user_factors(mass: dict[str, float], max_share: float) -> dict[str, float]:
    """Per person, the factor in (0, 1] that brings their share of the total mass to at most
    ``max_share``. With too few people for the cap, everyone ends with the same weight."""
    capped: set[str] = set()
    while True:
        free = sum(m for u, m in mass.items() if u not in capped)
        room = 1.0 - len(capped) * max_share
        if room <= 1e-12 or free <= 0:          # everyone capped: equal weights
            level = min(mass.values())
            return {u: level / m for u, m in mass.items()}
        level = max_share * free / room          # the cap, as a mass, given who is capped
        over = {u for u, m in mass.items() if u not in capped and m > level + 1e-12}
        if not over:
            return {u: (min(1.0, level / m) if u in capped else 1.0) for u, m in mass.items()}
        capped |= over


def weigh(replies: Sequence[ReplyRecord], votes: dict[int, list[tuple[str, float]]],
          max_share: float, exempt: Iterable[str] = EXEMPT_PLATFORMS) -> dict[int, Weighted]:
    """Reward and weight per reply id (module docstring). ``votes``: reply id → [(user, vote)],
    one clipped vote per user (``Store.user_votes``)."""
    exempt = set(exempt)
    mass: dict[str, float] = defaultdict(float)
    for r in replies:
        if r.platform not in exempt:
            for user, _ in votes.get(r.id, []):
                mass[user] += 1.0 / len(votes[r.id])
    factor = user_factors(dict(mass), max_share) if mass else {}
    out = {}
    for r in replies:
        vs = votes.get(r.id, [])
        if not vs:
            continue
        f = [1.0 if r.platform in exempt else factor[u] for u, _ in vs]
        out[r.id] = Weighted(sum(fi * v for fi, (_, v) in zip(f, vs)) / sum(f), sum(f) / len(vs))
    return out


def distinct_voters(replies: Sequence[ReplyRecord], votes: dict[int, list[tuple[str, float]]],
                    exempt: Iterable[str] = EXEMPT_PLATFORMS) -> int | None:
    """How many people voted on the non-exempt replies (None when all are exempt)."""
    exempt = set(exempt)
    counted = [r for r in replies if r.platform not in exempt]
    if not counted:
        return None
    return len({u for r in counted for u, _ in votes.get(r.id, [])})
