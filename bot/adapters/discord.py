"""Discord adapter: discord.py events → bot.events payloads → ChatCore. No business logic.

A reply is streamed: the first part is posted as soon as the model has written a few words,
then edited in place (PATCH) with the text so far at most every ``EDIT_SECONDS`` (Discord
allows 5 edits per 5 s per channel); text past 2,000 characters continues in new messages,
and the final text settles every part (``split_text``). Vote buttons go on the final reply.

Reactions use the raw events (on_raw_reaction_add/remove), so votes on replies that
are no longer in discord.py's message cache still count. Slash commands are checked
for admin rights in ChatCore (Manage Server, or configured role/user ids), not only
by Discord's default_member_permissions.

Reactions given or taken back while the bot was away count too: on ``on_ready`` (connecting,
and every fresh session) and ``on_resumed`` (a RESUMEd reconnect) ``backfill`` reads, in the
background, the reactions on the bot's replies of the last ``chat.backfill_hours`` (the
message, then each voting emoji's REST user list) and ChatCore makes the stored votes exactly
those; a reply whose message can't be read keeps its votes.

Odd payloads never stop the bot: a gateway event that discord.py itself cannot parse (its
parsers raise, and an exception there would end ``client.start``) is logged and dropped,
except READY (without it nothing works, so that one still fails loudly); the handlers here
take what discord.py builds as it comes (empty content, an emoji without a name, a missing
reference) and turn it into payloads or nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import re
from typing import Any, Callable

import discord
from discord import app_commands

from bot.chat import ChatCore
from bot.config import Config
from bot.events import Command, HistoryItem, Message, Reaction
from bot.streaming import ShownReply
from bot.rerun import Rerun

log = logging.getLogger(__name__)
PLATFORM = "discord"
LIMIT = 2000   # Discord's message length limit
EDIT_SECONDS = 1.2   # between edits of a streamed reply: Discord allows 5 per 5 s per channel
USER_MESSAGE_TYPES = (discord.MessageType.default, discord.MessageType.reply)
UNGUARDED_EVENTS = {"READY"}   # gateway events whose parse failure should still end the connection
ADMIN_PERMISSIONS = discord.Permissions(manage_guild=True)   # who Discord shows /retrain and /rollback to
# REST errors that retrying a trainer result later will not fix: the channel is gone (10003
# Unknown Channel) or the bot may not see or write there (50001 Missing Access, 50013 Missing
# Permissions). Like Slack's PERMANENT_ERRORS, the result is then dropped at once.
GONE_CHANNEL_ERRORS = (discord.NotFound, discord.Forbidden)


def _guarded(event: str, parse: Callable[[Any], None]) -> Callable[[Any], None]:
    """discord.py's parser for one gateway event, logging and dropping a payload it can't read."""
    @functools.wraps(parse)
    def guarded(data: Any) -> None:
        try:
            parse(data)
        except Exception:  # noqa: BLE001 - one odd payload must not end the gateway connection
            log.exception("discord: skipped a malformed %s event", event)
    return guarded


def guard_parsers(client: discord.Client) -> None:
    """Wrap the gateway event parsers of ``client`` (``ConnectionState.parsers``, the dict the
    gateway looks each event up in) with :func:`_guarded`."""
    parsers = getattr(getattr(client, "_connection", None), "parsers", None)
    if not isinstance(parsers, dict):        # a discord.py without that dict: nothing to guard
        log.warning("discord: cannot guard the gateway parsers (discord.py %s)", discord.__version__)
        return
    for event, parse in list(parsers.items()):
        if event not in UNGUARDED_EVENTS:
            parsers[event] = _guarded(event, parse)


def split_text(text: str, limit: int = LIMIT) -> list[str]:
    """Split text into chunks of at most ``limit`` characters: at the last newline in the
    second half of the window, else the last space there, else a hard cut. The whitespace
    at a cut is dropped, so no chunk is blank (Discord refuses blank messages)."""
    chunks = []
    while len(text) > limit:
        cut = text.rfind("\n", limit // 2, limit + 1)
        if cut < 0:
            cut = text.rfind(" ", limit // 2, limit + 1)
        if cut < 0:
            cut = limit
        chunk = text[:cut].rstrip()
        if chunk:
            chunks.append(chunk)
        text = text[cut:].lstrip()
    return chunks + [text] if text else chunks or [""]


class DiscordReply(ShownReply):
    """One answer to one message: the ``send`` for notices and a ``bot.streaming.ReplyStream``.

    ``parts`` are the messages showing the text now, in order; each call makes them show
    ``split_text(text)``: parts whose chunk changed are edited in place, missing ones posted
    (the first as a reply to the message). ``send`` starts afresh (new messages)."""

    def __init__(self, message: discord.Message, min_interval: float = EDIT_SECONDS):
        self.message = message
        self.min_interval = min_interval
        self.parts: list[discord.Message] = []

    async def send(self, text: str) -> list[str]:
        self.parts = []
        return await self._show(text)

    async def _show(self, text: str) -> list[str]:
        chunks = split_text(text)
        for i, chunk in enumerate(chunks):
            if i < len(self.parts):
                if self.parts[i].content != chunk:
                    self.parts[i] = await self.parts[i].edit(content=chunk)
                continue
            # The first part answers the message; if it was deleted meanwhile, post without the link.
            ref = self.message.to_reference(fail_if_not_exists=False) if i == 0 else None
            self.parts.append(await self.message.channel.send(chunk, reference=ref))
        if len(self.parts) > len(chunks):       # the text got shorter: a part is left over
            log.warning("reply to %s: %d parts shown, %d needed", self.message.id, len(self.parts), len(chunks))
        return [str(m.id) for m in self.parts[:len(chunks)]]


class DiscordAdapter:
    def __init__(self, core: ChatCore, cfg: Config, *, edit_seconds: float = EDIT_SECONDS, **client_options: Any):
        """``edit_seconds``: the least time between two edits of a streamed reply."""
        self.core = core
        self.cfg = cfg
        self.edit_seconds = edit_seconds
        intents = discord.Intents.default()
        intents.message_content = True
        # Model output must never ping anyone (@everyone, roles, users), nor the person replied to.
        client_options.setdefault("allowed_mentions", discord.AllowedMentions.none())
        self.client = discord.Client(intents=intents, **client_options)
        guard_parsers(self.client)
        self.tree = app_commands.CommandTree(self.client)
        self._register_commands()
        self.client.setup_hook = self._setup_hook
        self.client.event(self.on_message)
        self.client.event(self.on_raw_reaction_add)
        self.client.event(self.on_raw_reaction_remove)
        self._backfill = Rerun(self.backfill, "discord: reconciling votes")
        self.client.event(self.on_ready)
        self.client.event(self.on_resumed)

    async def start(self, token: str) -> None:
        await self.client.start(token)

    async def close(self) -> None:
        self._backfill.cancel()
        await self.client.close()

    async def _setup_hook(self) -> None:
        guilds = [discord.Object(id=int(g)) for g in self.cfg.discord.guild_ids]
        for guild in guilds:            # guild-scoped commands show up at once
            self.tree.copy_global_to(guild=guild)
            await self.tree.sync(guild=guild)
        if not guilds:
            await self.tree.sync()
        log.info("slash commands synced to %s", [g.id for g in guilds] or "all guilds")

    # -- messages -------------------------------------------------------------

    def _bot_id(self) -> int:
        return self.client.user.id if self.client.user else 0

    async def _replies_to_bot(self, message: discord.Message) -> bool:
        ref = message.reference
        if ref is None or ref.message_id is None:
            return False
        if isinstance(ref.resolved, discord.Message):
            return getattr(getattr(ref.resolved, "author", None), "id", None) == self._bot_id()
        return await self.core.is_bot_reply(PLATFORM, str(ref.message_id))

    def _clean(self, m: discord.Message) -> str:
        """The text as people read it: the bot's own mention dropped, other mentions as @name / #channel."""
        text = re.sub(rf"<@!?{self._bot_id()}>", "", m.content)
        for user in m.mentions:
            text = re.sub(rf"<@!?{user.id}>", lambda _, name=user.display_name: f"@{name}", text)
        for role in m.role_mentions:
            text = text.replace(f"<@&{role.id}>", f"@{role.name}")

        def channel(match: re.Match) -> str:
            ch = self.client.get_channel(int(match.group(1)))
            return f"#{ch.name}" if getattr(ch, "name", None) else match.group(0)

        return re.sub(r"<#(\d+)>", channel, text).strip()

    async def _history(self, message: discord.Message) -> list[HistoryItem]:
        """The reply chain when the message is a reply, else recent channel history (oldest first)."""
        n = self.cfg.chat.history_messages
        items: list[HistoryItem | None] = []
        try:
            if message.reference and message.reference.message_id:
                ref, seen = message.reference, 0
                while ref and ref.message_id and seen < n:
                    prev = ref.resolved if isinstance(ref.resolved, discord.Message) else \
                        await message.channel.fetch_message(ref.message_id)
                    items.append(self._item(prev))
                    ref, seen = prev.reference, seen + 1
                return [h for h in items[::-1] if h is not None]
            async for prev in message.channel.history(limit=n, before=message):
                items.append(self._item(prev))
        except discord.HTTPException as e:
            log.warning("could not read context for message %s: %s", message.id, e)
        return [h for h in items[::-1] if h is not None]

    def _item(self, m: discord.Message) -> HistoryItem | None:
        try:
            return HistoryItem(m.author.display_name, self._clean(m), m.author.id == self._bot_id(),
                               author_id=str(m.author.id), message_id=str(m.id))
        except (AttributeError, TypeError, ValueError) as e:     # a message discord.py built half
            log.warning("discord: left message %s out of the context: %s", getattr(m, "id", "?"), e)
            return None

    def _message(self, message: discord.Message) -> Message | None:
        """The payload for a person's message; None for system messages and for a message
        discord.py built without the parts it needs (logged)."""
        try:
            if message.type not in USER_MESSAGE_TYPES:     # joins, pins, thread notices, command echoes
                return None
            author = message.author
            return Message(
                platform=PLATFORM, message_id=str(message.id), channel_id=str(message.channel.id),
                author_id=str(author.id), author_name=author.display_name,
                text=self._clean(message), author_is_bot=bool(author.bot),
                is_dm=isinstance(message.channel, discord.DMChannel),
                mentions_bot=self.client.user in message.mentions)
        except (AttributeError, TypeError, ValueError) as e:
            log.warning("discord: skipped a malformed message %s: %s", getattr(message, "id", "?"), e)
            return None

    async def on_message(self, message: discord.Message) -> None:
        msg = self._message(message)
        if msg is None:
            return
        if not msg.author_is_bot and await self._replies_to_bot(message):
            msg = dataclasses.replace(msg, replies_to_bot=True)
        if not self.core.wants_reply(msg):
            return
        history = await self._history(message)
        reply = DiscordReply(message, self.edit_seconds)
        async with message.channel.typing():
            reply_id = await self.core.on_message(msg, history, reply.send, reply)
        # Vote buttons only on a model reply (not on the rate-limit / busy / error notices).
        if reply_id is not None and reply.parts:
            first = reply.parts[0]
            for emoji in self.core.seed_emoji:
                try:
                    await first.add_reaction(emoji)
                except discord.HTTPException as e:   # no Add Reactions permission, unknown emoji, ...
                    log.warning("could not add %s to reply %s: %s", emoji, first.id, e)
                    break

    # -- reactions ------------------------------------------------------------

    async def _reaction(self, payload: discord.RawReactionActionEvent, added: bool) -> None:
        user = payload.member or self.client.get_user(payload.user_id)
        is_bot = payload.user_id == self._bot_id() or bool(user and user.bot)
        outcome = await self.core.on_reaction(Reaction(
            platform=PLATFORM, channel_id=str(payload.channel_id), message_id=str(payload.message_id),
            user_id=str(payload.user_id), emoji=str(payload.emoji), added=added, user_is_bot=is_bot))
        log.debug("reaction %s on %s by %s: %s", payload.emoji, payload.message_id, payload.user_id, outcome)

    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self._reaction(payload, True)

    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self._reaction(payload, False)

    # -- votes given or taken back while the bot was away ----------------------

    async def on_ready(self) -> None:       # the first connection, and every fresh session (re-IDENTIFY)
        self._backfill.ask("connecting")

    async def on_resumed(self) -> None:     # a reconnect that RESUMEd the session
        self._backfill.ask("a gateway resume")

    async def backfill(self, why: str = "a request") -> tuple[int, int, int]:
        """Votes on the recent replies made what their REST reaction lists say now (``ChatCore.backfill_votes``)."""
        return await self.core.backfill_votes(PLATFORM, self._reactions_on, why)

    async def _reactions_on(self, channel_id: str, message_ids: list[str]) -> list[Reaction] | None:
        """Every voting reaction on the messages of one reply, as Discord lists them now; None
        when one of them can't be read (deleted, no access): that reply's votes stay as they are."""
        out: list[Reaction] = []
        try:
            channel = self.client.get_partial_messageable(int(channel_id))
            for mid in message_ids:
                message = await channel.fetch_message(int(mid))
                for reaction in message.reactions:
                    emoji = str(reaction.emoji)
                    if not self.core.is_voting_emoji(emoji):
                        continue
                    async for user in reaction.users():
                        out.append(Reaction(platform=PLATFORM, channel_id=str(channel_id), message_id=str(mid),
                                            user_id=str(user.id), emoji=emoji, added=True,
                                            user_is_bot=user.id == self._bot_id() or bool(user.bot)))
        except (discord.HTTPException, ValueError) as e:
            log.warning("discord: left the votes on reply message(s) %s as they are: %s", ", ".join(message_ids), e)
            return None
        return out

    # -- slash commands -------------------------------------------------------

    def _command(self, interaction: discord.Interaction, name: str, args: dict) -> Command:
        user = interaction.user
        roles = tuple(str(r.id) for r in getattr(user, "roles", []))
        perms = interaction.permissions
        return Command(PLATFORM, str(interaction.channel_id), str(user.id), name, args,
                       is_platform_admin=bool(interaction.guild_id and (perms.manage_guild or perms.administrator)),
                       role_ids=roles)

    async def _run(self, interaction: discord.Interaction, name: str, args: dict | None = None) -> None:
        # Acknowledge at once (Discord allows 3 s); the work may take longer (loading a version).
        await interaction.response.defer(ephemeral=True, thinking=True)
        image = None
        try:
            result = await self.core.on_command(self._command(interaction, name, args or {}))
            text, image = result.text, result.image
        except Exception:  # noqa: BLE001 - never leave the person with an endless "thinking…"
            log.exception("/%s failed", name)
            text = f"Sorry, /{name} failed; the error is in the bot's log."
        extra = {"file": discord.File(image, filename="status.png")} if image else {}
        await interaction.followup.send(split_text(text)[0] or "…", ephemeral=True, **extra)

    def _register_commands(self) -> None:
        tree = self.tree

        @tree.command(name="retrain", description="Ask the trainer for a learning round now (admins)")
        async def retrain(interaction: discord.Interaction) -> None:
            await self._run(interaction, "retrain")

        @tree.command(name="status", description="Model version, votes and like-rates")
        async def status(interaction: discord.Interaction) -> None:
            await self._run(interaction, "status")

        @tree.command(name="rollback", description="Serve an earlier published version (admins)")
        @app_commands.describe(version="version number, see /status")
        async def rollback(interaction: discord.Interaction, version: int) -> None:
            await self._run(interaction, "rollback", {"version": version})

        @tree.command(name="forget", description="Delete your messages and votes (admins: anyone's)")
        @app_commands.describe(user="whose data to delete (default: you)")
        async def forget(interaction: discord.Interaction, user: discord.User | None = None) -> None:
            await self._run(interaction, "forget", {"user": str(user.id)} if user else {})

        # Discord shows the admin commands only to members with Manage Server, and never in DMs
        # (where default_member_permissions does not apply). Admins the config names by user or
        # role id are shown them once a server admin allows them under Server Settings →
        # Integrations → the bot (Discord lets no bot grant that itself). ChatCore checks every
        # call either way, so a grant by mistake still runs nothing.
        for admin_only in (retrain, rollback):
            admin_only.default_permissions = ADMIN_PERMISSIONS
            admin_only.guild_only = True
            admin_only.allowed_contexts = app_commands.AppCommandContext(guild=True, dm_channel=False,
                                                                         private_channel=False)

    # -- trainer results --------------------------------------------------------

    async def post(self, channel_id: str, text: str) -> None:
        """Post a trainer result where the retrain was asked. A channel that is gone, or where
        the bot may not write, drops it with one warning (as Slack's ``post`` does); other
        errors (Discord down, the network) raise, and ChatCore tries again a few times."""
        try:
            channel = self.client.get_channel(int(channel_id)) or await self.client.fetch_channel(int(channel_id))
            for chunk in split_text(text):
                await channel.send(chunk)
        except GONE_CHANNEL_ERRORS as e:
            log.warning("discord: dropped a trainer result for channel %s: %s %s (the channel is gone or the bot "
                        "may not write there; invite it back to see the next results)", channel_id, e.status, e.text)
        except ValueError:
            log.warning("discord: dropped a trainer result for channel %r: not a Discord channel id", channel_id)
