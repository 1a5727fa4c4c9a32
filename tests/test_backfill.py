"""Votes given or taken back while the bot was away: on connecting and after each reconnect the
Discord adapter reads the REST reaction lists of its recent replies and the Slack adapter
``reactions.get``, and the store ends with exactly the votes people have on them now.

Real discord.py and slack-bolt against the loopback fakes, with the real chat core, store and
tiny policy. The fakes change reactions "silently" (the lists change, no gateway or Socket Mode
event is sent or kept for a replay), as when the bot was not connected."""

from __future__ import annotations

import asyncio
import contextlib
import time

from bot.adapters.discord import DiscordAdapter
from bot.adapters.slack import SlackAdapter
from bot.chat import ChatCore
from bot.config import validate
from bot.policy import Policy
from bot.rewards import THUMBS_DOWN as DOWN
from bot.rewards import THUMBS_UP as UP
from bot.store import Store
from tests.conftest import make_config
from tests.fakes.discord import ALICE_ID, BOB_ID, BOT_CHAT_ID, BOT_ID, CAROL_ID, FAKE_TOKEN, FakeDiscord, running_client
from tests.fakes.slack_server import FakeSlack

OTHER_BOT_ID = 3001
TADA = "\N{PARTY POPPER}"
UP_TONED = UP + "\N{EMOJI MODIFIER FITZPATRICK TYPE-4}"


async def eventually(check, timeout: float = 60.0, what: str = "condition"):
    """Poll an async ``check`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.03)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


async def votes_become(store: Store, reply_id: int, expected: set[tuple[str, str, float]], what: str) -> None:
    async def check():
        return set(await store.votes_for(reply_id)) == expected
    try:
        await eventually(check, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: votes are {await store.votes_for(reply_id)}, expected {sorted(expected)}")


@contextlib.asynccontextmanager
async def bot_parts(tmp_path, model_dir, **sections):
    """The store, policy and core one bot process has (adapters come and go around them)."""
    sections.setdefault("chat", {}).update(rate_limit_per_minute=0, channels=[str(BOT_CHAT_ID)])
    cfg = validate(make_config(tmp_path, model_dir, **sections))
    store = await Store.open(cfg.db_path)
    policy = Policy.from_config(cfg)
    try:
        yield cfg, store, ChatCore(cfg, store, policy)
    finally:
        policy.close()
        await store.close()


# -- Discord ---------------------------------------------------------------------------


def discord_adapter(core: ChatCore, cfg) -> DiscordAdapter:
    return DiscordAdapter(core, cfg, guild_ready_timeout=0.1)


async def discord_reply(fake: FakeDiscord, store: Store) -> tuple[dict, int]:
    """Bob asks; the bot's reply message once its seeds are on it, and its reply id."""
    await fake.user_message(BOT_CHAT_ID, BOB_ID, "hello there")
    reply = await fake.wait_bot_message(BOT_CHAT_ID, timeout=30)
    rid = await eventually(lambda: store.reply_for_message("discord", reply["id"]), what="the reply row")
    await fake.wait_for(lambda: {UP, DOWN} <= {k for k, users in fake.reactions_on(int(reply["id"])).items()
                                               if BOT_ID in users})
    return reply, rid


async def test_discord_reconciles_votes_on_start_resume_and_a_fresh_session(tmp_path, tiny_model_dir):
    async with FakeDiscord() as fake, bot_parts(tmp_path, tiny_model_dir) as (cfg, store, core):
        async with running_client(fake, discord_adapter(core, cfg).client, token=FAKE_TOKEN):
            reply, rid = await discord_reply(fake, store)
            await fake.react(BOT_CHAT_ID, reply["id"], BOB_ID, UP)
            await votes_become(store, rid, {(str(BOB_ID), UP, 1.0)}, "Bob's live vote")
        mid = reply["id"]

        # The bot is down: Bob takes his 👍 back, Alice votes 👎, Carol 👍 with a skin tone and
        # 🎉 (no vote), another bot 👍 (bots never vote). Discord will never send these events.
        await fake.react(BOT_CHAT_ID, mid, BOB_ID, UP, add=False, silent=True)
        await fake.react(BOT_CHAT_ID, mid, ALICE_ID, DOWN, silent=True)
        await fake.react(BOT_CHAT_ID, mid, CAROL_ID, UP_TONED, silent=True)
        await fake.react(BOT_CHAT_ID, mid, CAROL_ID, TADA, silent=True)
        await fake.react(BOT_CHAT_ID, mid, OTHER_BOT_ID, UP, bot_user=True, silent=True)
        async with running_client(fake, discord_adapter(core, cfg).client, token=FAKE_TOKEN):
            await votes_become(store, rid, {(str(ALICE_ID), DOWN, -1.0), (str(CAROL_ID), UP, 1.0)},
                               "reconciled on start")

            # Connected, but these happen while the socket is being replaced (op 7 RECONNECT,
            # then RESUME): reconciled on RESUMED.
            await fake.react(BOT_CHAT_ID, mid, ALICE_ID, DOWN, add=False, silent=True)
            await fake.react(BOT_CHAT_ID, mid, BOB_ID, DOWN, silent=True)
            resumes = fake.resume_count
            await fake.request_reconnect()
            await fake.wait_for(lambda: fake.resume_count > resumes)
            await votes_become(store, rid, {(str(BOB_ID), DOWN, -1.0), (str(CAROL_ID), UP, 1.0)},
                               "reconciled after a resume")

            # A session Discord can't resume: a fresh IDENTIFY and READY, nothing replayed.
            await fake.react(BOT_CHAT_ID, mid, CAROL_ID, UP_TONED, add=False, silent=True)
            identifies = fake.identify_count
            await fake.invalidate_sessions()
            await fake.wait_for(lambda: fake.identify_count > identifies and fake.connected)
            await votes_become(store, rid, {(str(BOB_ID), DOWN, -1.0)}, "reconciled after a fresh session")

            # live events still count as before
            await fake.react(BOT_CHAT_ID, mid, ALICE_ID, UP)
            await votes_become(store, rid, {(str(BOB_ID), DOWN, -1.0), (str(ALICE_ID), UP, 1.0)}, "a live vote")
        fake.assert_clean()


