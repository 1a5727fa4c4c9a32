"""Proves the fake Discord (tests/fakes/discord/) works with the real, unpatched discord.py
client (only the REST base URL and gateway URL are pointed at the fake)."""

from __future__ import annotations

import asyncio
from typing import List

import discord
import pytest
import pytest_asyncio
from discord import app_commands

from tests.fakes.discord import (
    ADMIN_ROLE_ID,
    ALICE_ID,
    BOB_ID,
    BOT_CHAT_ID,
    BOT_ID,
    CAROL_ID,
    GENERAL_ID,
    GUILD_ID,
    FakeDiscord,
    FakeDiscordTimeout,
    SlashNotPermitted,
    running_client,
)

GUILD = discord.Object(id=GUILD_ID)


def make_client(*, message_content: bool = True) -> discord.Client:
    intents = discord.Intents.default()
    intents.message_content = message_content
    return discord.Client(intents=intents, guild_ready_timeout=0.1)


@pytest_asyncio.fixture
async def fake():
    async with FakeDiscord() as f:
        yield f
        f.assert_clean()


async def test_login_ready_and_guild(fake: FakeDiscord) -> None:
    client = make_client()
    ready = asyncio.Event()

    @client.event
    async def on_ready() -> None:
        ready.set()

    async with running_client(fake, client):
        await asyncio.wait_for(ready.wait(), 5)
        assert client.user is not None and client.user.id == BOT_ID
        assert client.application_id == BOT_ID
        guild = client.get_guild(GUILD_ID)
        assert guild is not None and not guild.unavailable
        assert {c.name for c in guild.text_channels} == {"general", "bot-chat"}
        admin = guild.get_role(ADMIN_ROLE_ID)
        assert admin is not None and admin.name == "Admin" and admin.permissions.manage_guild
        assert guild.default_role.id == GUILD_ID
        assert guild.me is not None and guild.me.id == BOT_ID
        assert ("GET", "/users/@me") in fake.requests
        assert ("GET", "/oauth2/applications/@me") in fake.requests
        assert fake.connected
    assert not fake.connected  # clean close (1000) ends the session


async def test_on_message_reply_and_dm(fake: FakeDiscord) -> None:
    client = make_client()
    seen: List[discord.Message] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.id == client.user.id:  # the fake echoes our own messages, like Discord
            return
        seen.append(message)
        if message.content == "ping":
            await message.reply("pong")
        elif message.content == "dm me":
            await message.author.send("hello in private")
        elif isinstance(message.channel, discord.DMChannel):
            await message.channel.send(f"echo: {message.content}")
        elif client.user in message.mentions:
            await message.channel.send("you rang?")

    async with running_client(fake, client):
        user_msg = await fake.user_message(GENERAL_ID, BOB_ID, "ping")
        reply = await fake.wait_bot_message(GENERAL_ID)
        assert reply["content"] == "pong"
        assert reply["author"]["id"] == str(BOT_ID)
        assert reply["message_reference"]["message_id"] == user_msg["id"]
        assert reply["referenced_message"]["content"] == "ping"
        assert reply["type"] == 19
        assert seen[0].content == "ping" and seen[0].author.id == BOB_ID
        assert isinstance(seen[0].author, discord.Member)
        assert seen[0].guild is not None and seen[0].guild.id == GUILD_ID

        # mention + reply to the bot's own message mentions the bot
        await fake.user_message(BOT_CHAT_ID, CAROL_ID, "hey", mentions_bot=True)
        assert (await fake.wait_bot_message(BOT_CHAT_ID))["content"] == "you rang?"
        await fake.user_message(GENERAL_ID, CAROL_ID, "thanks", reply_to=int(reply["id"]))
        assert (await fake.wait_bot_message(GENERAL_ID))["content"] == "you rang?"
        assert seen[-1].reference is not None and seen[-1].reference.message_id == int(reply["id"])

        # bot opens a DM (POST /users/@me/channels) and writes there
        await fake.user_message(GENERAL_ID, ALICE_ID, "dm me")
        dm = await fake.wait_bot_message(fake.dm_channel_id(ALICE_ID))
        assert dm["content"] == "hello in private" and "guild_id" not in dm
        assert ("POST", "/users/@me/channels") in fake.requests

        # user writes in DM
        await fake.user_message(None, ALICE_ID, "secret", dm=True)
        dm2 = await fake.wait_bot_message(fake.dm_channel_id(ALICE_ID))
        assert dm2["content"] == "echo: secret"
        assert isinstance(seen[-1].channel, discord.DMChannel)

        # history + fetch_message via REST
        channel = client.get_channel(GENERAL_ID)
        history = [m async for m in channel.history(limit=10)]
        assert [m.content for m in history][:3] == ["dm me", "you rang?", "thanks"]
        fetched = await channel.fetch_message(int(user_msg["id"]))
        assert fetched.content == "ping"
        await fake.expect_no_bot_message(within=0.2)


