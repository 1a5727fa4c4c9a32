"""No one steers a round alone: the per-user cap on a round's vote weight."""

from __future__ import annotations

import pytest

from bot.chat import ChatCore
from tests.trainer_helpers import prompt_ids, tiny_config, token_logps, trainer_config
from trainer.data import make_examples
from trainer.influence import min_voters, user_factors, weigh
from trainer.learner import Learner
from trainer.round import run_round

UP, DOWN = "\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"


def test_water_filling_caps_each_share():
    mass = {"mallory": 300.0, **{f"p{i}": 4.0 for i in range(6)}}
    f = user_factors(mass, 0.2)
    weight = {u: mass[u] * f[u] for u in mass}
    total = sum(weight.values())
    assert weight["mallory"] / total == pytest.approx(0.2)
    assert all(f[f"p{i}"] == 1.0 for i in range(6))                  # the others keep their full weight
    # two heavy voters: both capped, the light ones untouched
    f2 = user_factors({"a": 100.0, "b": 80.0, "c": 5.0, "d": 5.0, "e": 5.0, "g": 5.0}, 0.2)
    w2 = {"a": 100 * f2["a"], "b": 80 * f2["b"], "c": 5.0, "d": 5.0, "e": 5.0, "g": 5.0}
    assert w2["a"] / sum(w2.values()) == pytest.approx(0.2) and w2["b"] / sum(w2.values()) == pytest.approx(0.2)
    assert user_factors({"a": 3.0, "b": 1.0}, 0.2) == {"a": 1 / 3, "b": 1.0}     # too few: equal weights
    assert min_voters(0.2) == 5 and min_voters(0.25) == 4 and min_voters(1.0) == 1


async def _rate(store, tok, base, n, voter, liked, platform="discord", tag=""):
    ids = []
    for i in range(n):
        p = prompt_ids(tok, f"{tag} question {i}")
        out = tok.encode(" yes sure" if liked else " no bad", add_special_tokens=False) + [tok.eos_token_id]
        rid = await store.add_reply(platform, "c", None, 0, "x", p, out, token_logps(base, p, out), 0.8, 0.95, 12)
        await store.set_vote(rid, voter, UP if liked else DOWN, 1.0 if liked else -1.0)
        ids.append(rid)
    return ids


async def test_one_person_voting_on_hundreds_of_replies_carries_at_most_the_cap(tmp_path, tiny_model_dir,
                                                                                 store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1, "window": 1000})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    tok, base = learner.tokenizer, learner.base
    mallory = await _rate(store, tok, base, 300, "mallory", liked=True, tag="m")
    for k in range(6):                                              # six other people, two votes each
        await _rate(store, tok, base, 2, f"person{k}", liked=k % 2 == 0, tag=f"p{k}")
    replies = await store.rated_replies(1e12)
    votes = await store.user_votes([r.id for r in replies])
    examples = make_examples(replies, "mean", weights=weigh(replies, votes, tcfg.max_user_share))
    total = sum(e.weight for e in examples)
    theirs = sum(e.weight for e in examples if e.reply_id in set(mallory))
    assert theirs / total == pytest.approx(0.2, abs=1e-6)            # 300 of 312 replies, 20% of the weight
    push = sum(abs(e.advantage) for e in examples if e.reply_id in set(mallory))
    uncapped = make_examples(replies, "mean")
    assert push < 0.25 * sum(abs(e.advantage) for e in uncapped if e.reply_id in set(mallory))
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "published"


async def test_a_round_with_too_few_voters_is_skipped_and_status_says_why(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    for k in range(3):
        await _rate(store, learner.tokenizer, learner.base, 4, f"person{k}", liked=k == 0, tag=str(k))
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "skipped" and result.reason.startswith("3 distinct voters on 12 settled rated replies")
    assert "needs at least 5" in result.reason

    class NoPolicy:                                                 # /status reads the store only
        active_version = 0

    status = await ChatCore(cfg, store, NoPolicy()).status_text()
    assert f"Last round: skipped ({result.reason})" in status
    # the console playground (one person by nature) is exempt
    cfg2 = tiny_config(tmp_path / "console", tiny_model_dir, trainer={"epochs": 1})
    store2 = await store_for(cfg2)
    for liked in (True, False):
        await _rate(store2, learner.tokenizer, learner.base, 3, "you", liked=liked, platform="console",
                    tag=str(liked))
    assert (await run_round(store2, cfg2, trainer_config(cfg2), learner, use_all=True)).status == "published"