async def test_discord_leaves_votes_alone_when_a_reply_cannot_be_read_and_when_off(tmp_path, tiny_model_dir):
    async with FakeDiscord() as fake, bot_parts(tmp_path, tiny_model_dir) as (cfg, store, core):
        adapter = discord_adapter(core, cfg)
        async with running_client(fake, adapter.client, token=FAKE_TOKEN):
            reply, rid = await discord_reply(fake, store)
            await fake.react(BOT_CHAT_ID, reply["id"], BOB_ID, UP)
            await votes_become(store, rid, {(str(BOB_ID), UP, 1.0)}, "Bob's live vote")
            await fake.delete_message(BOT_CHAT_ID, reply["id"])     # deleted by a moderator
            assert await adapter.backfill("a test") == (0, 0, 0)     # 1 reply, unreadable: left as it is
            assert await store.votes_for(rid) == [(str(BOB_ID), UP, 1.0)]

        await fake.react(BOT_CHAT_ID, reply["id"], BOB_ID, UP, add=False, silent=True)
        cfg.chat.backfill_hours = 0                                  # off: nothing is read (on connecting either:
        adapter = discord_adapter(core, cfg)                         # on_ready runs this same backfill)
        async with running_client(fake, adapter.client, token=FAKE_TOKEN):
            before = len(fake.requests)
            assert await adapter.backfill("connecting") == (0, 0, 0)
            assert [r for r in fake.requests[before:] if r[0] == "GET" and "/messages/" in r[1]] == []
        assert await store.votes_for(rid) == [(str(BOB_ID), UP, 1.0)]


async def test_a_reaction_removed_live_while_its_list_is_read_stays_removed(tmp_path, tiny_model_dir):
    """The list is read first (it still shows Bob's 👍), then Bob takes it back live (a gateway
    event, and his vote row goes), then the list is reconciled: the vote must stay gone. A live
    add meanwhile (Alice's 👎, not in the list) stays too."""
    async with FakeDiscord() as fake, bot_parts(tmp_path, tiny_model_dir) as (cfg, store, core):
        adapter = discord_adapter(core, cfg)
        async with running_client(fake, adapter.client, token=FAKE_TOKEN):
            reply, rid = await discord_reply(fake, store)
            await fake.react(BOT_CHAT_ID, reply["id"], BOB_ID, UP)
            await votes_become(store, rid, {(str(BOB_ID), UP, 1.0)}, "Bob's live vote")
            read = adapter._reactions_on                   # the adapter's real read, at its real call site
            listed_then: list = []

            async def read_while_bob_takes_it_back(channel_id, message_ids):
                listed = await read(channel_id, message_ids)
                listed_then.extend((r.user_id, r.emoji) for r in listed)
                await fake.react(BOT_CHAT_ID, reply["id"], BOB_ID, UP, add=False)     # live, mid-read
                await fake.react(BOT_CHAT_ID, reply["id"], ALICE_ID, DOWN)
                await votes_become(store, rid, {(str(ALICE_ID), DOWN, -1.0)}, "the live changes")
                return listed

            adapter._reactions_on = read_while_bob_takes_it_back
            assert await adapter.backfill("a test") == (1, 0, 0)
            assert (str(BOB_ID), UP) in listed_then           # the list was read before he took it back
            assert await store.votes_for(rid) == [(str(ALICE_ID), DOWN, -1.0)]
            adapter._reactions_on = read
            assert await adapter.backfill("a test") == (1, 0, 0)     # and the next pass agrees with Discord
            assert await store.votes_for(rid) == [(str(ALICE_ID), DOWN, -1.0)]
        fake.assert_clean()


