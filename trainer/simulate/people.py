"""The simulated people: prompts they ask the bot (all at once, one batch) and their votes."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path

from bot.events import Message, Reaction
from bot.rewards import THUMBS_DOWN, THUMBS_UP

from .tastes import Taste

PROMPTS_FILE = Path(__file__).parent.with_name("prompts.txt")   # trainer/prompts.txt
PLATFORM = "sim"
CHANNEL = "sim-channel"

# Display names of the simulated people who ask (the chat core puts "Name: text" in the prompt).
NAMES = ["Alex", "Sam", "Priya", "Jordan", "Mia", "Leo", "Aisha", "Noah", "Chen", "Lucia", "Omar", "Emma",
         "Kai", "Sofia", "Ravi", "Hannah", "Mateo", "Yuki", "Ben", "Zara", "Ivan", "Grace", "Tomás", "Nina",
         "Femi", "Clara", "Jonas", "Lina", "Hugo", "Maya", "Eli", "Rosa"]


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def sample_prompts(rng: random.Random, prompts: list[str], n: int) -> list[str]:
    """n prompts, without repeats while the pool lasts."""
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(prompts, min(len(prompts), n - len(out)))
    return out


def eval_extra_prompts(prompts: list[str], round1: list[str], n: int, seed: int) -> list[str]:
    """n evaluation prompts besides round 1's, different from them while the pool lasts."""
    rest = [p for p in prompts if p not in set(round1)]
    return random.Random(seed + 2).sample(rest, min(n, len(rest)))


@dataclass
class Asked:
    prompt: str
    platform_message_id: str | None = None   # the fake id of the bot's reply message
    sent_text: str = ""
    reply_id: int | None = None


async def ask_all(core, prompts: list[str], tag: str) -> list[Asked]:
    """Send every prompt to the bot at once through ChatCore.on_message; one generation batch."""
    asked = [Asked(p) for p in prompts]

    def sender(a: Asked, pid: str):
        async def send(text: str) -> list[str]:
            a.sent_text, a.platform_message_id = text, pid
            return [pid]
        return send

    async def one(i: int, a: Asked) -> None:
        msg = Message(platform=PLATFORM, message_id=f"{tag}-m{i}", channel_id=CHANNEL, author_id=f"sim-asker-{i}",
                      author_name=NAMES[i % len(NAMES)], text=a.prompt, mentions_bot=True)
        a.reply_id = await core.on_message(msg, [], sender(a, f"{tag}-r{i}"))

    release = core.policy.pause()      # the requests queued meanwhile form one batch
    tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(asked)]
    deadline = time.monotonic() + 60
    try:
        while (core.policy.waiting < len(tasks) and not all(t.done() for t in tasks)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
    finally:
        release.set()
    await asyncio.gather(*tasks)
    return asked


@dataclass
class Vote:
    asked: Asked
    user_id: str
    up: bool


@dataclass
class Voters:
    """Who votes on the bot's replies, and how.

    Dense (``vote_rate`` None): every reply gets ``voters`` votes from distinct people.
    Sparse: each reply gets one vote with probability ``vote_rate``, from one person drawn
    from a crowd of ``crowd``; the first ``round(dissent * crowd)`` of them vote by a random
    taste of their own (a coin per person and reply) instead of the crowd's. Every vote is
    flipped with probability ``flip``; a share ``late`` of the sparse votes arrives only after
    the next round has begun (``vote_all`` returns them; the caller casts them later)."""

    taste: Taste
    flip: float
    rng: random.Random
    voters: int = 3
    vote_rate: float | None = None
    crowd: int = 20
    dissent: float = 0.0
    late: float = 0.0

    def dissents(self, person: int) -> bool:
        return person < round(self.dissent * self.crowd)

    def _up(self, person_id: str, text: str, dissenter: bool) -> bool:
        p_up = 0.5 if dissenter else self.taste.p_up(text)
        liked = (random.Random(f"{person_id}|{text}").random() < 0.5) if dissenter else self.rng.random() < p_up
        return liked != (self.rng.random() < self.flip)

    def votes_for(self, a: Asked) -> list[Vote]:
        if self.vote_rate is None:
            return [Vote(a, f"sim-voter-{k}", self._up(f"sim-voter-{k}", a.sent_text, False))
                    for k in range(self.voters)]
        if self.rng.random() >= self.vote_rate:
            return []
        person = self.rng.randrange(self.crowd)
        return [Vote(a, f"sim-person-{person}", self._up(f"sim-person-{person}", a.sent_text, self.dissents(person)))]


async def cast(core, votes: list[Vote]) -> int:
    """Put each vote on its reply's message through ChatCore.on_reaction; how many were cast."""
    for v in votes:
        outcome = await core.on_reaction(Reaction(
            platform=PLATFORM, channel_id=CHANNEL, message_id=v.asked.platform_message_id, user_id=v.user_id,
            emoji=THUMBS_UP if v.up else THUMBS_DOWN, added=True))
        if outcome != "added":
            raise RuntimeError(f"vote on reply #{v.asked.reply_id} was not recorded: {outcome}")
    return len(votes)


async def vote_all(core, asked: list[Asked], voters: Voters) -> tuple[int, list[Vote]]:
    """The votes on ``asked`` that come now (cast here) and those that come late (returned)."""
    now, late = [], []
    for a in asked:
        if a.reply_id is None:
            continue
        for v in voters.votes_for(a):
            (late if voters.vote_rate is not None and voters.rng.random() < voters.late else now).append(v)
    return await cast(core, now), late
