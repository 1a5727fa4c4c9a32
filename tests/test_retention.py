"""Retention (``storage.retention_days``) on a real store with backdated rows: old raw messages
and unrated replies go; what the registry, the trainer's window and /forget need stays."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import time

import pytest

from bot import versions
from bot.config import ConfigError, build, validate
from bot.config import Config
from bot.retention import prune_once, pruning
from bot.store import MIGRATIONS, RETENTION_KEEP_NEWEST, Store, _statements

DAY = 86400.0
UP = "\N{THUMBS UP SIGN}"


async def exchange(store: Store, author: str, channel: str, at: float, *, platform: str = "discord") -> int:
    """A message by ``author`` at ``at`` and the bot's reply one second later; the reply id."""
    mid = await store.add_message(platform, f"m-{author}-{at}", channel, author, author.title(),
                                  f"words of {author}", created_at=at)
    rid = await store.add_reply(platform, channel, mid, 0, f"reply to {author}", [1, 2], [3], [-0.5], 0.8, 0.95, 8,
                                created_at=at + 1)
    await store.link_reply_message(rid, platform, f"r-{rid}")
    return rid


async def snapshot(store: Store, table: str) -> list[tuple]:
    return [tuple(r) for r in await store._all(f"SELECT * FROM {table} ORDER BY 1")]


async def test_prune_deletes_old_raw_messages_and_unrated_replies_and_keeps_what_is_needed(store):
    now = time.time()
    old = now - 40 * DAY
    unrated = await exchange(store, "alice", "c1", old)              # deleted: old, no vote
    rated = await exchange(store, "bob", "c1", old + 2)              # kept: rated (the trainer's window)
    await store.set_vote(rated, "dave", UP, 1.0)
    named = await exchange(store, "erin", "c1", old + 4)             # kept: a published version names it
    lonely = await exchange(store, "dave", "c2", old + 6)            # deleted, and its message with it
    recent = await exchange(store, "carol", "c1", now - 10)          # kept: newer than 30 days (and the newest)
    await store.add_version(1, 0, "/versions/v0001", "ab" * 32, "published", {"last_reply_id": rated}, activate=True)
    await store.add_train_request("discord", "c1", "bob")
    await store.finish_round(await store.start_round(None, 0), status="published", version=1)
    registry = {t: await snapshot(store, t) for t in ("model_versions", "train_requests", "rounds", "state")}
    window = [r.id for r in await store.rated_replies(now)]

    counts = await store.prune_before(now - 30 * DAY, keep_reply_ids=[named], keep_newest=1)

    assert counts == {"replies": 2, "messages": 1, "blanked": 3}
    assert [await store.get_reply(r) is not None for r in (unrated, rated, named, recent, lonely)] == \
        [False, True, True, True, False]
    assert await store.votes_for(rated) == [("dave", UP, 1.0)]
    assert await store.reply_for_message("discord", f"r-{unrated}") is None        # its links went with it
    assert await store.reply_for_message("discord", f"r-{rated}") == rated
    rows = await store._all("SELECT author_id, channel_id, author_name, text FROM messages ORDER BY created_at")
    assert [tuple(r) for r in rows] == [("alice", "c1", "", ""), ("bob", "c1", "", ""), ("erin", "c1", "", ""),
                                        ("carol", "c1", "Carol", "words of carol")]
    assert {t: await snapshot(store, t) for t in registry} == registry      # the registry is never touched
    assert [r.id for r in await store.rated_replies(now)] == window == [rated]
    assert await store.last_trained_reply_id() == rated

    # /forget still finds the replies whose prompts may hold a pruned person's words: her row
    # stayed as who wrote where and when, and every later reply in c1 goes
    gone = await store.forget_user("discord", "alice")
    assert (gone["messages"], gone["replies"]) == (1, 3)
    # bob's and erin's rows were kept for the replies /forget just deleted: now nothing holds them
    assert await store.prune_before(now - 30 * DAY, keep_newest=0) == {"replies": 0, "messages": 2, "blanked": 0}
    assert await store.prune_before(now - 30 * DAY, keep_newest=0) == {"replies": 0, "messages": 0, "blanked": 0}


