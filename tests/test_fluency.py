"""Degenerate-reply checks (trainer/fluency.py) and where they act: the round's rewards and the gates."""

from __future__ import annotations

import math

from bot.store import ReplyRecord
from tests.trainer_helpers import add_rated, prompt_ids, seq_logprob, tiny_config, token_logps, trainer_config
from trainer.config import TrainerConfig
from trainer.data import DEGENERATE_REWARD, make_examples
from trainer.fluency import degenerate, repetition, symbol_spam
from trainer.gates import ProbeBaseline, judge
from trainer.learner import Learner
from trainer.round import run_round

SPAM = "Bella! 🌾🌼🌍⏏🌪🌪🌩🌪🌎🌬"
LOOP = "I am ok I am ok I am ok I am ok I am ok"
FINE = "Great idea! 😊 Let's go 👍"


def test_symbol_spam():
    assert symbol_spam("Bella! 🌾🌼🌍🌪🌪🌩")
    assert symbol_spam("Seremite! 😎👍👍👍👍")
    assert not symbol_spam(FINE)
    assert not symbol_spam("Plain text, naïve café — “quotes” and 3 × 4 = 12.")
    assert symbol_spam("cut off \ufffd\ufffd\ufffd\ufffd\ufffd")


def test_repetition():
    assert repetition("the quick brown fox jumps over the lazy dog") == 0.0
    assert repetition(LOOP) > 0.5
    assert repetition("") == 0.0
    # emoji strings are loops too, though they hold no spaces; one or two emoji are fine
    assert repetition("Seremite! 😎👍👍👍👍👍👍👍👍👍👍👍👍") > 0.5
    assert repetition(FINE) == 0.0


def test_degenerate_names_the_reason():
    assert degenerate(SPAM, 0.5) == "symbol spam"
    assert degenerate(LOOP, 0.5).startswith("word loop (repetition 0.")
    assert degenerate(FINE, 0.5) == ""
    assert degenerate(LOOP, 1.0) == ""          # the bound is the caller's


def _reply(i: int, text: str, reward: float) -> ReplyRecord:
    return ReplyRecord(id=i, platform="sim", channel_id="c", version=0, text=text, prompt_ids=[1, 2],
                       output_ids=[3, 4], logprobs=[-1.0, -1.0], temperature=0.8, top_p=0.95, created_at=0.0,
                       reward=reward, n_voters=3)


def test_a_liked_spam_reply_is_learned_from_as_disliked():
    replies = [_reply(1, SPAM, 1.0), _reply(2, FINE, 1.0), _reply(3, "Okay.", -1.0), _reply(4, LOOP, 1.0)]
    trusted = make_examples(replies, "mean")
    assert [e.reward for e in trusted] == [1.0, 1.0, -1.0, 1.0]
    assert trusted[0].advantage > 0 and not any(e.degenerate for e in trusted)

    guarded = make_examples(replies, "mean", punish_degenerate=True, max_repetition=0.5)
    assert [e.reward for e in guarded] == [DEGENERATE_REWARD, 1.0, -1.0, DEGENERATE_REWARD]
    assert [e.degenerate.split(" (")[0] for e in guarded] == ["symbol spam", "", "", "word loop"]
    mean = (DEGENERATE_REWARD * 2 + 1.0 - 1.0) / 4
    assert math.isclose(guarded[0].advantage, DEGENERATE_REWARD - mean, abs_tol=1e-6)
    assert guarded[0].advantage < 0 < guarded[1].advantage


def test_gate_rejects_emoji_spam_over_the_share():
    t = TrainerConfig(max_kl=0.5, max_spam_share=0.125, max_repetition=0.5)
    ok = judge([SPAM] + [FINE] * 7, 0.01, t)                     # one of eight is allowed
    assert ok.passed and ok.spam_share == 0.125
    bad = judge([SPAM, SPAM] + [FINE] * 6, 0.01, t)
    assert not bad.passed and bad.reason == "25% of probe replies are emoji spam > 12%"
    assert bad.as_metrics()["probe_spam_share"] == 0.25


def test_gate_order_and_other_failures():
    t = TrainerConfig(max_kl=0.5, max_spam_share=0.125, max_repetition=0.5, max_empty_share=0.25)
    assert judge([FINE] * 8, 0.9, t).reason == "KL 0.9 > 0.5"
    near = TrainerConfig(max_kl=0.1)     # just over the bound: enough digits to show it (was "KL 0.1 > 0.1")
    assert judge([FINE] * 8, 0.10024, near).reason == "KL 0.1002 > 0.1"
    assert judge([FINE] * 8, 0.1071, near).reason == "KL 0.11 > 0.1"
    assert judge([FINE] * 8, float("nan"), t).reason == "probe KL is not finite (nan)"
    assert judge([""] * 3 + [FINE] * 5, 0.01, t).reason.startswith("38% of probe replies empty")
    assert judge([LOOP] * 8, 0.01, t).reason.startswith("repetition 0.")


def test_gate_rejects_a_candidate_that_talks_worse_than_the_base():
    t = TrainerConfig(max_nll_increase=0.3, min_length_ratio=0.5)
    base = ProbeBaseline(nll=1.5, words=40.0)
    assert judge([FINE] * 8, 0.01, t, nll=1.75, words=30.0, baseline=base).passed
    worse = judge([FINE] * 8, 0.01, t, nll=1.9, words=30.0, baseline=base)
    assert not worse.passed and worse.reason == ("base-model NLL of the probe replies 1.90 is 0.40 nats/token above "
                                                 "the base's own 1.50 (> 0.3)")
    short = judge([FINE] * 8, 0.01, t, nll=1.5, words=12.0, baseline=base)
    assert not short.passed and short.reason == "probe replies average 12.0 words, under 50% of the base's 40.0"
    assert short.as_metrics()["probe_base_words"] == 40.0 and short.as_metrics()["probe_nll"] == 1.5
    assert judge([FINE] * 8, 0.01, t, nll=9.0, words=1.0).passed       # no baseline: no fluency check


async def test_a_round_learns_liked_spam_as_disliked(tmp_path, tiny_model_dir, store_for):
    """Every reply is liked; the two whose text is emoji spam are learned from as disliked, so the
    round makes their tokens less likely and says so in its summary."""
    cfg = tiny_config(tmp_path, tiny_model_dir)
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg, progress=False)
    learner.load()
    base, tok = learner.base, learner.tokenizer
    prompt = prompt_ids(tok, "hello there")
    fine = tok.encode(" yes sure great thanks", add_special_tokens=False) + [tok.eos_token_id]
    spam = tok.encode(" wow wow party time", add_special_tokens=False) + [tok.eos_token_id]
    for out, text in ((fine, FINE), (fine, FINE), (spam, SPAM), (spam, SPAM)):
        await add_rated(store, prompt, out, token_logps(base, prompt, out), 1.0, text=text)
    before = seq_logprob(base, prompt, spam)

    result = await run_round(store, cfg, tcfg, learner, use_all=True)

    assert result.status == "published", result.reason
    assert result.n_degenerate == 2
    assert result.summary().startswith("v1 published: 4 rated replies (2 degenerate, counted as disliked), "
                                       "mean reward +0.00")
    assert (await store.get_version(1)).metrics["n_degenerate"] == 2
    model = learner.candidate(await store.get_version(1), seed=0).model
    assert seq_logprob(model, prompt, spam) < before - 0.1
