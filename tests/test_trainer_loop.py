"""The trainer loop's decisions, in-process: when a scheduled round runs, how requests are served."""

from __future__ import annotations

import dataclasses
import time

from tests.trainer_helpers import add_rated, tiny_config, trainer_config
from trainer.__main__ import ATTEMPTED_KEY, Trainer


async def rate(store, rewards, created_at=None):
    for r in rewards:
        await add_rated(store, [1, 2, 3], [4, 5, 6], [-1.0, -1.0, -1.0], r, created_at=created_at)


async def test_scheduled_rounds_wait_for_enough_new_settled_ratings(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"min_new_ratings": 4, "settle_seconds": 60.0})
    trainer = Trainer(cfg, trainer_config(cfg))
    trainer.store = store = await store_for(cfg)
    old = time.time() - 120
    await rate(store, [1.0, -1.0, 1.0], created_at=old)          # settled, but only 3
    await rate(store, [1.0, -1.0, 1.0, -1.0])                     # enough, but not settled yet
    await trainer.scheduled_round()
    assert await store.rounds() == []
    await rate(store, [-1.0], created_at=old)                     # the 4th settled one
    await trainer.scheduled_round()
    assert [r["status"] for r in await store.rounds()] == ["published"]
    v1 = await store.get_version(1)
    assert v1.metrics["n_replies"] == 4 and await store.last_trained_reply_id() == 8
    await trainer.scheduled_round()                               # nothing new since v1
    assert len(await store.rounds()) == 1

    # a rejected round is not repeated on the same ratings every interval
    trainer.tcfg = dataclasses.replace(trainer.tcfg, max_kl=1e-9, kl_target_share=0.0, settle_seconds=0.0)
    await rate(store, [1.0, -1.0, 1.0, -1.0])
    await trainer.scheduled_round()
    assert [r["status"] for r in await store.rounds()][-1] == "rejected"
    assert await store.get_state(ATTEMPTED_KEY) == "12"
    await trainer.scheduled_round()
    assert len(await store.rounds()) == 2


async def test_pending_requests_share_one_round(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"settle_seconds": 3600.0})
    trainer = Trainer(cfg, trainer_config(cfg))
    trainer.store = store = await store_for(cfg)
    assert await trainer.serve_requests() is False
    await rate(store, [1.0, -1.0, 1.0])                           # unsettled: requests do not wait
    a = await store.add_train_request("discord", "c1", "admin1")
    b = await store.add_train_request("slack", "c2", "admin2")
    assert await trainer.serve_requests() is True
    reqs = await store.train_requests()
    assert [(r["id"], r["status"]) for r in reqs] == [(a, "done"), (b, "done")]
    assert reqs[0]["result"] == reqs[1]["result"] and reqs[0]["result"].startswith("v1 published: 3 rated replies")
    rounds = await store.rounds()
    assert len(rounds) == 1 and rounds[0]["request_id"] == b



async def test_a_request_with_nothing_to_learn_is_answered(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    trainer = Trainer(cfg, trainer_config(cfg))
    trainer.store = store = await store_for(cfg)
    await store.add_train_request("console", "console", "you")
    await trainer.serve_requests()
    req = (await store.train_requests())[0]
    assert req["status"] == "done" and req["result"] == "no round: 0 settled rated replies; need at least 2"
