"""The chat core's own rules, with the real store and policy (the tiny model)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.chat import ERROR_TEXT, POST_TRIES, STORE_TEXT, ChatCore, _version_list
from bot.events import Command, HistoryItem, Message, Reaction
from bot.limits import FLOOD_WRITES, WINDOW
from tests.conftest import make_config


async def test_a_result_that_can_never_be_posted_is_given_up_after_a_few_tries(core):
    rid = await core.store.add_train_request("discord", "gone-channel", "admin")
    await core.store.set_request_status(rid, "done", "v1 published: ...")
    attempts = []

    async def channel_is_gone(channel_id: str, text: str) -> None:     # the platform edge: 404 every time
        attempts.append(channel_id)
        raise RuntimeError("404 Unknown Channel")

    for _ in range(POST_TRIES - 1):
        assert await core.post_results({"discord": channel_is_gone}) == 0
        assert [r["id"] for r in await core.store.unnotified_results()] == [rid]   # tried again next poll
    assert await core.post_results({"discord": channel_is_gone}) == 1              # the last try gives up
    assert await core.store.unnotified_results() == []
    assert len(attempts) == POST_TRIES
    assert await core.post_results({"discord": channel_is_gone}) == 0 and len(attempts) == POST_TRIES


@pytest.mark.parametrize("pruned", [False, True])
async def test_forget_answers_what_went_and_the_versions_trained_on_it(core, tmp_path, pruned):
    s = core.store
    folders = [tmp_path / f"v{i:04d}" for i in (1, 2, 3)]
    for f in folders[int(pruned):]:               # pruned: v1's folder is gone (prune keeps the newest)
        f.mkdir()
    await s.add_version(1, 0, str(folders[0]), "aa", "published", {}, activate=True)
    await asyncio.sleep(0.005)
    bob = await s.add_message("discord", "m1", "c1", "bob", "Bob", "hi there")
    await s.add_reply("discord", "c1", bob, 1, "hello", [1], [2], [-1.0], 0.8, 0.95, 12)
    await asyncio.sleep(0.005)
    alice = await s.add_message("discord", "m2", "c1", "alice", "Alice", "and me?")        # bob's words in context
    to_alice = await s.add_reply("discord", "c1", alice, 1, "you too", [1], [2], [-1.0], 0.8, 0.95, 12)
    await s.set_vote(to_alice, "alice", "👍", 1.0)
    await s.set_vote(to_alice, "bob", "👍", 1.0)
    await asyncio.sleep(0.005)
    await s.add_version(2, 1, str(folders[1]), "bb", "published", {}, activate=True)
    await s.add_version(3, 2, str(folders[2]), "cc", "published", {}, activate=True)
    await s.add_version(4, 3, None, None, "rejected", {}, reason="KL too high")

    refused = await core.on_command(Command("discord", "c1", "alice", "forget", {"user": "bob"}))
    assert not refused.ok and (await s.counts())["messages"] == 2
    nobody = await core.on_command(Command("discord", "c1", "carol", "forget"))
    assert nobody.text == ("Forgot user carol: 0 messages, 0 replies, 0 votes deleted. "
                           "No published version was trained on their data.")
    result = await core.on_command(Command("discord", "c1", "bob", "forget", prefix="/reactlearn "))
    back = "0 to serve the base model" if pruned else "1 to serve v1"
    assert result.ok and result.text == (
        "Forgot user bob: 1 messages, 2 replies, 1 votes deleted. 1 of the replies answered other people with "
        "their words in the context (or, for replies without a record of their context, came later in a channel "
        "where they wrote), with 1 vote on them. Versions trained on their data: v2, v3. "
        f"An admin can /reactlearn rollback {back}, the newest version made before their data.")
    assert await s.counts() == {"messages": 1, "replies": 0, "votes": 0, "rated": 0}   # alice's message stays


def test_a_long_list_of_versions_keeps_its_ends():
    assert _version_list([3, 4]) == "v3, v4"
    assert _version_list(list(range(3, 23))) == "v3, v4, v5, … v21, v22 (20 versions)"


# -- bad input and failures: nothing escapes the chat core ------------------------------


class Clock:
    """A monotonic clock the test moves (the rate limit's and the flood guard's windows)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sent:
    """The platform edge: what the core sent, and a platform message id for each."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def __call__(self, text: str) -> list[str]:
        self.texts.append(text)
        return [f"p{len(self.texts)}"]


def records(caplog, level=logging.WARNING, name="bot") -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= level and r.name.startswith(name)]


def ask(text: str, n: int = 1, user: str = "u1", name: str = "Ann") -> Message:
    return Message("discord", f"m{n}-{user}", "c1", user, name, text, mentions_bot=True)


@pytest.mark.parametrize("text", ["lone \ud800 surrogate \udcff", "nul\x00 bytes\x00", "controls \x1b[31m\r\x07\x7f\x9b",
                                  "x" * 3_000_000 + " end"],
                         ids=["surrogates", "nul", "controls", "3MB"])
async def test_any_text_is_stored_and_answered(core, caplog, text):
    sent = Sent()
    history = [HistoryItem("Bo\ud83d", "said \ud800 this", False)]
    rid = await core.on_message(ask(text, name="A\udc80nn"), history, sent)
    assert rid is not None and len(sent.texts) == 1                     # the reply, nothing else
    row = await core.store._one("SELECT text, author_name FROM messages")
    stored = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")[-core.cfg.chat.max_message_chars:]
    assert (row["text"], row["author_name"]) == (stored, "A\ufffdnn")
    assert "\ufffd" in row["text"] or "\ud800" not in text
    assert records(caplog) == []
    assert await core.on_message(ask("and the next one?", 2), [], sent) is not None    # still serving


async def test_a_store_that_refuses_writes_is_an_apology_logged_once(core, caplog):
    sent = Sent()
    await core.store.db.execute("PRAGMA query_only = 1")       # SQLite refuses every write: "readonly database"
    assert await core.on_message(ask("hello?"), [], sent) is None
    assert sent.texts == [STORE_TEXT]
    [rec] = records(caplog)
    assert rec.levelno == logging.ERROR and "could not store the message for message m1-u1" in rec.getMessage()
    assert "readonly" in rec.getMessage() and rec.exc_info is not None
    await core.store.db.execute("PRAGMA query_only = 0")       # the disk is back: service resumes by itself
    assert await core.on_message(ask("hello again", 2), [], sent) is not None
    assert len(sent.texts) == 2 and (await core.store.counts())["replies"] == 1


async def test_a_store_that_fails_after_generation_is_an_apology_and_nothing_half_stored(core, caplog):
    sent = Sent()
    # SQLite itself refuses the reply row (as a full disk would), after the message row went in
    await core.store.db.execute("CREATE TEMP TRIGGER full BEFORE INSERT ON replies "
                                "BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    assert await core.on_message(ask("hello?"), [], sent) is None
    assert sent.texts == [STORE_TEXT]
    [rec] = records(caplog)
    assert "could not store the reply for message m1-u1" in rec.getMessage() and "disk is full" in rec.getMessage()
    assert (await core.store.counts())["replies"] == 0


async def test_a_policy_that_cannot_generate_is_an_apology_logged_once(core, caplog):
    sent = Sent()
    core.policy.close()                  # a closed real Policy: its lanes are gone (it used to wait forever)
    assert await asyncio.wait_for(core.on_message(ask("hello?"), [], sent), 30) is None
    assert sent.texts == [ERROR_TEXT]
    [rec] = records(caplog)
    assert rec.levelno == logging.ERROR and "could not generate a reply for message m1-u1" in rec.getMessage()
    assert "the policy is closed" in rec.getMessage()
    assert (await core.store.counts())["messages"] == 1      # the message itself is kept


async def test_a_platform_that_refuses_the_reply_is_logged_once_and_never_raises(core, caplog):
    async def refused(text: str) -> list[str]:
        raise ConnectionError("the platform hung up")

    assert await core.on_message(ask("hello?"), [], refused) is None
    [rec] = records(caplog)
    assert "could not send the reply for message m1-u1" in rec.getMessage() and "hung up" in rec.getMessage()
    assert (await core.store.counts())["replies"] == 1        # stored before it was sent, as always


async def test_commands_and_reactions_never_raise(core, caplog):
    await core.store.close()                                    # the database is gone
    result = await core.on_command(Command("slack", "c1", "u1", "status", prefix="/reactlearn "))
    assert not result.ok and result.text == "Sorry, /reactlearn status failed; the error is in the bot's log."
    outcome = await core.on_reaction(Reaction("discord", "c1", "p1", "u2", "👍", added=True))
    assert outcome.startswith("failed: ")
    assert len(records(caplog, logging.ERROR)) == 2            # one line each


# -- the rate limit: one notice per window ---------------------------------------------


async def test_over_the_rate_limit_one_notice_per_window_per_person(tmp_path, tiny_model_dir, store, shared_policy):
    clock = Clock()
    cfg = make_config(tmp_path, tiny_model_dir, chat={"rate_limit_per_minute": 2})
    core = ChatCore(cfg, store, shared_policy, clock=clock)
    sent = {user: Sent() for user in ("ann", "bob")}

    async def flood(user: str, n: int, start: int) -> list[int | None]:
        return [await core.on_message(ask(f"q{i}", start + i, user), [], sent[user]) for i in range(n)]

    replies = await flood("ann", 8, 0)
    assert sum(r is not None for r in replies) == 2
    notice = [t for t in sent["ann"].texts if "faster than I can learn" in t]
    assert len(notice) == 1 and len(sent["ann"].texts) == 3              # 2 replies, 1 notice for 6 over
    clock.now += 59                                                      # same window: more silence
    assert await flood("ann", 5, 10) == [None] * 5 and len(sent["ann"].texts) == 3
    assert sum(r is not None for r in await flood("bob", 3, 0)) == 2     # another person: their own limit
    assert len(sent["bob"].texts) == 3
    clock.now += 2                                                       # a new window: 2 more, one more notice
    assert sum(r is not None for r in await flood("ann", 6, 20)) == 2
    assert [t for t in sent["ann"].texts if "faster" in t] == notice * 2 and len(sent["ann"].texts) == 6
    assert (await store.counts())["messages"] == 6                        # over-limit messages are not stored


# -- reaction floods: bounded writes, exactly the final state -------------------------------


async def test_a_reaction_flood_costs_bounded_writes_and_stores_the_final_state(cfg, store, shared_policy, caplog):
    clock = Clock()
    core = ChatCore(cfg, store, shared_policy, clock=clock)
    s = core.store
    mid = await s.add_message("discord", "m1", "c1", "bob", "Bob", "hi")
    rid = await s.add_reply("discord", "c1", mid, 0, "hello", [1], [2], [-1.0], 0.8, 0.95, 12)
    await s.link_reply_message(rid, "discord", "p1")
    await s.set_vote(rid, "carol", "👎", -1.0)
    before, log_lines = s.db.total_changes, len(records(caplog, logging.INFO))
    outcomes = [await core.on_reaction(Reaction("discord", "c1", "p1", "ann", "👍", added=i % 2 == 0))
                for i in range(501)]                          # add, remove, add, ... add: 501 events
    assert outcomes[:FLOOD_WRITES] == ["added", "removed"] * (FLOOD_WRITES // 2)
    assert set(outcomes[FLOOD_WRITES:]) == {"held: a reaction flood (the final state is written shortly)"}
    assert s.db.total_changes - before == FLOOD_WRITES         # the rest is held in memory
    assert await core.flush_votes() == 1
    assert sorted(await s.votes_for(rid)) == [("ann", "👍", 1.0), ("carol", "👎", -1.0)]     # exactly the final state
    assert s.db.total_changes - before == FLOOD_WRITES + 1
    assert await core.flush_votes() == 0                        # nothing more to write
    flood_logs = records(caplog, logging.INFO)[log_lines:]
    assert len(flood_logs) == FLOOD_WRITES + 1                   # the written votes, one warning about the flood
    assert "reaction flood: user ann changed 👍 on reply #1" in flood_logs[-1].getMessage()

    # still flooding in the same window: each change is held, then written once
    assert await core.on_reaction(Reaction("discord", "c1", "p1", "ann", "👍", added=False)) != "removed"
    assert await core.flush_votes() == 1 and sorted(await s.votes_for(rid)) == [("carol", "👎", -1.0)]
    clock.now += WINDOW + 1                                       # calm again: written at once
    assert await core.on_reaction(Reaction("discord", "c1", "p1", "ann", "👍", added=True)) == "added"
    assert len(records(caplog, logging.WARNING)) == 1             # the flood was logged once


async def test_a_reaction_change_that_arrives_after_a_newer_one_is_dropped(core):
    """Slack says when each change happened (event_ts), and its client may hand two of them over
    swapped: the older one, arriving last, does not undo the newer."""
    s = core.store
    rid = await s.add_reply("slack", "C1", None, 0, "hello", [1], [2], [-1.0], 0.8, 0.95, 12)
    await s.link_reply_message(rid, "slack", "C1:1.0")
    vote = lambda added, at: core.on_reaction(Reaction("slack", "C1", "C1:1.0", "U2", "+1", added=added, at=at))
    assert await vote(True, 10.000100) == "added"
    assert await vote(True, 10.000300) == "added"                 # add (t=3) came before remove (t=2)
    assert await vote(False, 10.000200) == "ignored: a newer change of this reaction came first"
    assert await s.votes_for(rid) == [("U2", "👍", 1.0)]
    assert await vote(False, 10.000400) == "removed" and await s.votes_for(rid) == []