async def test_prune_keeps_the_newest_replies_the_trainer_explores(store):
    old = time.time() - 100 * DAY
    ids = [await exchange(store, f"u{i}", "c1", old + 10 * i) for i in range(5)]
    counts = await store.prune_before(time.time() - DAY, keep_newest=2)
    assert counts["replies"] == 3
    assert [r["id"] for r in await store._all("SELECT id FROM replies ORDER BY id")] == ids[3:]


async def test_prune_once_keeps_the_replies_a_version_folder_names(store, tmp_path):
    old = time.time() - 10 * DAY
    used, other = await exchange(store, "alice", "c1", old), await exchange(store, "bob", "c2", old)
    folder = tmp_path / "versions" / "v0001"
    folder.mkdir(parents=True)
    versions.write_meta(folder, {"version": 1, "kind": "lora", "weights_file": versions.LORA_WEIGHTS,
                                 "reply_ids": [used]})
    await store.add_version(1, 0, str(folder), "ab" * 32, "published", {}, activate=True)
    await store.add_version(2, 1, str(tmp_path / "versions" / "v0002"), "cd" * 32, "published", {})   # pruned folder
    counts = await prune_once(store, 7, tmp_path / "versions", now=time.time(), keep_newest=0)
    assert counts["replies"] == 1
    assert await store.get_reply(used) is not None and await store.get_reply(other) is None


async def test_a_registry_path_outside_the_versions_folder_is_not_read(store, tmp_path, caplog):
    old = time.time() - 10 * DAY
    named = await exchange(store, "alice", "c1", old)
    elsewhere = tmp_path / "elsewhere" / "v0001"           # a v0001 folder, but not in data_dir/versions
    elsewhere.mkdir(parents=True)
    versions.write_meta(elsewhere, {"version": 1, "kind": "lora", "weights_file": versions.LORA_WEIGHTS,
                                    "reply_ids": [named]})
    await store.add_version(1, 0, str(elsewhere), "ab" * 32, "published", {}, activate=True)
    counts = await prune_once(store, 7, tmp_path / "versions", now=time.time(), keep_newest=0)
    assert counts["replies"] == 1 and await store.get_reply(named) is None    # what it names is not kept
    warnings = [r.getMessage() for r in caplog.records if r.name == "bot.retention" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "v1" in warnings[0] and "not the version folder" in warnings[0]


async def backlog(store: Store, now: float) -> None:
    """A few months of traffic: unrated and rated replies, kept ones, several channels, /forget's
    unrecorded replies (no context-author rows), some recent ones."""
    for i in range(40):
        at, author, channel = now - (120 - i * 2.5) * DAY, f"u{i % 7}", f"c{i % 3}"
        mid = await store.add_message("discord", f"m{i}", channel, author, author.title(), f"words {i}",
                                      created_at=at)
        if i % 4 == 3:                   # a message the bot did not answer
            continue
        rid = await store.add_reply("discord", channel, mid, 0, f"reply {i}", [1, 2], [3], [-0.5], 0.8, 0.95, 8,
                                    created_at=at + 1, context_authors=None if i % 9 == 0 else [author])
        await store.link_reply_message(rid, "discord", f"r-{rid}")
        if i % 5 == 0:
            await store.set_vote(rid, f"v{i % 4}", UP, 1.0)
    for i in range(4):
        await exchange(store, f"late{i}", "c0", now - 60 * i)


@pytest.mark.parametrize("batch", [1, 3, 7])
async def test_a_backlog_bigger_than_a_batch_is_pruned_as_in_one_go(batch, tmp_path):
    now = time.time()
    stores = [await Store.open(tmp_path / f"{name}.sqlite3") for name in ("batched", "at-once")]
    try:
        for s in stores:
            await backlog(s, now)
        keep = [3, 9]
        batched = await stores[0].prune_before(now - 30 * DAY, keep, keep_newest=5, batch=batch)
        at_once = await stores[1].prune_before(now - 30 * DAY, keep, keep_newest=5, batch=10 ** 9)
        assert batched == at_once and min(batched.values()) > batch
        for table in ("messages", "replies", "reply_messages", "reply_context_authors"):
            assert await snapshot(stores[0], table) == await snapshot(stores[1], table), table
        votes = "SELECT reply_id, user_id, emoji, value FROM votes ORDER BY 1, 2"     # not when they were cast
        assert [tuple(r) for r in await stores[0]._all(votes)] == [tuple(r) for r in await stores[1]._all(votes)]
        assert await stores[0].prune_before(now - 30 * DAY, keep, keep_newest=5, batch=batch) == \
            {"replies": 0, "messages": 0, "blanked": 0}              # nothing left to do
    finally:
        for s in stores:
            await s.close()


async def test_retention_keeps_every_reply_the_trainer_can_explore(store):
    """The trainer reads the newest explore_prompts x EXPLORE_READ_FACTOR replies; at its largest
    explore_prompts, pruning everything old leaves what it reads the same."""
    from trainer.config import TrainerConfig

    most = next(f for f in dataclasses.fields(TrainerConfig) if f.name == "explore_prompts").metadata["range"].hi
    old = time.time() - 100 * DAY
    async with store.transaction():                                     # more replies than retention keeps
        for i in range(RETENTION_KEEP_NEWEST + 50):
            await store.db.execute(
                "INSERT INTO replies (platform, channel_id, version, text, prompt_ids, output_ids, logprobs,"
                " temperature, top_p, max_new_tokens, created_at) VALUES ('console', 'c', 0, 'x', ?, '[1]',"
                " '[-0.1]', 0.8, 0.95, 8, ?)", (json.dumps([7, i]), old + i))
    explored = await store.recent_prompts(int(most))
    counts = await store.prune_before(time.time() - DAY)
    assert counts["replies"] == 50
    assert await store.recent_prompts(int(most)) == explored and len(explored) == int(most)


async def test_the_bot_prunes_while_it_runs_only_when_retention_is_set(store, cfg):
    rid = await exchange(store, "alice", "c1", time.time() - 3 * DAY)

    async def texts() -> list[str]:
        return [r["text"] for r in await store._all("SELECT text FROM messages")]

    tasks = asyncio.all_tasks()
    async with pruning(store, cfg, every=0.05):           # retention_days = 0, the default: keep everything
        assert asyncio.all_tasks() == tasks               # no pruning task is even started
    assert await texts() == ["words of alice"]
    cfg.storage.retention_days = 2.0
    async with pruning(store, cfg, every=0.05):
        deadline = time.monotonic() + 10
        while await texts() != [""] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    assert await texts() == [""]                           # the words went; the newest reply stays
    assert await store.get_reply(rid) is not None


def test_retention_days_must_be_a_sane_number():
    assert build(Config, {}).storage.retention_days == 0
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="storage.retention_days"):
            validate(build(Config, {"storage": {"retention_days": bad}}))


