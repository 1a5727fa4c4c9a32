"""The round's KL budget (trainer/kl_control.py): its rule, and that a round keeps to it."""

import math

import pytest

from trainer.kl_control import MAX_SCALE, KLControl


def test_the_weight_stays_at_kl_coef_while_the_kl_is_under_the_target():
    c = KLControl(0.05, 0.07)
    for kl in (0.0, 0.01, 0.069, 0.03):
        assert c.update(kl) == pytest.approx(0.05)
    assert c.steps_over == 0 and c.steps == 4


def test_the_weight_grows_while_over_and_falls_back_to_kl_coef():
    c = KLControl(0.05, 0.07)
    assert c.update(0.14) == pytest.approx(0.05 * math.e)          # twice the target: ×e
    assert c.update(1.0) == pytest.approx(0.05 * math.e ** 2)      # far over: still ×e (clipped)
    assert c.update(0.07 * 1.5) == pytest.approx(0.05 * math.e ** 2.5)
    assert c.steps_over == 3 and c.peak == pytest.approx(math.e ** 2)     # the weight the 3rd step used
    for _ in range(5):
        c.update(0.0)                                              # under: ×1/e per step, never below kl_coef
    assert c.coef == pytest.approx(0.05)


def test_the_weight_is_bounded_and_bad_numbers_change_nothing():
    c = KLControl(0.05, 0.07)
    for _ in range(50):
        c.update(10.0)
    assert c.coef == pytest.approx(0.05 * MAX_SCALE)
    c = KLControl(0.05, 0.07)
    for bad in (float("nan"), float("inf")):
        assert c.update(bad) == pytest.approx(0.05)
    off = KLControl(0.05, 0.0)                                     # kl_target_share = 0: off
    assert off.update(5.0) == pytest.approx(0.05)


async def _round_kl(tmp_path, tiny_model_dir, store_for, **trainer):
    from tests.test_trainer_learning import seed_preferences
    from tests.trainer_helpers import tiny_config, trainer_config
    from trainer.learner import Learner
    from trainer.round import run_round

    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 6, **trainer})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_preferences(store, learner.base, learner.tokenizer)
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "published", result.reason
    return (await store.get_version(result.version)).metrics, tcfg


async def test_a_round_over_its_budget_raises_the_penalty_and_ends_closer_to_the_base(tmp_path, tiny_model_dir,
                                                                                       store_for):
    """The same round (same replies, seed, lr) with the control off and with a small budget:
    with it, the weight rises over kl_coef and the KL the round ends at is lower."""
    free, tcfg = await _round_kl(tmp_path / "off", tiny_model_dir, store_for, kl_target_share=0.0)
    assert free["kl_steps_over"] == 0 and free["kl_coef_last"] == pytest.approx(tcfg.kl_coef)
    budget = free["train_kl"] / 4 / tcfg.max_kl              # a quarter of where the free round ends
    held, _ = await _round_kl(tmp_path / "on", tiny_model_dir, store_for, kl_target_share=budget)
    assert held["kl_steps_over"] > 0
    assert held["kl_coef_peak"] > 2 * tcfg.kl_coef
    assert held["train_kl"] < 0.75 * free["train_kl"], (held["train_kl"], free["train_kl"])


def test_no_penalty_means_no_control():
    c = KLControl(0.0, 0.07)
    for _ in range(3):
        assert c.update(1.0) == 0.0
    assert c.steps_over == 0 and c.peak == 1.0
