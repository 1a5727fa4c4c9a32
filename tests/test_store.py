"""The store on a real SQLite file: migrations, round trips, reward SQL, forget."""

import asyncio
import logging
import sqlite3

import pytest

from bot.rewards import reply_reward, user_value
from bot.store import FORGOTTEN, MIGRATIONS, Store

EXPECTED_TABLES = {
    "messages": ["id", "platform", "platform_message_id", "channel_id", "author_id", "author_name", "text",
                 "created_at"],
    "model_versions": ["id", "parent", "path", "sha256", "status", "reason", "metrics", "created_at"],
    "replies": ["id", "platform", "channel_id", "message_id", "version", "text", "prompt_ids", "output_ids",
                "logprobs", "temperature", "top_p", "max_new_tokens", "created_at"],
    "reply_messages": ["platform", "platform_message_id", "reply_id"],
    "reply_context_authors": ["reply_id", "platform", "user_id"],
    "votes": ["reply_id", "user_id", "emoji", "value", "created_at"],
    "train_requests": ["id", "platform", "channel_id", "requested_by", "created_at", "status", "result",
                       "finished_at", "notified_at"],
    "rounds": ["id", "request_id", "version", "parent", "started_at", "finished_at", "n_replies", "mean_reward",
               "kl", "loss", "status", "reason"],
    "state": ["key", "value"],
    "schema_version": ["version"],
}


async def add_reply(store, msg_author="u1", platform="discord", pid="m1", text="hi", channel="c1"):
    mid = await store.add_message(platform, pid, channel, msg_author, msg_author, text)
    rid = await store.add_reply(platform, channel, mid, 0, "hello!", [1, 2, 3], [4, 5], [-0.5, -1.25], 0.8, 0.95, 12)
    await store.link_reply_message(rid, platform, f"r-{pid}")
    return rid


async def test_blank_database_migrates_to_exact_schema(tmp_path):
    store = await Store.open(tmp_path / "blank.sqlite3")
    try:
        assert await store.tables() == EXPECTED_TABLES
        assert await store.schema_version() == len(MIGRATIONS)
        assert await store.active_version() == 0
        v0 = await store.get_version(0)
        assert v0.status == "published" and v0.path is None
        mode = await store._one("PRAGMA journal_mode")
        assert mode[0] == "wal"
        fk = await store._one("PRAGMA foreign_keys")
        assert fk[0] == 1
    finally:
        await store.close()


async def test_reopening_does_not_reapply_migrations(tmp_path):
    path = tmp_path / "db.sqlite3"
    s1 = await Store.open(path)
    await add_reply(s1)
    await s1.close()
    s2 = await Store.open(path)
    assert (await s2.counts())["replies"] == 1
    rows = await s2._all("SELECT version FROM schema_version")
    assert [r["version"] for r in rows] == list(range(1, len(MIGRATIONS) + 1))
    await s2.close()


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "db.sqlite3"
    await (await Store.open(path)).close()   # create the schema
    con = sqlite3.connect(path)
    con.execute("INSERT INTO schema_version VALUES (999)")
    con.commit()
    con.close()
    with pytest.raises(RuntimeError, match="newer than this code"):
        await Store.open(path)


async def test_reply_round_trip_keeps_generation_data(store):
    rid = await add_reply(store)
    r = await store.get_reply(rid)
    assert (r.prompt_ids, r.output_ids, r.logprobs) == ([1, 2, 3], [4, 5], [-0.5, -1.25])
    assert (r.version, r.temperature, r.top_p, r.reward, r.n_voters) == (0, 0.8, 0.95, None, 0)
    assert await store.reply_for_message("discord", "r-m1") == rid
    assert await store.reply_for_message("slack", "r-m1") is None


async def test_reward_sql_matches_the_pure_rule(store):
    rid = await add_reply(store)
    votes = [("a", "👍", 1.0), ("a", "👎", -1.0), ("b", "👍", 1.0), ("c", "👎", -1.0), ("c", "🎉", -0.5)]
    for user, emoji, value in votes:
        await store.set_vote(rid, user, emoji, value)
    r = await store.get_reply(rid)
    assert r.reward == pytest.approx(reply_reward(votes)) == pytest.approx((0 + 1 - 1) / 3)
    assert r.n_voters == 3
    # each user's clipped vote (what the trainer's per-user cap weighs) is the pure rule's too
    per_user = {u: user_value(v for uu, _, v in votes if uu == u) for u in ("a", "b", "c")}
    assert dict((await store.user_votes([rid]))[rid]) == pytest.approx(per_user) == {"a": 0.0, "b": 1.0, "c": -1.0}
    assert await store.remove_vote(rid, "c", "👎")
    assert (await store.get_reply(rid)).reward == pytest.approx((0 + 1 - 0.5) / 3)


async def test_rated_replies_window_and_settling(store):
    ids = [await add_reply(store, pid=f"m{i}") for i in range(5)]
    for rid in ids[1:]:
        await store.set_vote(rid, "u9", "👍", 1.0)
    rated = await store.rated_replies(settled_before=9e18, limit=3)
    assert [r.id for r in rated] == ids[2:]          # newest three rated, oldest first
    assert await store.rated_replies(settled_before=0) == []
    assert await store.count_rated_since(ids[2], 9e18) == 2


