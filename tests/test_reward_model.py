"""The reward model learned from votes, and the trainer's own exploration samples (RLOO)."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load, save

from bot import versions
from tests.trainer_helpers import seed_rated, tiny_config, token_logps, trainer_config
from trainer.explore import Sample, rloo_advantages, rloo_examples, sample
from trainer.learner import Learner
from trainer.reward_model import RewardModel, auc, cross_validated_auc, fit_on_votes, trust
from trainer.round import run_round


def test_auc_counts_pairs():
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auc([0.1, 0.9], [True, False]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([0.3, 0.4], [True, True]) is None


def test_fit_learns_a_direction_and_generalises():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 32, generator=g) * torch.linspace(0.5, 3, 32)      # features of unequal scale
    liked = x[:, 3] > 0.3
    flips = torch.rand(200, generator=g) < 0.1                               # noisy votes
    target = (liked ^ flips).float()
    rm = RewardModel.fit(x[:120], target[:120], torch.ones(120), l2=0.01, last_reply_id=120)
    assert auc(rm.predict(x[120:]).tolist(), liked[120:].tolist()) > 0.9
    assert rm.n_train == 120 and rm.last_reply_id == 120
    # a heavier weight on a reply pulls the fit toward its label
    w = torch.ones(120)
    w[0] = 50.0
    heavy = RewardModel.fit(x[:120], 1 - target[:120], w, l2=0.01)
    light = RewardModel.fit(x[:120], 1 - target[:120], torch.ones(120), l2=0.01)
    assert abs(float(heavy.predict(x[:1])) - float(1 - target[0])) < abs(float(light.predict(x[:1])) - float(1 - target[0]))


def test_trust_follows_the_cross_validated_auc():
    assert trust(None) == 0.0 and trust(0.45) == 0.0 and trust(0.5) == 0.0
    assert trust(0.625) == pytest.approx(0.5) and trust(0.9) == 1.0
    g = torch.Generator().manual_seed(2)
    x = torch.randn(100, 16, generator=g)
    signal = (x[:, 0] > 0).float()
    coin = (torch.rand(100, generator=g) < 0.5).float()
    good = cross_validated_auc(x, signal, torch.ones(100), signal.bool().tolist(), l2=0.01)
    noise = cross_validated_auc(x, coin, torch.ones(100), coin.bool().tolist(), l2=0.01)
    assert good > 0.9 and abs(noise - 0.5) < 0.15 and trust(noise) < 0.6


def test_state_round_trips_through_safetensors_and_bad_state_is_refused():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 8, generator=g)
    rm = RewardModel.fit(x, (x[:, 0] > 0).float(), torch.ones(20), last_reply_id=7)
    again = RewardModel.from_state(load(save(rm.state())))
    assert torch.equal(again.predict(x), rm.predict(x)) and again.last_reply_id == 7 and again.n_train == 20
    bad = rm.state()
    bad["weight"] = torch.full_like(bad["weight"], float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        RewardModel.from_state(bad)
    with pytest.raises(ValueError, match="needs tensors"):
        RewardModel.from_state({"mean": bad["mean"]})


def test_a_reward_model_file_bigger_than_the_base_allows_is_refused_unread(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    d = 3 * base.config.hidden_size                      # the features: mean, last, first hidden state
    rm = RewardModel(torch.zeros(d), torch.ones(d), torch.full((d,), 0.5), torch.tensor(0.1), 9, 12)
    folder = tmp_path / "v0001"
    folder.mkdir()
    data = save(rm.state())
    (folder / versions.REWARD_MODEL_FILE).write_bytes(data)
    versions.write_meta(folder, {"version": 1, "kind": "lora", "weights_file": versions.LORA_WEIGHTS,
                                 "reward_model_sha256": hashlib.sha256(data).hexdigest()})
    limit = versions.max_reward_model_bytes(base)
    state, why = versions.read_version_side_file(folder, versions.REWARD_MODEL_FILE, limit)
    assert why == "" and RewardModel.from_state(state).last_reply_id == 12         # a real one fits
    with open(folder / versions.REWARD_MODEL_FILE, "r+b") as f:                     # one byte over (a hole)
        f.truncate(limit + 1)
    state, why = versions.read_version_side_file(folder, versions.REWARD_MODEL_FILE, limit)
    assert state is None and f"{versions.REWARD_MODEL_FILE} is {limit + 1:,} bytes" in why \
        and "refusing it unread" in why


def test_rloo_is_leave_one_out_per_prompt_and_scaled():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.5, 0.5, -1.0])
    adv = rloo_advantages(rewards, [0, 0, 0, 0, 1, 1, 2])
    raw = torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0])     # r_i − mean(others); a lone sample: 0
    assert torch.allclose(adv, raw / raw.std(correction=0), atol=1e-6)
    rare = rloo_advantages(torch.tensor([-0.99, -0.97, -0.99, -0.99]), [0, 0, 0, 0], weight=0.5)
    assert rare[1] > 0 and float(rare.std(correction=0)) == pytest.approx(0.5)   # small spread, same scale
    assert torch.equal(rloo_advantages(torch.tensor([0.3, 0.3]), [0, 0]), torch.zeros(2))
    s = [Sample(0, [1, 2], [3], [-0.5], "a"), Sample(0, [1, 2], [4], [-0.7], "b")]
    ex = rloo_examples(s, torch.tensor([0.5, -0.5]), 0.8)
    assert [e.reply_id for e in ex] == [-1, -2] and ex[0].advantage > 0 > ex[1].advantage
    assert ex[1].behaviour_logp == [-0.7] and ex[0].temperature == 0.8


def test_samples_carry_exact_logprobs(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    learner = Learner(cfg, trainer_config(cfg))
    learner.load()
    tok = learner.tokenizer
    prompts = [tok.encode("hello", add_special_tokens=False), tok.encode("a longer prompt here", add_special_tokens=False)]
    got = sample(learner.base, tok, prompts, 3, temperature=0.8, top_p=0.95, max_new_tokens=6, seed=4)
    assert [s.group for s in got] == [0, 0, 0, 1, 1, 1]
    assert got == sample(learner.base, tok, prompts, 3, temperature=0.8, top_p=0.95, max_new_tokens=6, seed=4)
    for s in got:
        assert s.prompt_ids == prompts[s.group] and 1 <= len(s.output_ids) <= 6
        assert s.logprobs == pytest.approx(token_logps(learner.base, s.prompt_ids, s.output_ids), abs=1e-4)


async def test_fit_on_votes_tests_the_previous_model_on_new_votes(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    store = await store_for(cfg)
    learner = Learner(cfg, trainer_config(cfg))
    learner.load()
    await seed_rated(store, learner.tokenizer, 6, prompt="hello {i}")
    first, report = fit_on_votes(learner.features(), await store.rated_replies(1e12), None, l2=1.0)
    assert first is not None and first.last_reply_id == 6 and "rm_heldout" not in report
    assert report["rm_replies"] == 6 and report["rm_votes"] == 6 and report["rm_train_auc"] == 1.0
    await seed_rated(store, learner.tokenizer, 4, prompt="again {i}")
    second, report = fit_on_votes(learner.features(), await store.rated_replies(1e12), first, l2=1.0)
    assert report["rm_heldout"] == 4 and report["rm_heldout_auc"] is not None     # ids 7..10, unseen by first
    assert second.last_reply_id == 10 and second.n_train == 10
    only_liked = [r for r in await store.rated_replies(1e12) if r.reward > 0]
    none, report = fit_on_votes(learner.features(), only_liked, None, l2=1.0)
    assert none is None and "all liked or all disliked" in report["rm_skipped"]


async def test_a_round_explores_and_publishes_its_reward_model(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1, "explore_prompts": 3, "explore_samples": 2})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_rated(store, learner.tokenizer, 6, base=learner.base, prompt="hello {i}")
    first = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert first.status == "published" and first.n_explored == 6          # 3 newest prompts × 2 samples
    v1 = await store.get_version(first.version)
    state, why = versions.read_version_side_file(v1.path, versions.REWARD_MODEL_FILE,
                                                 versions.max_reward_model_bytes(learner.base))
    assert why == "" and RewardModel.from_state(state).last_reply_id == 6
    assert v1.metrics["n_explored"] == 6 and v1.metrics["rm_votes"] == 6
    # a fresh trainer (a restart) tests the reward model saved with v1 on the votes since
    await seed_rated(store, learner.tokenizer, 4, base=learner.base, prompt="later {i}")
    restarted = Learner(cfg, tcfg)
    second = await run_round(store, cfg, tcfg, restarted, use_all=True)
    assert second.status == "published" and second.reward_model["rm_heldout"] == 4
    # all votes alike and no reward model: nothing to learn, the round is skipped
    cfg2 = tiny_config(tmp_path / "two", tiny_model_dir, trainer={"epochs": 1})
    store2 = await store_for(cfg2)
    for rid in await seed_rated(store2, learner.tokenizer, 4, base=learner.base, prompt="x {i}"):
        await store2.remove_vote(rid, "u1", "\N{THUMBS UP SIGN}")
        await store2.set_vote(rid, "u1", "\N{THUMBS DOWN SIGN}", -1.0)
    skipped = await run_round(store2, cfg2, trainer_config(cfg2), learner, use_all=True)
    assert skipped.status == "skipped" and "no reward model could be fitted" in skipped.reason


async def test_an_untrusted_reward_model_explores_nothing(tmp_path, tiny_model_dir, store_for):
    """Votes that no reply's content explains (the same reply liked and disliked): the reward
    model's cross-validated AUC is at chance, its trust 0, and no samples are drawn."""
    from tests.trainer_helpers import add_rated, prompt_ids

    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    tok = learner.tokenizer
    p, out = prompt_ids(tok, "hello"), tok.encode(" same reply", add_special_tokens=False)
    for i in range(10):
        await add_rated(store, p, out, token_logps(learner.base, p, out), 1.0 if i % 2 else -1.0)
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.reward_model["rm_cv_auc"] == 0.5 and result.reward_model["rm_trust"] == 0.0
    assert result.n_explored == 0 and result.status in ("published", "rejected", "skipped")
