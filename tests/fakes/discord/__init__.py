"""Loopback fake Discord (gateway websocket + REST) for tests.

The real :mod:`discord` client library connects to this fake over 127.0.0.1;
nothing inside discord.py is mocked except the two base URLs, which
:meth:`FakeDiscord.patch_discord` points at the fake (``discord.http.Route.BASE``
and ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``).

Typical use::

    async with FakeDiscord() as fake:            # starts server, patches discord.py
        client = discord.Client(intents=intents, guild_ready_timeout=0.1)
        async with running_client(fake, client):  # login + connect + wait for on_ready
            msg = await fake.user_message(GENERAL_ID, BOB_ID, "hello")
            reply = await fake.wait_bot_message(GENERAL_ID)
            assert reply["message_reference"]["message_id"] == msg["id"]

The package, by concern:

* ``state.py``: the in-memory world (guild, roles, members, channels, messages,
  reactions) and its payloads
* ``gateway.py``: the websocket gateway (hello, identify, heartbeat, resume, dispatch)
* ``rest.py``: the REST routes discord.py uses for messages, reactions, typing, DMs, login
* ``interactions.py``: command sync, slash-command invocation, interaction responses
* ``server.py``: :class:`FakeDiscord` (all of the above), test actions and waits,
  :func:`running_client`

Model (ids are ints on the Python side; payloads use strings like Discord):

* bot user / application: :data:`BOT_ID` (``1000``), username ``reactlearn``
* guild :data:`GUILD_ID` (``1``), owner :data:`OWNER_ID`
* roles: ``@everyone`` (id == guild id), ``Admin`` (:data:`ADMIN_ROLE_ID`,
  MANAGE_GUILD ``0x20``), ``Regular`` (:data:`REGULAR_ROLE_ID`, no extra perms)
* members: :data:`OWNER_ID` owner, :data:`ALICE_ID` (Admin), :data:`BOB_ID`
  (Regular), :data:`CAROL_ID` (no roles), plus the bot.  Unknown user ids used
  in :meth:`FakeDiscord.user_message` etc. are auto-created as guild members.
* text channels :data:`GENERAL_ID` (``10`` "general") and :data:`BOT_CHAT_ID`
  (``11`` "bot-chat"); DM channels are created on demand
  (:meth:`FakeDiscord.dm_channel_id`, or the bot's ``POST /users/@me/channels``).

Behaviour that mirrors real Discord (and therefore matters to bot code):

* The bot's own channel messages are echoed back as MESSAGE_CREATE (set
  ``echo_bot_messages=False`` to turn off), as are non-ephemeral interaction
  responses/followups.  Bot code must ignore its own messages.
* The bot's own reactions (``PUT .../reactions/{emoji}/@me``) are dispatched as
  MESSAGE_REACTION_ADD with ``user_id == BOT_ID``.  Bot code must ignore them.
* Gateway intents are honoured (``enforce_intents=True``): guild/DM message and
  reaction events are only delivered with the matching intent, and without the
  MESSAGE_CONTENT intent the content of guild messages is blanked unless the
  bot is mentioned (or authored it).
* Slash commands must have been synced (``tree.sync``) before
  :meth:`FakeDiscord.slash` can invoke them; ``default_member_permissions`` and
  DM availability are enforced like the Discord client does (raises
  :class:`SlashNotPermitted`); :meth:`FakeDiscord.set_command_permissions` plays a server
  admin's per-role / per-user overrides (Server Settings -> Integrations), which win over
  ``default_member_permissions``.
* :meth:`FakeDiscord.delete_channel` deletes a guild channel (CHANNEL_DELETE; REST on it
  answers 404 Unknown Channel, ``GET /channels/{id}`` included).
* An interaction can be acknowledged only once (second callback -> HTTP 400,
  code 40060); followups before the acknowledgement -> 404 Unknown Webhook.
* Sending an empty message or content > 2000 chars -> HTTP 400, like Discord; so is
  such an edit (``PATCH /channels/{id}/messages/{id}``, the bot's own messages only;
  dispatched as MESSAGE_UPDATE). Edits are kept: ``message_edits``,
  :meth:`FakeDiscord.content_history` (what a message said, posted then after each edit).
* Reaction lists: ``GET /channels/{id}/messages/{id}/reactions/{emoji}`` (``limit``, ``after``),
  as discord.py's ``Reaction.users()`` reads them. :meth:`FakeDiscord.react` with
  ``silent=True`` changes a reaction without any gateway event (nor one kept for a RESUME):
  what happened while the bot was away. :meth:`FakeDiscord.request_reconnect` (op 7, the client
  RESUMEs) and :meth:`FakeDiscord.invalidate_sessions` (op 9 on RESUME: a fresh IDENTIFY and
  READY, nothing replayed) are the two kinds of reconnect.
* :meth:`FakeDiscord.fail` makes chosen routes answer with a Discord error (e.g. every
  edit a 403), to test what the bot does when a call fails.
* Unknown REST routes are logged and answered with 404 + JSON error body, and
  collected in :attr:`FakeDiscord.unknown_requests`.  Bugs inside the fake are
  answered with HTTP 400 (so discord.py does not retry/sleep) and collected in
  :attr:`FakeDiscord.internal_errors`.  :meth:`FakeDiscord.assert_clean` checks
  both.

Only one FakeDiscord should be patched into discord.py at a time (the patched
attributes are class-level globals).
"""

from .interactions import InteractionRecord, SlashNotPermitted
from .server import FakeDiscord, FakeDiscordTimeout, patch_discord_urls, running_client
from .state import (ADMIN_ROLE_ID, ADMINISTRATOR, ALICE_ID, APP_ID, BOB_ID, BOT_CHAT_ID, BOT_ID, CAROL_ID,
                    EVERYONE_ROLE_ID, FAKE_TOKEN, GENERAL_ID, GUILD_ID, MANAGE_GUILD, OWNER_ID, REGULAR_ROLE_ID)

__all__ = [
    "FakeDiscord",
    "InteractionRecord",
    "SlashNotPermitted",
    "FakeDiscordTimeout",
    "running_client",
    "patch_discord_urls",
    "FAKE_TOKEN",
    "BOT_ID",
    "APP_ID",
    "GUILD_ID",
    "EVERYONE_ROLE_ID",
    "ADMIN_ROLE_ID",
    "REGULAR_ROLE_ID",
    "GENERAL_ID",
    "BOT_CHAT_ID",
    "OWNER_ID",
    "ALICE_ID",
    "BOB_ID",
    "CAROL_ID",
    "MANAGE_GUILD",
    "ADMINISTRATOR",
]