async def test_versions_activate_and_refuse_rejected(store):
    await store.add_version(1, 0, "/v1", "aa", "published", {"last_reply_id": 7}, activate=True)
    await store.add_version(2, 1, None, None, "rejected", {}, reason="KL 0.9 > 0.5")
    assert await store.active_version() == 1
    assert await store.last_trained_reply_id() == 7
    with pytest.raises(ValueError, match="rejected"):
        await store.activate(2)
    with pytest.raises(ValueError, match="does not exist"):
        await store.activate(5)
    await store.activate(0)
    assert await store.active_version() == 0


async def test_train_requests_lifecycle(store):
    rid = await store.add_train_request("discord", "c1", "admin")
    assert [r["id"] for r in await store.train_requests("pending")] == [rid]
    await store.set_request_status(rid, "done", "v1 published")
    assert [r["result"] for r in await store.unnotified_results()] == ["v1 published"]
    await store.mark_notified(rid)
    assert await store.unnotified_results() == []


async def test_forget_user_deletes_their_messages_replies_and_votes(store):
    mine = await add_reply(store, msg_author="alice", pid="m1")
    theirs = await add_reply(store, msg_author="bob", pid="m2", channel="c2")
    await store.set_vote(theirs, "alice", "👍", 1.0)
    await store.set_vote(theirs, "bob", "👍", 1.0)
    await store.set_vote(mine, "bob", "👎", -1.0)
    gone = await store.forget_user("discord", "alice")
    assert gone == {"messages": 1, "replies": 1, "replies_to_others": 0, "votes": 1, "other_votes": 1,
                    "trained": [], "untouched": [0]}
    assert await store.get_reply(mine) is None
    assert await store.votes_for(theirs) == [("bob", "👍", 1.0)]
    assert await store.reply_for_message("discord", "r-m1") is None   # cascade
    left = await store._all("SELECT author_id FROM messages")
    assert [r["author_id"] for r in left] == ["bob"]


async def test_forget_user_deletes_later_replies_in_their_channels_and_names_the_versions(store):
    """A reply's prompt holds the channel's recent messages as context: every reply in a channel
    after the person first wrote there goes; earlier ones, other channels and platforms stay."""
    async def later(what):      # rows are stamped with time.time(): keep their order strict
        await asyncio.sleep(0.005)
        return await what

    await store.add_version(1, 0, "/v1", "aa", "published", {}, activate=True)
    before = await later(add_reply(store, msg_author="carol", pid="m0"))         # c1, before alice spoke
    mine = await later(add_reply(store, msg_author="alice", pid="m1"))
    after = await later(add_reply(store, msg_author="dave", pid="m2"))           # c1, alice's words in context
    elsewhere = await add_reply(store, msg_author="dave", pid="m3", channel="c2")
    slack = await add_reply(store, msg_author="alice", pid="m4", platform="slack")
    await store.set_vote(after, "dave", "👍", 1.0)
    await store.set_vote(before, "alice", "👍", 1.0)
    await asyncio.sleep(0.005)
    await store.add_version(2, 1, "/v2", "bb", "published", {}, activate=True)
    await store.add_version(3, 2, None, None, "rejected", {}, reason="KL")
    await store.add_train_request("discord", "c1", "alice")
    gone = await store.forget_user("discord", "alice")
    assert gone == {"messages": 1, "replies": 2, "replies_to_others": 1, "votes": 1, "other_votes": 1,
                    "trained": [2], "untouched": [1, 0]}
    assert [await store.get_reply(r) is None for r in (before, mine, after, elsewhere, slack)] == \
        [False, True, True, False, False]
    assert await store.votes_for(before) == []
    assert [r["requested_by"] for r in await store.train_requests()] == [FORGOTTEN]
    left = await store._all("SELECT platform, author_id FROM messages ORDER BY id")
    assert [tuple(r) for r in left] == [("discord", "carol"), ("discord", "dave"), ("discord", "dave"),
                                          ("slack", "alice")]     # others' messages stay: their words
    # forgetting again finds nothing, and no version holds nothing
    assert await store.forget_user("discord", "alice") == {
        "messages": 0, "replies": 0, "replies_to_others": 0, "votes": 0, "other_votes": 0,
        "trained": [], "untouched": [2, 1, 0]}


async def test_sql_and_its_parameters_never_reach_a_log(tmp_path, caplog):
    """aiosqlite logs each call's SQL and parameters at DEBUG; the store keeps that out of logs
    even with the root logger at DEBUG."""
    caplog.set_level(logging.DEBUG)
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        await add_reply(store, msg_author="alice", text="my zorblatting secret")
        await store.forget_user("discord", "alice")
    finally:
        await store.close()
    assert "zorblatting" not in caplog.text and "INSERT" not in caplog.text and "alice" not in caplog.text