# -- Slack -----------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def slack_running(fake: FakeSlack, core: ChatCore, cfg):
    adapter = SlackAdapter(core, cfg, client=fake.make_client())
    task = asyncio.create_task(adapter.start(fake.bot_token, fake.app_token))

    async def up() -> bool:
        return adapter.ready.is_set() or task.done()

    await eventually(up, what="slack connected")
    if task.done():
        task.result()
    try:
        yield adapter
    finally:
        await adapter.close()
        await asyncio.wait_for(task, 10)


async def test_slack_reconciles_votes_on_start_and_after_a_socket_mode_reconnect(tmp_path, tiny_model_dir):
    async with FakeSlack() as fake, bot_parts(tmp_path, tiny_model_dir) as (cfg, store, core):
        fake.add_user("UBOT2", "otherbot", is_bot=True)
        fake.add_user("U3", "carol")
        async with slack_running(fake, core, cfg):
            ts = await fake.user_message("C1", "U1", "hello there", mention_bot=True)
            reply = await fake.wait_bot_message("C1", thread_ts=ts, timeout=30)
            rid = await eventually(lambda: store.reply_for_message("slack", f"C1:{reply['ts']}"), what="reply row")
            await fake.react("C1", reply["ts"], "U1", "+1")
            await votes_become(store, rid, {("U1", UP, 1.0)}, "U1's live vote")

        # Away: U1 takes it back, U2 votes -1, U3 +1 with a skin tone and :tada:, a bot +1.
        await fake.react("C1", reply["ts"], "U1", "+1", add=False, silent=True)
        await fake.react("C1", reply["ts"], "U2", "-1", silent=True)
        await fake.react("C1", reply["ts"], "U3", "+1::skin-tone-3", silent=True)
        await fake.react("C1", reply["ts"], "U3", "tada", silent=True)
        await fake.react("C1", reply["ts"], "UBOT2", "thumbsup", silent=True)
        async with slack_running(fake, core, cfg):
            await votes_become(store, rid, {("U2", DOWN, -1.0), ("U3", UP, 1.0)}, "reconciled on start")
            # every user listed, not the first REACTION_USERS_SHOWN: reactions.get with full
            assert all(str(c.args.get("full")).lower() in ("1", "true") for c in fake.calls_to("reactions.get"))

            await fake.react("C1", reply["ts"], "U2", "-1", add=False, silent=True)
            await fake.react("C1", reply["ts"], "U1", "thumbsdown", silent=True)
            connections = fake.connection_count
            await fake.send_disconnect()                  # Slack rotates the connection
            await fake.wait_connected(count=connections + 1)
            await votes_become(store, rid, {("U1", DOWN, -1.0), ("U3", UP, 1.0)}, "reconciled after a reconnect")

            await fake.react("C1", reply["ts"], "U2", "+1")   # live events still count
            await votes_become(store, rid, {("U1", DOWN, -1.0), ("U2", UP, 1.0), ("U3", UP, 1.0)}, "a live vote")
        assert fake.unknown_calls == []


# -- the store's part ------------------------------------------------------------------


async def add_reply(store: Store, platform: str = "discord", channel: str = "c1", at: float | None = None,
                    parts: tuple[str, ...] = ()) -> int:
    rid = await store.add_reply(platform, channel, None, 0, "hi", [1], [2], [-0.1], 0.8, 0.95, 8, created_at=at)
    for part in parts:
        await store.link_reply_message(rid, platform, part)
    return rid


async def test_recent_reply_messages_lists_every_part_of_the_recent_sent_replies(store):
    await add_reply(store, at=time.time() - 3 * 3600, parts=("old",))
    split = await add_reply(store, parts=("p2", "p1"))         # a long reply sent as two messages
    await add_reply(store)                                      # stored, never sent (no message id)
    await add_reply(store, platform="slack", channel="C1", parts=("C1:1.2",))
    assert await store.recent_reply_messages("discord", time.time() - 3600) == [(split, "c1", ["p1", "p2"])]


async def test_replace_votes_leaves_exactly_the_listed_votes_and_newer_live_ones(store):
    rid = await add_reply(store, parts=("p1",))
    await store.set_vote(rid, "a", UP, 1.0)
    await store.set_vote(rid, "b", DOWN, -1.0)
    read_at = time.time()
    await asyncio.sleep(0.01)
    await store.set_vote(rid, "c", UP, 1.0)        # a live event after the platform's list was read
    assert await store.replace_votes(rid, {("b", DOWN): -1.0, ("d", UP): 1.0}, read_at) == (1, 1)
    assert set(await store.votes_for(rid)) == {("b", DOWN, -1.0), ("c", UP, 1.0), ("d", UP, 1.0)}
    listed = {("b", DOWN): -1.0, ("c", UP): 1.0, ("d", UP): 1.0}
    assert await store.replace_votes(rid, listed, time.time()) == (0, 0)       # nothing to do twice
    assert await store.replace_votes(rid, {}, time.time()) == (0, 3)
    assert await store.votes_for(rid) == []
