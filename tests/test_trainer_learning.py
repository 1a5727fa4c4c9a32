"""The trainer's round on a tiny random model: data layout, learning direction, aborts, gates."""

from __future__ import annotations

import json
import re
import threading
import time

import pytest
import torch

from bot.chat import ChatCore
from bot.events import Message
from bot.models import load_model_and_tokenizer, sha256_file
from bot.policy import Policy, Turn
from tests.trainer_helpers import (CONSOLE, add_rated, prompt_ids, seq_logprob, tiny_config,
                                   token_logps, trainer_config)
from trainer.data import collate, make_examples, reply_logits, tempered
from trainer.gates import PROBES, probe_kl, render_prompt
from trainer.loss import token_logprobs
from trainer.learner import Learner
from trainer.round import run_round

GOOD = " yes sure great thanks"
BAD = " no bad bye"
PROMPTS = ["hello there", "what is the weather like", "tell me a joke", "how are you today"]


async def seed_preferences(store, model, tok, copies: int = 2):
    """Two fixed replies to each prompt: GOOD always liked, BAD always disliked. Behaviour
    logprobs come from the base model, as if v0 had sampled them."""
    good = tok.encode(GOOD, add_special_tokens=False) + [tok.eos_token_id]
    bad = tok.encode(BAD, add_special_tokens=False) + [tok.eos_token_id]
    prompts = [prompt_ids(tok, t) for t in PROMPTS]
    for p in prompts:
        for out, reward in ((good, 1.0), (bad, -1.0)):
            for _ in range(copies):
                await add_rated(store, p, out, token_logps(model, p, out), reward)
    return prompts, good, bad


async def test_recomputed_logprobs_equal_recorded_ones(tmp_path, tiny_model_dir, store_for):
    """The batch layout reproduces the bot's sampling distribution exactly (ratio 1 before any
    step), for replies of different lengths, prompt lengths and temperatures in one batch."""
    cfg = tiny_config(tmp_path, tiny_model_dir)
    store = await store_for(cfg)
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), tmp_path, "float32")
    for temperature in (0.5, 1.3):
        policy = Policy(model, tok, temperature=temperature, top_p=0.9, max_new_tokens=12, system_prompt="Be brief.")
        try:
            texts = ["hi", "what is the weather like today near the river bank?", "tell me a joke about cats"]
            gens = await policy.generate_many([policy.build_prompt([Turn("user", t)]) for t in texts])
        finally:
            policy.close()
        for g in gens:
            rid = await store.add_reply("console", "c", None, g.version, g.text, g.prompt_ids, g.output_ids,
                                        g.logprobs, g.temperature, g.top_p, g.max_new_tokens)
            await store.set_vote(rid, "u", "\N{THUMBS UP SIGN}", 1.0)
    examples = make_examples(await store.rated_replies(time.time()), "mean")
    assert len(examples) == 6 and {e.temperature for e in examples} == {0.5, 1.3}
    assert len({len(e.prompt_ids) for e in examples}) > 1
    batch = collate(examples, tok.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs(tempered(reply_logits(model, batch), batch.temperature), batch.targets)
    diff = ((logp - batch.behaviour_logp).abs() * batch.mask).max()
    assert float(diff) < 1e-4
    # advantages: reward - mean over the whole round (all liked → all zero)
    assert torch.equal(batch.advantages, torch.zeros(6))


@pytest.mark.parametrize("kl_estimator", ["full", "k3"])
async def test_round_makes_liked_reply_likelier_and_disliked_less_likely(tmp_path, tiny_model_dir, store_for,
                                                                         kl_estimator):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"kl_estimator": kl_estimator})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    base, tok = learner.base, learner.tokenizer
    prompts, good, bad = await seed_preferences(store, base, tok)
    before = {(i, k): seq_logprob(base, p, o) for i, p in enumerate(prompts) for k, o in (("good", good), ("bad", bad))}
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    result = await run_round(store, cfg, tcfg, learner, use_all=True)

    assert result.status == "published", result.reason
    assert (result.version, result.parent, result.n_replies) == (1, 0, 16)
    assert re.match(r"v1 published: 16 rated replies \+ \d+ explored samples, mean reward \+0\.00, KL ",
                    result.summary())
    assert await store.active_version() == 1
    # the published adapter, loaded back through the verified path the trainer uses to continue
    cand = learner.candidate(await store.get_version(1), seed=0)
    model, kind, reference, note = cand.model, cand.kind, cand.reference, cand.note
    assert (kind, reference, note) == ("lora", None, "continuing v1 (lora)")
    for i, p in enumerate(prompts):
        assert seq_logprob(model, p, good) > before[(i, "good")] + 0.1
        assert seq_logprob(model, p, bad) < before[(i, "bad")] - 0.1
        with model.disable_adapter():   # the reference did not move
            assert seq_logprob(model, p, good) == pytest.approx(before[(i, "good")], abs=1e-4)
            assert seq_logprob(model, p, bad) == pytest.approx(before[(i, "bad")], abs=1e-4)
    # parameters changed: LoRA B starts at zero, so any non-zero B is learning
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.detach().abs().sum()) > 0 for p in lora_b)
    # the cached base model was not touched by the round
    assert all(torch.equal(base_state[k], v) for k, v in learner.base.state_dict().items())

    v = await store.get_version(1)
    meta = json.loads((cfg.versions_dir / "v0001" / "meta.json").read_text())
    assert meta["kind"] == "lora" and meta["parent"] == 0 and meta["version"] == 1
    assert meta["sha256"] == v.sha256 == sha256_file(cfg.versions_dir / "v0001" / meta["weights_file"])
    assert sorted(meta["reply_ids"]) == list(range(1, 17)) and meta["trainer"]["lr"] == tcfg.lr
    assert v.metrics["last_reply_id"] == 16 and await store.last_trained_reply_id() == 16
    assert v.metrics["first_ratio"] == pytest.approx(1.0, abs=1e-3)   # behaviour = v0 = start: ratio 1
    rounds = await store.rounds()
    assert [(r["status"], r["version"], r["n_replies"]) for r in rounds] == [("published", 1, 16)]

    # a second round continues from v1
    again = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert again.status == "published" and (again.version, again.parent) == (2, 1)
    assert (await store.get_version(2)).metrics["start"] == "continuing v1 (lora)"


