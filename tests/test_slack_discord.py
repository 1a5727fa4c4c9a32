"""Discord and Slack in one process: one chat core, one policy, one store, both loopback fakes."""

from __future__ import annotations

import asyncio
import contextlib

from bot.adapters.discord import DiscordAdapter
from bot.adapters.slack import SlackAdapter
from bot.chat import ChatCore
from bot.config import Secret
from bot.policy import Policy
from bot.rewards import THUMBS_DOWN, THUMBS_UP
from bot.store import Store
from tests.conftest import make_config
from tests.fakes.discord import BOB_ID, FAKE_TOKEN, GENERAL_ID, FakeDiscord
from tests.fakes.slack_server import FakeSlack
from tests.test_slack import until

VOTES = ("SELECT r.platform, v.user_id, v.emoji, v.value FROM votes v JOIN replies r ON r.id = v.reply_id"
         " ORDER BY r.platform")


async def exchange(store: Store, fd: FakeDiscord, fs: FakeSlack) -> None:
    """A message on each platform gets a reply; a vote on each reply is recorded in the one store."""
    msg = await fd.user_message(GENERAL_ID, BOB_ID, "hello from discord", mentions_bot=True)
    d_reply = await fd.wait_bot_message(GENERAL_ID)
    assert d_reply["message_reference"]["message_id"] == msg["id"]
    ts = await fs.user_message("C1", "U1", "hello from slack", mention_bot=True)
    s_reply = await fs.wait_bot_message("C1", thread_ts=ts)

    d_id = await until(lambda: store.reply_for_message("discord", d_reply["id"]), what="discord reply row")
    s_id = await until(lambda: store.reply_for_message("slack", f"C1:{s_reply['ts']}"), what="slack reply row")
    assert d_id != s_id
    await fd.react(GENERAL_ID, d_reply["id"], BOB_ID, THUMBS_UP)
    await fs.react("C1", s_reply["ts"], "U2", "-1::skin-tone-4")
    expected = [("discord", str(BOB_ID), THUMBS_UP, 1.0), ("slack", "U2", THUMBS_DOWN, -1.0)]

    async def votes():
        return [tuple(r) for r in await store._all(VOTES)] == expected

    await until(votes, what="a vote on each platform")
    rows = [tuple(r) for r in await store._all("SELECT platform, channel_id, author_id, text FROM messages ORDER BY platform")]
    assert rows == [("discord", str(GENERAL_ID), str(BOB_ID), "hello from discord"),
                    ("slack", "C1", "U1", "hello from slack")]


async def results_posted(store: Store, fd: FakeDiscord, fs: FakeSlack) -> None:
    """Trainer results reach the platform and channel each retrain came from (the shared background loop)."""
    d_req = await store.add_train_request("discord", str(GENERAL_ID), str(BOB_ID))
    s_req = await store.add_train_request("slack", "C2", "UADMIN")
    await store.set_request_status(d_req, "done", "published v1")
    await store.set_request_status(s_req, "done", "rejected: KL too high")
    assert (await fd.wait_bot_message(GENERAL_ID))["content"] == f"Retrain #{d_req}: published v1"
    assert (await fs.wait_bot_message("C2"))["text"] == f"Retrain #{s_req}: rejected: KL too high"


async def test_discord_and_slack_share_one_core(tmp_path, tiny_model_dir):
    cfg = make_config(tmp_path, tiny_model_dir, chat={"rate_limit_per_minute": 0})
    store = await Store.open(cfg.db_path)
    policy = Policy.from_config(cfg)
    core = ChatCore(cfg, store, policy)
    try:
        async with FakeDiscord() as fd, FakeSlack() as fs:
            d = DiscordAdapter(core, cfg, guild_ready_timeout=0.1)
            s = SlackAdapter(core, cfg, client=fs.make_client())
            tasks = [asyncio.create_task(core.run_background({"discord": d.post, "slack": s.post})),
                     asyncio.create_task(d.start(FAKE_TOKEN)),
                     asyncio.create_task(s.start(fs.bot_token, fs.app_token))]
            try:
                await asyncio.wait_for(asyncio.gather(fd.wait_connected(), d.client.wait_until_ready(),
                                                      s.ready.wait()), 15)
                await exchange(store, fd, fs)
                await results_posted(store, fd, fs)
            finally:
                await d.close()
                await s.close()
                tasks[0].cancel()
                results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
                assert not [r for r in results[1:] if isinstance(r, BaseException)]
            fd.assert_clean()
            assert fs.unknown_calls == []
    finally:
        policy.close()
        await store.close()


async def test_serve_runs_both_platforms(tmp_path, tiny_model_dir):
    """`python -m bot` with platforms = ["discord", "slack"]: bot.__main__.serve itself, against both fakes."""
    from bot.__main__ import serve

    async with FakeDiscord() as fd, FakeSlack() as fs:
        cfg = make_config(tmp_path, tiny_model_dir, platforms=["discord", "slack"],
                          chat={"rate_limit_per_minute": 0}, slack={"api_url": fs.api_url})
        cfg.discord_token, cfg.slack_bot_token, cfg.slack_app_token = \
            Secret(FAKE_TOKEN), Secret(fs.bot_token), Secret(fs.app_token)
        task = asyncio.create_task(serve(cfg))
        try:
            waits = asyncio.gather(fd.wait_connected(timeout=30), fs.wait_connected(timeout=30))
            done, _ = await asyncio.wait({task, waits}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()
            assert waits in done, "serve() did not connect to both platforms"
            store = await Store.open(cfg.db_path)        # a second connection, as the trainer has
            try:
                await exchange(store, fd, fs)
                await results_posted(store, fd, fs)
            finally:
                await store.close()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 15)
        assert not fd.connected and not fs.connected      # serve closed both connections on the way out
        fd.assert_clean()
