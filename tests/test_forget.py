"""/forget end to end: the real chat core on the tiny model, the real store, a real trainer round.

A person's words live in their messages, in the replies to them, and in other people's replies
whose prompt held them as context; /forget deletes all of those and names the published
versions trained on them, and none of it reaches a log."""

from __future__ import annotations

import asyncio
import logging
import sqlite3

from bot.chat import ChatCore
from bot.events import Command, HistoryItem, Message
from bot.policy import Policy
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
            HistoryItem("Bob", f"I keep {SECRET} in the shed", False), HistoryItem("bot", texts[to_bob], True)))
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
            "Forgot user bob: 1 messages, 2 replies, 2 votes deleted. 1 of the replies answered other people in "
            "channels where they wrote (their words may have been in the context), with 2 votes on them. "
            "Versions trained on their data: v2. An admin can /rollback 1 to serve v1, the newest version made "
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
