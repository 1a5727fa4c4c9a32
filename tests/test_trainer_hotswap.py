"""The bot side of a published version: hot-swap under load, rollback, rejected versions."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from bot.chat import BUSY_TEXT, ERROR_TEXT, ChatCore
from bot.events import Command, Message
from bot.policy import Policy
from tests.trainer_helpers import CONSOLE, seed_rated, tiny_config, trainer_config
from trainer.learner import Learner
from trainer.round import run_round


async def test_hot_swap_under_load(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 2},
                      serving={"queue_size": 64, "batch_size": 4, "poll_seconds": 0.05})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_rated(store, learner.tokenizer, 6, base=learner.base)
    policy = Policy.from_config(cfg)
    core = ChatCore(cfg, store, policy)
    events: list[tuple[str, int, int | None]] = []      # (phase at start, seq, reply id); order = finish order
    phase = {"now": "before"}                            # before → swapping → after
    sent: list[str] = []
    seq = 0
    stop = asyncio.Event()

    async def send(text):
        sent.append(text)
        return [f"p{len(sent)}"]

    async def talker(name: str):
        nonlocal seq
        while not stop.is_set():
            seq += 1
            started = phase["now"]
            rid = await core.on_message(Message("console", f"{name}-{seq}", "c", name, name, f"hi {seq}", **CONSOLE), [], send)
            events.append((started, phase["now"], rid))

    try:
        talkers = [asyncio.create_task(talker(f"u{i}")) for i in range(6)]
        await asyncio.sleep(0.3)
        result = await run_round(store, cfg, tcfg, learner, use_all=True)     # bot keeps replying meanwhile
        assert result.status == "published"
        n_during_round = len(events)
        phase["now"] = "swapping"
        await core.sync_version()
        phase["now"] = "after"
        # let a few replies that were asked after the swap finish (a wait, not a timing assertion:
        # on a loaded machine one batch can take seconds)
        for _ in range(1200):
            if sum(1 for start, _, _ in events if start == "after") >= 3:
                break
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*talkers)
    finally:
        policy.close()

    assert policy.active_version == 1 and n_during_round > 0
    assert events and all(rid is not None for _, _, rid in events)
    assert not [t for t in sent if t in (BUSY_TEXT, ERROR_TEXT)]
    versions = {rid: (await store.get_reply(rid)).version for _, _, rid in events}
    done_before = [rid for start, end, rid in events if end == "before"]
    started_after = [rid for start, end, rid in events if start == "after"]
    assert done_before and started_after
    assert {versions[r] for r in done_before} == {0}        # finished before the swap began: v0
    assert {versions[r] for r in started_after} == {1}      # asked after the swap: v1
    assert set(versions.values()) <= {0, 1}


async def test_rollback_and_rejected_versions(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_rated(store, learner.tokenizer, 6, base=learner.base)
    policy = Policy.from_config(cfg)
    try:
        core = ChatCore(cfg, store, policy)
        for v in (1, 2):
            assert (await run_round(store, cfg, tcfg, learner, use_all=True)).version == v
        await core.sync_version()
        assert policy.active_version == 2

        out = await core.on_command(Command("console", "c", "admin", "rollback", {"version": 1}, is_platform_admin=True))
        assert out.ok and out.text == "Rolled back: now serving v1."
        assert policy.active_version == 1 and await store.active_version() == 1

        async def send(text):
            return ["x"]

        rid = await core.on_message(Message("console", "m1", "c", "u", "u", "hello", **CONSOLE), [], send)
        assert (await store.get_reply(rid)).version == 1

        strict = dataclasses.replace(tcfg, max_kl=1e-9, kl_target_share=0.0)
        rejected = await run_round(store, cfg, strict, learner, use_all=True)
        assert rejected.status == "rejected" and rejected.version == 3 and rejected.parent == 1
        out = await core.on_command(Command("console", "c", "admin", "rollback", {"version": 3}, is_platform_admin=True))
        assert not out.ok and "rejected" in out.text
        with pytest.raises(ValueError, match="rejected"):
            await store.activate(3)
        await core.sync_version()
        assert policy.active_version == 1 and await store.active_version() == 1

        # the next round continues from the rolled-back version
        nxt = await run_round(store, cfg, tcfg, learner, use_all=True)
        assert nxt.status == "published" and (nxt.version, nxt.parent) == (4, 1)
        assert (await store.get_version(4)).parent == 1
    finally:
        policy.close()
