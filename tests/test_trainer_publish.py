"""Publishing is atomic, verified by the bot, and old folders are pruned safely."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bot import versions
from bot.chat import ChatCore
from bot.events import Command, Message
from bot.policy import Policy
from bot.policy_types import VersionError
from tests.trainer_helpers import CONSOLE, add_rated, seed_rated, tiny_config, trainer_config
from bot.versions import dirname as version_dirname
from trainer.publish import clean_stale, prune, publish, stage
from trainer.learner import Learner
from trainer.round import run_round


class Crash(Exception):
    pass


def visible_versions(cfg) -> list[str]:
    d = cfg.versions_dir
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


async def test_crash_before_rename_leaves_no_visible_version(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_rated(store, learner.tokenizer, 4, base=learner.base)
    seen = []

    def crash(tmp):
        seen.append(sorted(p.name for p in tmp.iterdir()))
        raise Crash("power cut")

    result = await run_round(store, cfg, tcfg, learner, use_all=True, before_rename=crash)
    assert result.status == "failed" and "publishing failed: Crash: power cut" in result.reason
    assert seen == [["README.md", "adapter_config.json", "adapter_model.safetensors", "meta.json",
                     "reward_model.safetensors"]]
    assert visible_versions(cfg) == []
    assert [v.id for v in await store.versions()] == [0] and await store.active_version() == 0

    # a real crash cannot clean up: the files were written, the rename never happened
    cand = learner.candidate(None, seed=0)
    model, kind = cand.model, cand.kind
    tmp, sha = stage(cfg.versions_dir, 1, model, kind, {})
    assert tmp.name == f".tmp-v0001-{os.getpid()}" and (tmp / "adapter_model.safetensors").is_file()
    # ... or it crashed after the rename, before the registry row was committed
    (cfg.versions_dir / "v0007").mkdir()
    assert visible_versions(cfg) == ["v0007"] and await store.get_version(7) is None   # the bot never looks
    # the next trainer start removes both
    removed = await clean_stale(store, cfg.versions_dir)
    assert sorted(p.name for p in removed) == [tmp.name, "v0007"]
    assert list(cfg.versions_dir.iterdir()) == []
    # and the next round publishes normally
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    assert result.status == "published" and visible_versions(cfg) == ["v0001"]


async def test_tampered_weights_are_refused_and_the_old_version_keeps_serving(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    learner = Learner(cfg, tcfg)
    learner.load()
    await seed_rated(store, learner.tokenizer, 4, base=learner.base)
    assert (await run_round(store, cfg, tcfg, learner, use_all=True)).status == "published"
    policy = Policy.from_config(cfg)
    try:
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        assert policy.active_version == 1
        # v2 is published, then its weights are changed on disk after the checksum was registered
        await add_rated(store, [1, 2, 3], [4, 5], [-1.0, -1.0], 1.0)
        assert (await run_round(store, cfg, tcfg, learner, use_all=True)).status == "published"
        weights = cfg.versions_dir / "v0002" / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))

        await core.sync_version()
        assert policy.active_version == 1 and not policy.is_loaded(2)
        assert "sha256 mismatch" in core.serving_error
        assert "sha256 mismatch" in await store.get_state("serving_error")
        sent = []

        async def send(text):
            sent.append(text)
            return [f"p{len(sent)}"]

        rid = await core.on_message(Message("console", "m1", "c", "u", "u", "hello", **CONSOLE), [], send)
        assert rid is not None and (await store.get_reply(rid)).version == 1
        status = (await core.on_command(Command("console", "c", "u", "status"))).text
        assert "Active version: v2 (serving v1)" in status
        assert "Refused checkpoint: v2:" in status and "sha256 mismatch" in status
        # the trainer refuses to continue from it too
        result = await run_round(store, cfg, tcfg, learner, use_all=True)
        assert result.status == "failed" and "sha256 mismatch" in result.reason
    finally:
        policy.close()


async def test_prune_keeps_newest_and_the_active_version_with_its_parent(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    store = await store_for(cfg)
    learner = Learner(cfg, trainer_config(cfg))
    cand = learner.candidate(None, seed=0)
    model, kind = cand.model, cand.kind
    for v in range(1, 6):
        await publish(store, cfg.versions_dir, version=v, parent=v - 1, model=model, kind=kind, meta={},
                      metrics={"last_reply_id": 0})
    await store.activate(3)          # an admin rolled back to v3 (parent v2)
    removed = await prune(store, cfg.versions_dir, keep=2)
    assert [p.name for p in removed] == [version_dirname(1)]
    assert visible_versions(cfg) == ["v0002", "v0003", "v0004", "v0005"]

    # a rollback to the pruned version says so, and the serving version stays
    policy = Policy.from_config(cfg)
    try:
        core = ChatCore(cfg, store, policy)
        out = await core.on_command(Command("console", "c", "admin", "rollback", {"version": 1}, is_platform_admin=True))
        assert not out.ok and "pruned" in out.text
        assert await store.active_version() == 3
        out = await core.on_command(Command("console", "c", "admin", "rollback", {"version": 2}, is_platform_admin=True))
        assert out.ok and policy.active_version == 2
    finally:
        policy.close()


async def test_a_fresh_start_with_a_broken_active_version_serves_the_newest_good_one(tmp_path, tiny_model_dir,
                                                                                       store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    store = await store_for(cfg)
    cand = Learner(cfg, trainer_config(cfg)).candidate(None, seed=0)
    for v in (1, 2, 3):
        await publish(store, cfg.versions_dir, version=v, parent=v - 1, model=cand.model, kind=cand.kind, meta={},
                      metrics={"last_reply_id": 0})
    (cfg.versions_dir / version_dirname(3) / "adapter_model.safetensors").write_bytes(b"broken")
    policy = Policy.from_config(cfg)          # a fresh start: only the base is loaded
    try:
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        assert policy.active_version == 2 and await store.active_version() == 3
        assert await store.get_state("serving_version") == "2"
        status = (await core.on_command(Command("console", "c", "u", "status"))).text
        assert "Active version: v3 (serving v2)" in status and "Refused checkpoint: v3:" in status
        await core.sync_version()                 # the broken one is not retried every poll
        assert policy.active_version == 2
    finally:
        policy.close()


async def test_a_crash_mid_prune_leaves_every_registered_folder_whole_or_gone(tmp_path, tiny_model_dir, store_for,
                                                                              monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_dir, serving={"engine": "torch"})
    store = await store_for(cfg)
    cand = Learner(cfg, trainer_config(cfg)).candidate(None, seed=0)
    for v in range(1, 5):
        await publish(store, cfg.versions_dir, version=v, parent=v - 1, model=cand.model, kind=cand.kind, meta={},
                      metrics={"last_reply_id": 0})

    def power_cut(path, *args, **kwargs):       # the first file goes, then the machine does
        next(p for p in sorted(Path(path).iterdir()) if p.is_file()).unlink()
        raise Crash("power cut while deleting")

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", power_cut)
        with pytest.raises(Crash):
            await prune(store, cfg.versions_dir, keep=2)           # v1 and v2 are to go; v1 first
    assert visible_versions(cfg) == ["v0002", "v0003", "v0004"]   # v1 is gone, not half there
    trash = [p.name for p in cfg.versions_dir.iterdir() if p.name.startswith(versions.TRASH_PREFIX)]
    assert trash == [f".trash-v0001-{os.getpid()}"]
    for v in (2, 3, 4):                                           # what is visible is whole
        row = await store.get_version(v)
        assert versions.read_verified(row.path, row.sha256, version=v, root=cfg.versions_dir).kind == "lora"
    assert (await store.get_version(1)).status == "published"     # the row stays: a pruned version

    policy = Policy.from_config(cfg)
    try:
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        assert policy.active_version == 4 and core.serving_error == ""
        out = await core.on_command(Command("console", "c", "admin", "rollback", {"version": 1}, is_platform_admin=True))
        assert not out.ok and "pruned" in out.text and policy.active_version == 4
    finally:
        policy.close()

    # the next trainer start deletes the trash; the next prune finishes the job the same way
    assert [p.name for p in await clean_stale(store, cfg.versions_dir)] == trash
    assert [p.name for p in await prune(store, cfg.versions_dir, keep=2)] == ["v0002"]
    assert sorted(p.name for p in cfg.versions_dir.iterdir()) == ["v0003", "v0004"]


EVERY_LAYER = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("lora", [{"lora_rank": 8, "lora_alpha": 16},        # the trainer's default adapter
                                  {"lora_rank": 1024, "lora_alpha": 16, "target_modules": EVERY_LAYER}],
                         ids=["default", "rank-1024-every-layer"])
async def test_a_lora_version_s_size_bound_comes_from_its_configuration(lora, tmp_path, tiny_model_dir, store_for):
    """The bound admits the adapter the trainer writes (also the largest rank over every layer,
    bigger than 8 bytes a parameter of the base) and refuses a file one byte over it, unread."""
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer=lora)
    store = await store_for(cfg)
    learner = Learner(cfg, trainer_config(cfg))
    cand = learner.candidate(None, seed=0)
    await publish(store, cfg.versions_dir, version=1, parent=0, model=cand.model, kind=cand.kind, meta={},
                  metrics={"last_reply_id": 0})
    row = await store.get_version(1)
    limits = versions.max_weights_bytes(learner.base)
    bound = limits.lora(versions.adapter_config(Path(row.path)))
    weights = Path(row.path) / versions.LORA_WEIGHTS
    assert weights.stat().st_size <= bound
    if lora["lora_rank"] == 1024:
        assert weights.stat().st_size > limits.full              # what the old bound (8 bytes a parameter) refused
    files = versions.read_verified(row.path, row.sha256, version=1, root=cfg.versions_dir, max_bytes=limits)
    assert files.kind == "lora" and files.lora.r == lora["lora_rank"]
    with open(weights, "r+b") as f:                               # one byte over (the rest a hole)
        f.truncate(bound + 1)
    with pytest.raises(VersionError, match=f"is {bound + 1:,} bytes, more than a version .* refusing it unread"):
        versions.read_verified(row.path, row.sha256, version=1, root=cfg.versions_dir, max_bytes=limits)