@pytest.mark.parametrize("settings, least, names", [
    ({}, 1, ""),
    ({"chat": {"backfill_hours": 72.0}}, 3, "chat.backfill_hours = 72"),
    ({"trainer": {"settle_seconds": 5 * 86400}}, 5, "trainer.settle_seconds = 432000"),
])
def test_retention_days_is_0_or_long_enough_for_late_votes(settings, least, names):
    def check(days):
        return validate(build(Config, {**settings, "storage": {"retention_days": days}}), need_secrets=False)

    for short in (0.001, least * 0.9):
        with pytest.raises(ConfigError) as e:
            check(short)
        said = str(e.value)
        assert said.startswith("'storage.retention_days': must be 0 (keep everything) or at least "
                               f"{least} day") and names in said and f"Set it to 0 or to {least} or more" in said
    assert check(0).storage.retention_days == 0 and check(least).storage.retention_days == least


async def test_a_schema_1_database_gains_the_indexes_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite3"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for stmt in _statements(MIGRATIONS[0]):
        con.execute(stmt)
    con.execute("INSERT INTO schema_version VALUES (1)")
    con.execute("INSERT INTO messages (platform, platform_message_id, channel_id, author_id, text, created_at)"
                " VALUES ('discord', 'm1', 'c1', 'alice', 'hi', 1.0)")
    con.commit()
    con.close()
    store = await Store.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS) >= 2
        indexes = {r["name"] for r in await store._all("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"reply_messages_reply", "replies_channel", "messages_created", "reply_context_authors_user"} <= indexes
        assert (await store.tables())["reply_context_authors"] == ["reply_id", "platform", "user_id"]
        assert (await store.counts())["messages"] == 1
    finally:
        await store.close()
