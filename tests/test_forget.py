"""/forget end to end: the real chat core on the tiny model, the real store, a real trainer round.

A person's words live in their messages, in the replies to them, and in other people's replies
whose prompt held them as context; /forget deletes all of those and names the published
versions trained on them, and none of it reaches a log. Each reply records whose words its
context held (``reply_context_authors``), so in a busy channel the replies whose context had
moved past the person stay; replies recorded before that record fall back to the channel rule
(every later reply in a channel where they wrote)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from bot.chat import ChatCore
from bot.events import Command, HistoryItem, Message
from bot.policy import Policy
from bot.store import MIGRATIONS, Store, _statements
from tests.trainer_helpers import CONSOLE, tiny_config, trainer_config
from trainer.learner import Learner
from trainer.round import run_round

UP, DOWN = "\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"
SECRET = "zorblatting quixotic wombats"       # bob's words: made up, so nothing else holds them


def contains(haystack: list[int], needle: list[int]) -> bool:
    return any(haystack[i:i + len(needle)] == needle for i in range(len(haystack) - len(needle) + 1))


async def test_forget_removes_their_words_everywhere_and_names_the_versions_trained_on_them(
        tmp_path, tiny_model_dir, store_for, caplog):
    caplog.set_level(logging.DEBUG)       # every logger, the root too: their words must not show at any level
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1, "max_user_share": 1.0, "punish_degenerate": False},
                      model={"name": str(tiny_model_dir), "system_prompt": "Be brief.", "max_context_tokens": 256},
                      serving={"engine": "torch"}, chat={"rate_limit_per_minute": 0})
    tcfg = trainer_config(cfg)
    store = await store_for(cfg)
    policy = await asyncio.to_thread(Policy.from_config, cfg)
    try:
        core = ChatCore(cfg, store, policy)
        texts: dict[int, str] = {}

        async def ask(author: str, text: str, channel: str = "c1", history: tuple = ()) -> int:
            n = len(texts)

            async def send(reply: str) -> list[str]:
                return [f"r{n}"]

            msg = Message("discord", f"m{n}", channel, author, author.title(), text, **CONSOLE)
            rid = await core.on_message(msg, list(history), send)
            texts[rid] = (await store.get_reply(rid)).text
            await asyncio.sleep(0.005)          # rows are stamped with time.time(): keep their order strict
            return rid

        async def train(version: int) -> None:
            result = await run_round(store, cfg, tcfg, Learner(cfg, tcfg), use_all=True)
            assert result.status == "published" and result.version == version, result.reason
            await core.sync_version()
            await asyncio.sleep(0.005)

        # v1 learns from dave and erin, before bob ever spoke
        to_dave = await ask("dave", "hello there, how are you today?")
        to_erin = await ask("erin", "tell me a joke about cats")
        await core.vote(to_dave, "dave", UP, 1.0)
        await core.vote(to_erin, "erin", DOWN, -1.0)
        await train(1)

        # bob speaks; alice speaks after him in the same channel, his words in her reply's context
        to_bob = await ask("bob", f"I keep {SECRET} in the shed")
        to_alice = await ask("alice", "what did he say?", history=(
            HistoryItem("Bob", f"I keep {SECRET} in the shed", False, author_id="bob", message_id="m2"),
            HistoryItem("bot", texts[to_bob], True, message_id="r2")))
        to_carol = await ask("carol", "what is the weather like?", channel="c2")
        needle = policy.tokenizer.encode(f" {SECRET}", add_special_tokens=False)
        held = [rid for rid in texts if contains((await store.get_reply(rid)).prompt_ids, needle)]
        assert held == [to_bob, to_alice]
        await core.vote(to_alice, "alice", UP, 1.0)
        await core.vote(to_bob, "carol", DOWN, -1.0)      # others' votes on replies that go: 2
        await core.vote(to_carol, "bob", UP, 1.0)
        await core.vote(to_dave, "bob", DOWN, -1.0)
        await train(2)                        # v2 learns from all of it

        result = await core.on_command(Command("discord", "c1", "bob", "forget"))
        assert result.ok and result.text == (
            "Forgot user bob: 1 messages, 2 replies, 2 votes deleted. 1 of the replies answered other people with "
            "their words in the context (or, for replies without a record of their context, came later in a channel "
            "where they wrote), with 2 votes on them. Versions trained on their data: v2. An admin can /rollback 1 to serve v1, the newest version made "
            "before their data.")

        # his message, the reply to him and the reply to alice are gone, with every vote on them
        assert [await store.get_reply(r) is None for r in (to_dave, to_erin, to_bob, to_alice, to_carol)] == \
            [False, False, True, True, False]
        assert await store.votes_for(to_carol) == [] and await store.votes_for(to_dave) == [("dave", UP, 1.0)]
        rows = await store._all("SELECT author_id FROM messages ORDER BY id")
        assert [r["author_id"] for r in rows] == ["dave", "erin", "alice", "carol"]   # alice's own words stay
        # no stored prompt holds his words' tokens, no stored text holds his words
        prompts = [r.prompt_ids for r in await store._replies("", ())]
        assert len(prompts) == 3 and not any(contains(p, needle) for p in prompts)
        con = sqlite3.connect(cfg.db_path)
        try:
            dump = "\n".join(con.iterdump())
        finally:
            con.close()
        assert "zorblat" not in dump and "wombat" not in dump
        # and nothing of his reached a log, at any level (no SQL with its parameters either)
        assert "zorblat" not in caplog.text and "wombat" not in caplog.text and "INSERT" not in caplog.text
    finally:
        policy.close()


ANN = "flibbertigibbet marmalade zeppelins"     # ann's words: made up, so nothing else holds them
DAY = 86400.0


async def context_authors(store, reply_id: int) -> list[str]:
    rows = await store._all("SELECT user_id FROM reply_context_authors WHERE reply_id = ? ORDER BY user_id",
                            (reply_id,))
    return [r["user_id"] for r in rows]


async def test_in_a_busy_channel_forget_deletes_only_the_replies_whose_context_held_them(
        tmp_path, tiny_model_dir, store_for):
    """Ann writes once; Bob and Cy chat on. The context is the last 3 channel messages: the
    replies whose context held her message, or the bot's reply to her, go; the later ones, whose
    context had moved past both, stay (the channel rule deleted every later reply in c1)."""
    cfg = tiny_config(tmp_path, tiny_model_dir, serving={"engine": "torch"},
                      model={"name": str(tiny_model_dir), "system_prompt": "Be brief.", "max_context_tokens": 256},
                      chat={"rate_limit_per_minute": 0, "history_messages": 3})
    store = await store_for(cfg)
    policy = await asyncio.to_thread(Policy.from_config, cfg)
    try:
        core = ChatCore(cfg, store, policy)
        channel: list[HistoryItem] = []       # c1 as the platform hands it over, oldest first
        replies: list[int] = []

        async def say(author: str, text: str) -> None:
            n = len(replies)

            async def send(reply: str) -> list[str]:
                return [f"r{n}"]

            msg = Message("discord", f"m{n}", "c1", author, author.title(), text, **CONSOLE)
            rid = await core.on_message(msg, list(channel), send)
            channel.extend([HistoryItem(author.title(), text, False, author_id=author, message_id=f"m{n}"),
                            HistoryItem("bot", (await store.get_reply(rid)).text, True, message_id=f"r{n}")])
            replies.append(rid)
            await asyncio.sleep(0.005)          # rows are stamped with time.time(): keep their order strict

        await say("cy", "morning all")                     # 0: before ann spoke
        await say("ann", f"my {ANN} are a secret")          # 1: the reply to her
        for i, who in enumerate(["bob", "cy", "bob", "cy", "bob"]):
            await say(who, f"chat number {i}")             # 2: her message in context, 3: the reply to her
        needle = policy.tokenizer.encode(f" {ANN}", add_special_tokens=False)
        held = [i for i, rid in enumerate(replies) if contains((await store.get_reply(rid)).prompt_ids, needle)]
        assert held == [1, 2]
        # whose words each context held: the asker, the people in it, and whom the bot's replies in it answered
        assert [await context_authors(store, rid) for rid in replies] == [
            ["cy"], ["ann", "cy"], ["ann", "bob", "cy"], ["ann", "bob", "cy"], ["bob", "cy"], ["bob", "cy"],
            ["bob", "cy"]]
        for rid in replies:
            await core.vote(rid, "dave", UP, 1.0)

        gone = await store.forget_user("discord", "ann")
        assert (gone["messages"], gone["replies"], gone["replies_to_others"], gone["other_votes"]) == (1, 3, 2, 3)
        assert [await store.get_reply(rid) is not None for rid in replies] == \
            [True, False, False, False, True, True, True]
        assert [len(await store.votes_for(rid)) for rid in replies] == [1, 0, 0, 0, 1, 1, 1]
        prompts = [r.prompt_ids for r in await store._replies("", ())]
        assert len(prompts) == 4 and not any(contains(p, needle) for p in prompts)
        # her id is in no remaining context record; the others' records stay
        assert await store._all("SELECT * FROM reply_context_authors WHERE user_id = 'ann'") == []
        assert [await context_authors(store, rid) for rid in replies[4:]] == [["bob", "cy"]] * 3
        con = sqlite3.connect(cfg.db_path)
        try:
            dump = "\n".join(con.iterdump())
        finally:
            con.close()
        assert "flibbertigibbet" not in dump and "zeppelin" not in dump
    finally:
        policy.close()


async def test_a_bot_reply_in_the_context_that_no_longer_resolves_counts_as_someone_unknown(
        tmp_path, tiny_model_dir, store_for):
    """Zed asks; Ann asks with the reply to Zed in her context; /forget zed deletes both replies
    (the one to Ann held his words). Bob then asks with only the reply to Ann in his context (it
    is still on the platform, the store no longer has it): no one can say whom it answered, so
    Bob's reply records '' for it, and /forget ann deletes it by the channel rule (the reply to
    her, in his prompt, may hold her words). A notice in the context (no stored reply) is '' too."""
    cfg = tiny_config(tmp_path, tiny_model_dir, serving={"engine": "torch"},
                      model={"name": str(tiny_model_dir), "system_prompt": "Be brief.", "max_context_tokens": 256},
                      chat={"rate_limit_per_minute": 0, "history_messages": 1})
    store = await store_for(cfg)
    policy = await asyncio.to_thread(Policy.from_config, cfg)
    try:
        core = ChatCore(cfg, store, policy)
        channel: list[HistoryItem] = []
        replies: list[int] = []

        async def say(author: str, text: str) -> int:
            n = len(replies)

            async def send(reply: str) -> list[str]:
                return [f"r{n}"]

            rid = await core.on_message(Message("discord", f"m{n}", "c1", author, author.title(), text, **CONSOLE),
                                        list(channel), send)
            channel.extend([HistoryItem(author.title(), text, False, author_id=author, message_id=f"m{n}"),
                            HistoryItem("bot", (await store.get_reply(rid)).text, True, message_id=f"r{n}")])
            replies.append(rid)
            await asyncio.sleep(0.005)          # rows are stamped with time.time(): keep their order strict
            return rid

        await say("zed", "hello from zed")
        to_ann = await say("ann", f"my {ANN} are a secret")
        assert await context_authors(store, to_ann) == ["ann", "zed"]
        gone = await store.forget_user("discord", "zed")
        assert gone["replies"] == 2 and await store.get_reply(to_ann) is None     # ann's message stays
        to_bob = await say("bob", "what did the bot say?")
        assert await context_authors(store, to_bob) == ["", "bob"]
        channel.append(HistoryItem("bot", "I'm busy, try again", True, message_id="notice-1"))
        to_cy = await say("cy", "and now?")
        assert await context_authors(store, to_cy) == ["", "cy"]

        gone = await store.forget_user("discord", "ann")
        assert await store.get_reply(to_bob) is None and await store.get_reply(to_cy) is None   # the channel rule
        assert gone["messages"] == 1 and gone["replies"] == 2
    finally:
        policy.close()


def schema_2_database(path, exchanges) -> None:
    """A database as schema 2 left it (no context record), with ``exchanges``: (author, channel,
    time) → a message and the bot's reply to it one second later."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for number, script in enumerate(MIGRATIONS[:2], 1):
        for stmt in _statements(script):
            con.execute(stmt)
        con.execute("INSERT INTO schema_version VALUES (?)", (number,))
    for n, (author, channel, at) in enumerate(exchanges):
        mid = con.execute("INSERT INTO messages (platform, platform_message_id, channel_id, author_id, text, created_at)"
                          " VALUES ('discord', ?, ?, ?, ?, ?)", (f"old{n}", channel, author, f"{author} says", at)).lastrowid
        con.execute("INSERT INTO replies (platform, channel_id, message_id, version, text, prompt_ids, output_ids,"
                    " logprobs, temperature, top_p, max_new_tokens, created_at)"
                    " VALUES ('discord', ?, ?, 0, 'hi', '[1]', '[2]', '[-0.5]', 0.8, 0.95, 8, ?)", (channel, mid, at + 1))
    con.commit()
    con.close()


