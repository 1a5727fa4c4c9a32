"""Auto-rollback: the test's numbers, and a version the simulated people dislike rolled back."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random

import pytest

from bot.chat import ChatCore
from bot.policy import Policy
from tests.trainer_helpers import tiny_config, trainer_config
from trainer.learner import Learner
from trainer.rollback import check_rollback, one_sided_p
from trainer.round import run_round
from trainer.simulate.people import PLATFORM, Voters, ask_all, vote_all
from trainer.simulate.tastes import parse_taste


def never(text: str) -> bool:
    return False


def test_one_sided_p():
    z, p = one_sided_p(50, 0.2, 50, 0.5)
    # pooled 0.35: z = -0.3 / sqrt(0.35 * 0.65 * (1/50 + 1/50)) = -3.1449, p = Phi(z) = 0.00083
    assert z == pytest.approx(-3.1449, abs=1e-3) and p == pytest.approx(0.00083, abs=1e-5)
    assert one_sided_p(40, 0.5, 40, 0.5) == (0.0, 0.5)
    assert one_sided_p(40, 0.6, 40, 0.3)[1] > 0.99          # liked more: no evidence of worse
    assert one_sided_p(10, 1.0, 10, 1.0) == (0.0, 1.0)      # everyone liked both


async def _serve_and_vote(core, voters, n: int, tag: str) -> None:
    asked = await ask_all(core, [f"question {tag} {i}?" for i in range(n)], tag)
    await vote_all(core, asked, voters)


async def test_a_version_people_dislike_is_rolled_back(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1, "rollback_min_rated": 12},
                      serving={"engine": "torch", "batch_size": 12, "queue_size": 32, "poll_seconds": 0.05},
                      chat={"rate_limit_per_minute": 0})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    policy = await asyncio.to_thread(Policy.from_config, cfg)
    try:
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        # v0 serves; a crowd votes at random (about half liked); a round publishes v1
        await _serve_and_vote(core, Voters(parse_taste("coin"), 0.0, random.Random(0), vote_rate=1.0, crowd=5),
                              12, "a")
        result = await run_round(store, cfg, tcfg, Learner(cfg, tcfg), use_all=True)
        assert result.status == "published" and await store.active_version() == 1
        assert await check_rollback(store, tcfg) is None        # v1 has no votes yet
        await core.sync_version()
        # v1 serves, and the people dislike everything it says
        await _serve_and_vote(core, Voters(parse_taste("python:tests.test_rollback:never"), 0.0, random.Random(1),
                                           vote_rate=1.0, crowd=5), 12, "b")
        rated = await store.rating_by_version()
        assert rated[1] == (12, 0.0) and rated[0][0] == 12 and rated[0][1] > 0.2
        off = dataclasses.replace(tcfg, auto_rollback=False)
        assert await check_rollback(store, off) is None and await store.active_version() == 1
        decision = await check_rollback(store, tcfg)
        assert decision is not None and (decision.version, decision.parent) == (1, 0)
        assert decision.p_value < tcfg.rollback_p and decision.z < 0
        assert await store.active_version() == 0
        recorded = json.loads(await store.get_state("auto_rollback:v1"))
        assert recorded["p_value"] == decision.p_value
        # said where results are posted: the channel of v1's replies
        posted = []

        async def post(channel, text):
            posted.append((channel, text))

        assert await core.post_results({PLATFORM: post}) == 1
        assert posted == [("sim-channel", f"Auto-rollback: {decision.message()}")]
        await core.sync_version()
        assert policy.active_version == 0                       # the bot hot-swapped back
        # an admin who activates v1 again on purpose is not overruled by the same numbers
        await store.activate(1)
        assert await check_rollback(store, tcfg) is None and await store.active_version() == 1
    finally:
        policy.close()