async def test_message_content_intent_is_enforced(fake: FakeDiscord) -> None:
    client = make_client(message_content=False)
    got: List[str] = []

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.id != BOT_ID:
            got.append(message.content)
            if len(got) == 2:
                await message.channel.send("done")

    async with running_client(fake, client):
        await fake.user_message(GENERAL_ID, BOB_ID, "invisible")
        await fake.user_message(GENERAL_ID, BOB_ID, "visible", mentions_bot=True)
        await fake.wait_bot_message(GENERAL_ID)
    assert got == ["", f"<@{BOT_ID}> visible"]


async def test_raw_reactions_and_bot_reactions(fake: FakeDiscord) -> None:
    client = make_client()
    events: List[discord.RawReactionActionEvent] = []
    changed = asyncio.Event()

    @client.event
    async def on_raw_reaction_add(payload: discord.RawReactionActionEvent) -> None:
        events.append(payload)
        changed.set()

    @client.event
    async def on_raw_reaction_remove(payload: discord.RawReactionActionEvent) -> None:
        events.append(payload)
        changed.set()

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.id != BOT_ID and message.content == "react":
            await message.add_reaction("🤖")

    async def next_event() -> discord.RawReactionActionEvent:
        n = len(events)
        while len(events) <= n:
            changed.clear()
            await asyncio.wait_for(changed.wait(), 5)
        return events[n]

    async with running_client(fake, client):
        bot_msg = await client.get_channel(GENERAL_ID).send("rate me")
        assert (await fake.wait_bot_message(GENERAL_ID))["id"] == str(bot_msg.id)

        await fake.react(GENERAL_ID, bot_msg.id, BOB_ID, "👍")
        ev = await next_event()
        assert (ev.event_type, ev.user_id, ev.message_id, ev.channel_id, ev.guild_id) == (
            "REACTION_ADD", BOB_ID, bot_msg.id, GENERAL_ID, GUILD_ID
        )
        assert str(ev.emoji) == "👍" and ev.message_author_id == BOT_ID
        assert ev.member is not None and ev.member.id == BOB_ID

        await fake.react(GENERAL_ID, bot_msg.id, BOB_ID, "👍", add=False)
        ev = await next_event()
        assert (ev.event_type, ev.user_id, str(ev.emoji)) == ("REACTION_REMOVE", BOB_ID, "👍")

        await fake.react(GENERAL_ID, bot_msg.id, CAROL_ID, "party:123456")
        ev = await next_event()
        assert ev.emoji.id == 123456 and ev.emoji.name == "party"

        # the bot reacting is recorded AND echoed as a reaction event from the bot
        user_msg = await fake.user_message(GENERAL_ID, BOB_ID, "react")
        got = await fake.wait_for("reaction_by_bot")
        assert got == {"channel_id": GENERAL_ID, "message_id": int(user_msg["id"]), "emoji": "🤖", "action": "add"}
        ev = await next_event()
        assert ev.user_id == BOT_ID and ev.message_id == int(user_msg["id"]) and str(ev.emoji) == "🤖"
        assert fake.reactions_on(int(user_msg["id"])) == {"🤖": [BOT_ID]}
        fetched = await client.get_channel(GENERAL_ID).fetch_message(int(user_msg["id"]))
        assert fetched.reactions[0].me and fetched.reactions[0].count == 1

        # DM reactions carry no guild/member
        dm = await fake.user_message(None, CAROL_ID, "in dm", dm=True)
        await fake.react(fake.dm_channel_id(CAROL_ID), int(dm["id"]), CAROL_ID, "❤️")
        ev = await next_event()
        assert ev.guild_id is None and ev.member is None and ev.user_id == CAROL_ID