async def test_replies_recorded_before_the_context_record_fall_back_to_the_channel_rule(tmp_path):
    path = tmp_path / "old.sqlite3"
    t = time.time() - 1000
    schema_2_database(path, [("cy", "c1", t), ("ann", "c1", t + 10), ("bob", "c1", t + 20), ("bob", "c2", t + 30)])
    store = await Store.open(path)
    try:
        assert await store.schema_version() == len(MIGRATIONS) >= 3
        assert await store._all("SELECT * FROM reply_context_authors") == []    # the old replies have no record
        new = {}
        for name, author, channel, at, authors in [
                ("recorded", "bob", "c1", t + 40, ["bob", "cy"]),          # c1 after ann, her words not in it
                ("unnamed", "cy", "c1", t + 50, ["cy", ""]),               # someone the adapter could not name
                ("carried", "dave", "c3", t + 60, ["ann", "dave"])]:       # her words, where she never wrote
            mid = await store.add_message("discord", name, channel, author, author, "hello", created_at=at)
            new[name] = await store.add_reply("discord", channel, mid, 0, "hi", [1], [2], [-0.5], 0.8, 0.95, 8,
                                              created_at=at + 1, context_authors=authors)
        assert await context_authors(store, new["carried"]) == ["ann", "dave"]    # written with the reply

        gone = await store.forget_user("discord", "ann")
        # old replies 1 (to cy, before her) and 4 (in c2) stay; 2 (to her) and 3 (c1 after her, no
        # record: it may hold her words) go; of the new ones, what the record says, and "unnamed"
        # by the channel rule
        left = [r["id"] for r in await store._all("SELECT id FROM replies ORDER BY id")]
        assert left == [1, 4, new["recorded"]]
        assert (gone["replies"], gone["replies_to_others"]) == (4, 3)
        assert await store._all("SELECT * FROM reply_context_authors WHERE user_id = 'ann'") == []
        assert await context_authors(store, new["recorded"]) == ["bob", "cy"]
    finally:
        await store.close()