async def test_fewer_than_two_rated_replies_skip(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    store = await store_for(cfg)
    await add_rated(store, [1, 2, 3], [4, 5], [-1.0, -1.0], 1.0)
    result = await run_round(store, cfg, trainer_config(cfg), Learner(cfg, trainer_config(cfg)), use_all=True)
    assert result.status == "skipped" and "need at least 2" in result.reason
    assert result.summary().startswith("no round: 1 settled rated replies")
    assert [r["status"] for r in await store.rounds()] == ["skipped"]


async def test_identical_rewards_carry_no_signal_and_skip(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    store = await store_for(cfg)
    for _ in range(3):
        await add_rated(store, [1, 2, 3], [4, 5], [-1.0, -1.0], 1.0)
    result = await run_round(store, cfg, trainer_config(cfg), Learner(cfg, trainer_config(cfg)), use_all=True)
    assert result.status == "skipped" and "same reward (+1.00)" in result.reason
    assert [v.id for v in await store.versions()] == [0]


async def test_unsettled_replies_wait_unless_use_all(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"settle_seconds": 3600.0})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    for r in (1.0, -1.0, 1.0):
        await add_rated(store, [1, 2, 3], [4, 5], [-1.0, -1.0], r)
    learner = Learner(cfg, tcfg)
    assert (await run_round(store, cfg, tcfg, learner)).status == "skipped"
    assert (await run_round(store, cfg, tcfg, learner, use_all=True)).status == "published"


async def test_nan_aborts_the_round_and_publishes_nothing(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_preferences(store, learner.base, learner.tokenizer, copies=1)
    with torch.no_grad():
        learner.base.model.norm.weight.fill_(float("nan"))     # a broken base: every logit is NaN
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "failed" and "nan" in result.reason and not result.interrupted
    assert [v.id for v in await store.versions()] == [0] and await store.active_version() == 0
    assert not cfg.versions_dir.exists() or not any(cfg.versions_dir.iterdir())
    assert (await store.rounds())[0]["status"] == "failed"


async def test_stop_event_aborts_mid_training(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1000})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_preferences(store, learner.base, learner.tokenizer, copies=1)
    stop = threading.Event()
    threading.Timer(1.0, stop.set).start()
    result = await run_round(store, cfg, tcfg, learner, use_all=True, stop=stop)
    assert result.status == "failed" and result.interrupted and "interrupted (stopped at epoch" in result.reason
    assert [v.id for v in await store.versions()] == [0]
    assert not cfg.versions_dir.exists() or not any(cfg.versions_dir.iterdir())


async def test_gate_rejects_a_candidate_that_drifts_too_far(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"max_kl": 1e-9, "kl_target_share": 0.0})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_preferences(store, learner.base, learner.tokenizer, copies=1)
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "rejected" and result.version == 1
    assert result.summary().startswith("v1 rejected: KL ") and result.summary().endswith(" > 1e-09")
    v = await store.get_version(1)
    assert v.status == "rejected" and v.reason == result.reason and v.path is None
    assert await store.active_version() == 0 and await store.last_trained_reply_id() == 0
    assert not (cfg.versions_dir / "v0001").exists()
    assert not cfg.versions_dir.exists() or not any(cfg.versions_dir.iterdir())


async def test_full_finetune_round_publishes_weights_the_bot_serves(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"full_finetune": True, "lr": 1e-3, "epochs": 2})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    prompts, good, bad = await seed_preferences(store, learner.base, learner.tokenizer, copies=1)
    before = seq_logprob(learner.base, prompts[0], good)
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "published", result.reason
    assert json.loads((cfg.versions_dir / "v0001" / "meta.json").read_text())["kind"] == "full"
    assert seq_logprob(learner.base, prompts[0], good) == before          # the reference copy is untouched
    policy = Policy.from_config(cfg)
    try:
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        assert policy.active_version == 1 and not core.serving_error
        sent = []

        async def send(text):
            sent.append(text)
            return ["p1"]

        rid = await core.on_message(Message("console", "m1", "c", "u", "u", "hello", **CONSOLE), [], send)
        assert (await store.get_reply(rid)).version == 1
    finally:
        policy.close()
    again = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert again.status == "published" and (await store.get_version(2)).metrics["start"] == "continuing v1 (full)"


def test_gate_pieces(tmp_path, tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), tmp_path, "float32")
    policy = Policy(model, tok, system_prompt="Be brief.")
    try:   # probes are rendered exactly like the bot renders a one-message conversation
        for text in PROBES:
            assert render_prompt(tok, "Be brief.", text) == policy.build_prompt([Turn("user", text)])
    finally:
        policy.close()
    prompts = [render_prompt(tok, "", p) for p in PROBES[:2]]
    replies = [tok.encode(" hello there", add_special_tokens=False), []]
    assert probe_kl(model, model, prompts, replies, 0.8, tok.pad_token_id)[0] == pytest.approx(0.0, abs=1e-6)