async def test_slash_commands_ephemeral_and_deferred(fake: FakeDiscord) -> None:
    client = make_client()
    tree = app_commands.CommandTree(client)
    calls = []

    @tree.command(name="echo", description="echo text", guild=GUILD)
    @app_commands.describe(text="what to say", times="how often")
    async def echo(interaction: discord.Interaction, text: str, times: int = 1) -> None:
        calls.append((interaction.user.id, text, times, interaction.permissions.manage_guild))
        await interaction.response.send_message(" ".join([text] * times), ephemeral=True)

    @tree.command(name="slow", description="deferred", guild=GUILD)
    async def slow(interaction: discord.Interaction, who: discord.Member) -> None:
        await interaction.response.defer(thinking=True)
        await asyncio.sleep(0.01)
        await interaction.followup.send(f"done for {who.display_name}")
        await interaction.followup.send("and one more", ephemeral=True)

    @tree.command(name="edit", description="defer + edit original", guild=GUILD)
    async def edit(interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True)
        await interaction.edit_original_response(content="edited!")

    @tree.command(name="config", description="admins only", guild=GUILD)
    @app_commands.default_permissions(manage_guild=True)
    async def config(interaction: discord.Interaction, mode: str) -> None:
        await interaction.response.send_message(f"mode={mode}", ephemeral=True)

    @tree.command(name="stats", description="global command, usable in DMs")
    async def stats(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("stats!")

    async def setup_hook() -> None:
        await tree.sync(guild=GUILD)
        await tree.sync()

    client.setup_hook = setup_hook  # type: ignore[method-assign]

    async with running_client(fake, client):
        assert {c["name"] for c in fake.synced_commands[GUILD_ID]} == {"echo", "slow", "edit", "config"}
        assert [c["name"] for c in fake.synced_commands[None]] == ["stats"]
        assert ("PUT", f"/applications/{BOT_ID}/guilds/{GUILD_ID}/commands") in fake.requests

        rec = await fake.slash("echo", {"text": "hi", "times": 2}, BOB_ID)
        resp = await fake.wait_interaction_response(rec)
        assert resp["type"] == 4 and rec.ephemeral
        assert resp["data"]["content"] == "hi hi"
        assert rec.contents == ["hi hi"]
        assert calls[-1] == (BOB_ID, "hi", 2, False)
        # ephemeral responses are not channel messages
        assert all(m.get("content") != "hi hi" for m in fake.channel_messages(GENERAL_ID))

        rec = await fake.slash("echo", {"text": "yo"}, BOB_ID, admin=True)
        await fake.wait_interaction_response(rec)
        assert calls[-1] == (BOB_ID, "yo", 1, True)

        rec = await fake.slash("slow", {"who": ALICE_ID}, CAROL_ID, channel_id=BOT_CHAT_ID)
        assert (await fake.wait_interaction_response(rec))["type"] == 5 and rec.deferred and not rec.ephemeral
        first = await fake.wait_followup(rec)
        assert first["content"] == "done for alice"
        assert first["id"] == rec.original["id"]  # first followup after a defer replaces the "thinking" message
        second = await fake.wait_followup(rec, 2)
        assert second["content"] == "and one more" and second["flags"] & 64
        assert rec.contents == ["done for alice", "and one more"]

        rec = await fake.slash("edit", {}, BOB_ID)
        msg = await fake.wait_interaction_message(rec)
        assert msg["content"] == "edited!" and rec.ephemeral and rec.original_edits

        with pytest.raises(SlashNotPermitted):
            await fake.slash("config", {"mode": "x"}, BOB_ID)
        rec = await fake.slash("config", {"mode": "x"}, ALICE_ID)  # Alice holds the Admin role
        assert (await fake.wait_interaction_message(rec))["content"] == "mode=x"
        with pytest.raises(SlashNotPermitted):
            await fake.slash("config", {"mode": "x"}, ALICE_ID, admin=False)
        with pytest.raises(SlashNotPermitted):
            await fake.slash("echo", {"text": "x"}, BOB_ID, dm=True)  # guild command not in DMs
        with pytest.raises(KeyError):
            await fake.slash("echo", {"nope": 1}, BOB_ID)
        with pytest.raises(LookupError):
            await fake.slash("missing", {}, BOB_ID)

        rec = await fake.slash("stats", {}, CAROL_ID, dm=True)
        assert (await fake.wait_interaction_message(rec))["content"] == "stats!"
        rec = await fake.slash("stats", {}, CAROL_ID)
        await fake.wait_interaction_message(rec)
        # a non-ephemeral response is a real channel message
        assert fake.channel_messages(GENERAL_ID)[-1]["content"] == "stats!"


async def test_typing(fake: FakeDiscord) -> None:
    client = make_client()

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.id == BOT_ID:
            return
        async with message.channel.typing():
            await asyncio.sleep(0.01)
        await message.channel.send("typed")

    async with running_client(fake, client):
        await fake.user_message(BOT_CHAT_ID, BOB_ID, "hello")
        await fake.wait_bot_message(BOT_CHAT_ID)
        assert fake.typing_calls == [BOT_CHAT_ID]


async def test_resume_replays_missed_events(fake: FakeDiscord) -> None:
    client = make_client()
    seen: List[str] = []
    resumed = asyncio.Event()

    @client.event
    async def on_message(message: discord.Message) -> None:
        if message.author.id != BOT_ID:
            seen.append(message.content)
            await message.channel.send(f"ack {message.content}")

    @client.event
    async def on_resumed() -> None:
        resumed.set()

    async with running_client(fake, client):
        await fake.user_message(GENERAL_ID, BOB_ID, "one")
        await fake.wait_bot_message(GENERAL_ID)
        await fake.drop_connections(code=4000)
        await fake.wait_for(lambda: not fake.connected, timeout=5)
        await fake.user_message(GENERAL_ID, BOB_ID, "two")  # sent while disconnected: buffered
        await asyncio.wait_for(resumed.wait(), 10)
        assert (await fake.wait_bot_message(GENERAL_ID))["content"] == "ack two"
        resumed.clear()
        await fake.request_reconnect()  # op 7
        await asyncio.wait_for(resumed.wait(), 10)
        await fake.user_message(GENERAL_ID, BOB_ID, "three")
        assert (await fake.wait_bot_message(GENERAL_ID))["content"] == "ack three"
        assert seen == ["one", "two", "three"]
        assert fake.identify_count == 1 and fake.resume_count == 2


async def test_rest_errors_look_like_discord(fake: FakeDiscord) -> None:
    client = make_client()
    async with running_client(fake, client):
        channel = client.get_channel(GENERAL_ID)
        with pytest.raises(discord.HTTPException) as ei:
            await channel.send("x" * 2001)
        assert ei.value.status == 400 and ei.value.code == 50035
        with pytest.raises(discord.NotFound):
            await channel.fetch_message(424242)
        # unknown routes: 404 + JSON body, and they are recorded
        with pytest.raises(discord.NotFound) as ei:
            await client.fetch_premium_sticker_packs()
        assert "unknown route" in ei.value.text
        assert fake.unknown_requests == [("GET", "/sticker-packs")]
        fake.unknown_requests.clear()  # so the fixture's assert_clean passes
        with pytest.raises(FakeDiscordTimeout):
            await fake.wait_bot_message(GENERAL_ID, timeout=0.1)


async def test_bad_token_is_rejected(fake: FakeDiscord) -> None:
    client = make_client()
    try:
        with pytest.raises(discord.LoginFailure):
            await client.login("wrong-token")
    finally:
        await client.close()