async def test_retention_keeps_an_old_message_only_for_replies_without_the_record(tmp_path):
    """Retention blanks and keeps an old message while a later reply in its channel has no
    context record (/forget's channel rule needs who wrote where and when); a later reply that
    has one names its authors itself, so the message can go."""
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        old = time.time() - 100 * DAY

        async def message(pid: str, channel: str, author: str, at: float) -> int:
            return await store.add_message("discord", pid, channel, author, author.title(), f"{author} says",
                                           created_at=at)

        async def reply(channel: str, mid: int, at: float, authors) -> int:
            return await store.add_reply("discord", channel, mid, 0, "hi", [1], [2], [-0.5], 0.8, 0.95, 8,
                                         created_at=at, context_authors=authors)

        await message("m1", "c1", "ann", old)
        await reply("c1", await message("m2", "c1", "bob", old + 1), old + 2, ["bob"])          # recorded
        await message("m3", "c2", "ann", old)
        unrecorded = await reply("c2", await message("m4", "c2", "cy", old + 1), old + 2, None)
        counts = await store.prune_before(time.time() - DAY, keep_newest=10)
        assert counts == {"replies": 0, "messages": 1, "blanked": 3}
        rows = await store._all("SELECT platform_message_id, author_id, text FROM messages ORDER BY id")
        assert [tuple(r) for r in rows] == [("m2", "bob", ""), ("m3", "ann", ""), ("m4", "cy", "")]
        gone = await store.forget_user("discord", "ann")       # the kept row still finds the unrecorded reply
        assert gone["replies"] == 1 and await store.get_reply(unrecorded) is None
    finally:
        await store.close()
