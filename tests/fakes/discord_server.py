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
  :class:`SlashNotPermitted`).
* An interaction can be acknowledged only once (second callback -> HTTP 400,
  code 40060); followups before the acknowledgement -> 404 Unknown Webhook.
* Sending an empty message or content > 2000 chars -> HTTP 400, like Discord.
* Unknown REST routes are logged and answered with 404 + JSON error body, and
  collected in :attr:`FakeDiscord.unknown_requests`.  Bugs inside the fake are
  answered with HTTP 400 (so discord.py does not retry/sleep) and collected in
  :attr:`FakeDiscord.internal_errors`.  :meth:`FakeDiscord.assert_clean` checks
  both.

Only one FakeDiscord should be patched into discord.py at a time (the patched
attributes are class-level globals).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import logging
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Tuple, Union

import yarl
from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

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

# --------------------------------------------------------------------------- constants

FAKE_TOKEN = "fake-bot-token"
BOT_ID = 1000
APP_ID = 1000
GUILD_ID = 1
EVERYONE_ROLE_ID = GUILD_ID  # Discord convention: @everyone role id == guild id
ADMIN_ROLE_ID = 100
REGULAR_ROLE_ID = 101
GENERAL_ID = 10
BOT_CHAT_ID = 11
OWNER_ID = 1999
ALICE_ID = 2001  # has the Admin role
BOB_ID = 2002  # has the Regular role
CAROL_ID = 2003  # no roles

DISCORD_EPOCH_MS = 1420070400000

# permission bits
CREATE_INSTANT_INVITE = 1 << 0
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
ADD_REACTIONS = 1 << 6
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_EXTERNAL_EMOJIS = 1 << 18
USE_APPLICATION_COMMANDS = 1 << 31
ALL_PERMISSIONS = (1 << 53) - 1
EVERYONE_PERMISSIONS = (
    CREATE_INSTANT_INVITE
    | ADD_REACTIONS
    | VIEW_CHANNEL
    | SEND_MESSAGES
    | EMBED_LINKS
    | ATTACH_FILES
    | READ_MESSAGE_HISTORY
    | USE_EXTERNAL_EMOJIS
    | USE_APPLICATION_COMMANDS
)

# gateway intents
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15

# message flags
FLAG_EPHEMERAL = 1 << 6
FLAG_LOADING = 1 << 7

# interaction callback types
CB_PONG = 1
CB_CHANNEL_MESSAGE = 4
CB_DEFERRED_CHANNEL_MESSAGE = 5
CB_DEFERRED_UPDATE_MESSAGE = 6
CB_UPDATE_MESSAGE = 7
CB_AUTOCOMPLETE_RESULT = 8
CB_MODAL = 9

_MENTION_RE = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION_RE = re.compile(r"<@&(\d+)>")
_CUSTOM_EMOJI_RE = re.compile(r"^<?(?:(a):)?:?([A-Za-z0-9_~]+):(\d+)>?$")


class FakeDiscordTimeout(AssertionError):
    """Raised by the ``wait_*`` helpers when the condition is not met in time."""


class SlashNotPermitted(PermissionError):
    """Raised by :meth:`FakeDiscord.slash` when real Discord would not let the user
    invoke the command (``default_member_permissions`` not satisfied, or the
    command is not available in DMs)."""


def _iso(ts: Optional[float] = None) -> str:
    return _dt.datetime.fromtimestamp(ts if ts is not None else time.time(), tz=_dt.timezone.utc).isoformat()


def _json_response(data: Any, status: int = 200) -> web.Response:
    # NB: discord.py only parses JSON if Content-Type is *exactly* "application/json";
    # web.json_response() appends "; charset=utf-8" which makes it return a str.
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def _error(status: int, code: int, message: str, errors: Optional[dict] = None) -> web.Response:
    body: Dict[str, Any] = {"message": message, "code": code}
    if errors:
        body["errors"] = errors
    return _json_response(body, status)


def _no_content() -> web.Response:
    return web.Response(status=204)


def _sid(x: Any) -> str:
    return str(int(x))


# --------------------------------------------------------------------------- records


@dataclass
class InteractionRecord:
    """One slash-command invocation made with :meth:`FakeDiscord.slash`.

    The fake fills it in as the bot answers:

    * ``response``: the raw callback body ``{"type": .., "data": {..}}`` (first
      acknowledgement), ``None`` until the bot responds.
    * ``original``: the ``@original`` message (created by callback type 4/5,
      updated by ``PATCH .../messages/@original``); for a deferred response it
      carries the LOADING flag until edited.
    * ``followups``: messages posted with ``POST /webhooks/{app}/{token}``.
    * ``original_edits``: raw bodies of PATCHes to ``@original``.
    """

    id: int
    token: str
    name: str
    command: Dict[str, Any]
    user_id: int
    channel_id: int
    guild_id: Optional[int]
    payload: Dict[str, Any]
    response: Optional[Dict[str, Any]] = None
    original: Optional[Dict[str, Any]] = None
    original_deleted: bool = False
    original_edits: List[Dict[str, Any]] = field(default_factory=list)
    followups: List[Dict[str, Any]] = field(default_factory=list)
    extra_callbacks: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def response_type(self) -> Optional[int]:
        """Callback type of the acknowledgement (4 message, 5 deferred, ...)."""
        return None if self.response is None else self.response.get("type")

    @property
    def responded(self) -> bool:
        return self.response is not None

    @property
    def deferred(self) -> bool:
        return self.response_type in (CB_DEFERRED_CHANNEL_MESSAGE, CB_DEFERRED_UPDATE_MESSAGE)

    @property
    def ephemeral(self) -> bool:
        """Whether the acknowledgement (message or defer) was ephemeral."""
        if self.response is None:
            return False
        flags = int((self.response.get("data") or {}).get("flags") or 0)
        return bool(flags & FLAG_EPHEMERAL)

    def messages(self) -> List[Dict[str, Any]]:
        """Visible messages produced so far: the original (unless still loading
        or deleted), then followups in order."""
        out: List[Dict[str, Any]] = []
        if self.original is not None and not self.original_deleted:
            if not (int(self.original.get("flags") or 0) & FLAG_LOADING):
                out.append(self.original)
        for m in self.followups:  # first followup after a defer *is* the original
            if not any(o["id"] == m["id"] for o in out):
                out.append(m)
        return out

    @property
    def contents(self) -> List[str]:
        """``content`` of every visible message (see :meth:`messages`)."""
        return [m.get("content") or "" for m in self.messages()]

    @property
    def text(self) -> str:
        """All visible contents joined by newlines (handy for asserts)."""
        return "\n".join(self.contents)


class _Session:
    """A gateway session (survives a websocket reconnect so RESUME works)."""

    def __init__(self, session_id: str, intents: int) -> None:
        self.session_id = session_id
        self.intents = intents
        self.seq = 0
        self.ws: Optional[web.WebSocketResponse] = None
        self.alive = True  # False once closed for good (1000/1001) or invalidated
        self.buffer: List[Tuple[int, str]] = []  # (seq, serialized payload) for resume
        self.lock = asyncio.Lock()

    async def send_dispatch(self, event: str, data: Any) -> int:
        async with self.lock:
            self.seq += 1
            raw = json.dumps({"op": 0, "t": event, "s": self.seq, "d": data})
            self.buffer.append((self.seq, raw))
            ws = self.ws
            if ws is not None and not ws.closed:
                try:
                    await ws.send_str(raw)
                except (ConnectionError, RuntimeError) as exc:  # closing underneath us
                    log.debug("fake gateway: send failed (%s); kept for resume", exc)
            return self.seq


# --------------------------------------------------------------------------- patching


@contextlib.contextmanager
def patch_discord_urls(api_base: str, gateway_url: str) -> Iterator[None]:
    """Point discord.py's REST base and default gateway at the given URLs and
    restore the originals on exit."""
    from discord.gateway import DiscordWebSocket
    from discord.http import Route

    old_base, old_gw = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = api_base
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    try:
        yield
    finally:
        Route.BASE = old_base
        DiscordWebSocket.DEFAULT_GATEWAY = old_gw


@contextlib.asynccontextmanager
async def running_client(
    fake: "FakeDiscord", client: Any, *, token: Optional[str] = None, timeout: float = 10.0
) -> AsyncIterator[Any]:
    """Run ``client.start(token)`` in a task until ``on_ready`` has fired, yield
    the client, then ``await client.close()`` and reap the task.

    Any exception from ``client.start`` (e.g. LoginFailure) is re-raised.
    """
    task = asyncio.ensure_future(client.start(token or fake.token or FAKE_TOKEN))

    async def _ready() -> None:
        await fake.wait_connected(timeout=timeout)
        await client.wait_until_ready()

    ready = asyncio.ensure_future(_ready())
    try:
        done, _ = await asyncio.wait({task, ready}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises if start() failed
            raise RuntimeError("client.start() returned before the client became ready")
        if ready not in done:
            raise FakeDiscordTimeout(f"client not ready after {timeout}s; requests so far: {fake.requests}")
        ready.result()
        yield client
    finally:
        ready.cancel()
        with contextlib.suppress(BaseException):
            await ready
        await client.close()
        try:
            await asyncio.wait_for(task, timeout=5)
        except asyncio.TimeoutError:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        except Exception:  # start() error already surfaced above, or irrelevant after close
            pass


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """Loopback Discord server.  Use as ``async with FakeDiscord() as fake:``.

    Constructor options:

    * ``token``: bot token REST/gateway must present (``None`` = accept any).
    * ``patch``: patch discord.py's URLs for the lifetime of the ``async with``
      (default True).  :meth:`patch_discord` is available for manual control.
    * ``echo_bot_messages``: dispatch MESSAGE_CREATE for the bot's own messages
      (as Discord does).
    * ``enforce_intents``: filter dispatches / blank content per IDENTIFY intents.
    * ``heartbeat_interval_ms``: sent in HELLO.

    Public, test-facing state (all plain lists/dicts, inspect freely):

    * ``bot_messages``: message dicts the bot POSTed to channels (incl. DMs).
    * ``reactions_by_bot``: ``{"channel_id", "message_id", "emoji", "action"}``
      dicts, action ``"add"``/``"remove"``, in order.
    * ``typing_calls``: channel ids of ``POST /channels/{id}/typing`` in order.
    * ``synced_commands``: scope -> list of command dicts as last synced; scope
      is ``None`` for global commands, the guild id (int) for guild commands.
    * ``requests``: ``(method, path)`` for every REST request, path relative to
      ``/api/v10`` (e.g. ``("POST", "/channels/10/messages")``).
    * ``unknown_requests``: ``(method, path)`` of requests no route matched.
    * ``internal_errors``: exception strings raised inside fake handlers.
    * ``message_edits`` / ``deleted_messages``: bot edits/deletes of channel messages.
    * ``interactions``: every :class:`InteractionRecord`, in order.
    * ``gateway_log``: ``(direction, op, event_name)`` of gateway traffic.
    """

    def __init__(
        self,
        *,
        token: Optional[str] = FAKE_TOKEN,
        patch: bool = True,
        echo_bot_messages: bool = True,
        enforce_intents: bool = True,
        heartbeat_interval_ms: int = 41250,
    ) -> None:
        self.token = token
        self.bot_id = BOT_ID
        self.app_id = APP_ID
        self.guild_id = GUILD_ID
        self._patch = patch
        self.echo_bot_messages = echo_bot_messages
        self.enforce_intents = enforce_intents
        self.heartbeat_interval_ms = heartbeat_interval_ms

        self.port: int = 0
        self._runner: Optional[web.AppRunner] = None
        self._patcher: Optional[contextlib.ExitStack] = None
        self._cond = asyncio.Condition()
        self._last_snowflake = 0

        # ---- model
        self.users: Dict[int, Dict[str, Any]] = {}
        self.members: Dict[int, Dict[str, Any]] = {}  # user id -> member (without "user")
        self.roles: Dict[int, Dict[str, Any]] = {}
        self.channels: Dict[int, Dict[str, Any]] = {}
        self.messages: Dict[int, List[Dict[str, Any]]] = {}  # channel id -> history (oldest first)
        self._messages_by_id: Dict[int, Dict[str, Any]] = {}
        self._reactions: Dict[int, Dict[str, List[int]]] = {}  # message id -> emoji key -> user ids
        self._emoji_payloads: Dict[str, Dict[str, Any]] = {}
        self._dm_by_user: Dict[int, int] = {}
        self.attachment_data: Dict[int, bytes] = {}
        self.owner_id = OWNER_ID

        # ---- records
        self.bot_messages: List[Dict[str, Any]] = []
        self.reactions_by_bot: List[Dict[str, Any]] = []
        self.typing_calls: List[int] = []
        self.synced_commands: Dict[Optional[int], List[Dict[str, Any]]] = {}
        self.sync_count = 0
        self._last_synced_scope: Optional[int] = None
        self.requests: List[Tuple[str, str]] = []
        self.unknown_requests: List[Tuple[str, str]] = []
        self.internal_errors: List[str] = []
        self.message_edits: List[Dict[str, Any]] = []
        self.deleted_messages: List[Dict[str, Any]] = []
        self.interactions: List[InteractionRecord] = []
        self._interactions_by_token: Dict[str, InteractionRecord] = {}
        self._interactions_by_id: Dict[int, InteractionRecord] = {}
        self._command_ids: Dict[Tuple[Optional[int], str, int], int] = {}
        self._consumed_bot_messages: set = set()
        self.gateway_log: List[Tuple[str, Any, Optional[str]]] = []
        self._sessions: Dict[str, _Session] = {}
        self._ws_conns: set = set()
        self._server_closed: set = set()  # sockets we closed ourselves (resumable)
        self.identify_count = 0
        self.resume_count = 0

        self._build_world()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "FakeDiscord":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the HTTP/websocket server on 127.0.0.1 (random port)."""
        app = web.Application(middlewares=[self._middleware])
        self._setup_routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        if self._patch:
            self._patcher = contextlib.ExitStack()
            self._patcher.enter_context(self.patch_discord())

    async def stop(self) -> None:
        """Close gateway connections, stop the server, undo URL patching."""
        for sess in self._sessions.values():
            sess.alive = False
        for ws in list(self._ws_conns):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"fake discord shutting down")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._patcher is not None:
            self._patcher.close()
            self._patcher = None

    @property
    def api_base(self) -> str:
        """``http://127.0.0.1:PORT/api/v10``"""
        return f"http://127.0.0.1:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        """``ws://127.0.0.1:PORT/``"""
        return f"ws://127.0.0.1:{self.port}/"

    def patch_discord(self) -> contextlib.AbstractContextManager:
        """Context manager pointing ``discord.http.Route.BASE`` and
        ``DiscordWebSocket.DEFAULT_GATEWAY`` at this fake; restores on exit."""
        if not self.port:
            raise RuntimeError("FakeDiscord not started")
        return patch_discord_urls(self.api_base, self.gateway_url)

    # ------------------------------------------------------------------ ids / model

    def snowflake(self) -> int:
        """A fresh, strictly increasing, time-based snowflake."""
        sf = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22
        sf = max(sf, self._last_snowflake + 1)
        self._last_snowflake = sf
        return sf

    def _build_world(self) -> None:
        self.add_user(BOT_ID, "reactlearn", bot=True)
        self.add_user(OWNER_ID, "owner")
        self.roles[EVERYONE_ROLE_ID] = self._role_payload(EVERYONE_ROLE_ID, "@everyone", EVERYONE_PERMISSIONS, 0)
        self.roles[ADMIN_ROLE_ID] = self._role_payload(ADMIN_ROLE_ID, "Admin", MANAGE_GUILD, 2)
        self.roles[REGULAR_ROLE_ID] = self._role_payload(REGULAR_ROLE_ID, "Regular", 0, 1)
        self.add_member(BOT_ID, "reactlearn", bot=True)
        self.add_member(OWNER_ID, "owner")
        self.add_member(ALICE_ID, "alice", roles=[ADMIN_ROLE_ID])
        self.add_member(BOB_ID, "bob", roles=[REGULAR_ROLE_ID])
        self.add_member(CAROL_ID, "carol")
        self.add_text_channel(GENERAL_ID, "general", position=0)
        self.add_text_channel(BOT_CHAT_ID, "bot-chat", position=1)

    @staticmethod
    def _role_payload(role_id: int, name: str, permissions: int, position: int) -> Dict[str, Any]:
        return {
            "id": _sid(role_id),
            "name": name,
            "permissions": str(permissions),
            "position": position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "managed": False,
            "mentionable": False,
            "icon": None,
            "unicode_emoji": None,
            "flags": 0,
        }

    def add_user(self, user_id: int, username: Optional[str] = None, *, bot: bool = False) -> Dict[str, Any]:
        """Create (or update the bot flag of) a user; returns the user payload."""
        user = self.users.get(user_id)
        if user is None:
            user = {
                "id": _sid(user_id),
                "username": username or f"user{user_id}",
                "discriminator": "0",
                "global_name": None,
                "avatar": None,
                "bot": bot,
                "public_flags": 0,
            }
            self.users[user_id] = user
        elif bot and not user.get("bot"):
            user["bot"] = True
        return user

    def add_member(
        self, user_id: int, username: Optional[str] = None, *, roles: Optional[List[int]] = None, bot: bool = False
    ) -> Dict[str, Any]:
        """Add a guild member (creating the user if needed); returns the member
        payload (without the ``user`` key)."""
        self.add_user(user_id, username, bot=bot)
        member = self.members.get(user_id)
        if member is None:
            member = {
                "roles": [_sid(r) for r in (roles or [])],
                "nick": None,
                "avatar": None,
                "joined_at": _iso(),
                "premium_since": None,
                "deaf": False,
                "mute": False,
                "pending": False,
                "flags": 0,
                "communication_disabled_until": None,
            }
            self.members[user_id] = member
        elif roles is not None:
            member["roles"] = [_sid(r) for r in roles]
        return member

    def add_text_channel(self, channel_id: int, name: str, *, position: Optional[int] = None) -> Dict[str, Any]:
        """Add a guild text channel (must be done before the client connects to be
        in GUILD_CREATE)."""
        ch = {
            "id": _sid(channel_id),
            "type": 0,
            "guild_id": _sid(self.guild_id),
            "name": name,
            "position": position if position is not None else len(self.channels),
            "permission_overwrites": [],
            "topic": None,
            "nsfw": False,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }
        self.channels[channel_id] = ch
        self.messages.setdefault(channel_id, [])
        return ch

    def dm_channel_id(self, user_id: int) -> int:
        """Id of the DM channel between the bot and ``user_id`` (created if needed)."""
        if user_id in self._dm_by_user:
            return self._dm_by_user[user_id]
        self.add_user(user_id)
        cid = self.snowflake()
        self.channels[cid] = {
            "id": _sid(cid),
            "type": 1,
            "recipients": [dict(self.users[user_id])],
            "last_message_id": None,
            "flags": 0,
        }
        self.messages.setdefault(cid, [])
        self._dm_by_user[user_id] = cid
        return cid

    def is_dm(self, channel_id: int) -> bool:
        ch = self.channels.get(int(channel_id))
        return ch is not None and ch["type"] == 1

    def user_payload(self, user_id: int) -> Dict[str, Any]:
        return dict(self.add_user(int(user_id)))

    def member_payload(self, user_id: int, *, with_user: bool = True) -> Dict[str, Any]:
        """Guild member payload (auto-adds the member)."""
        m = dict(self.add_member(int(user_id)))
        m["roles"] = list(m["roles"])
        if with_user:
            m["user"] = self.user_payload(user_id)
        return m

    def member_permissions(self, user_id: int) -> int:
        """Guild-level permission bits of a member (owner/ADMINISTRATOR -> all)."""
        if int(user_id) == self.owner_id:
            return ALL_PERMISSIONS
        perms = int(self.roles[EVERYONE_ROLE_ID]["permissions"])
        for rid in self.add_member(int(user_id))["roles"]:
            role = self.roles.get(int(rid))
            if role:
                perms |= int(role["permissions"])
        if perms & ADMINISTRATOR:
            return ALL_PERMISSIONS
        return perms

    def guild_payload(self) -> Dict[str, Any]:
        """Full GUILD_CREATE payload."""
        channels = []
        for ch in self.channels.values():
            if ch["type"] == 1:
                continue
            c = dict(ch)
            c.pop("guild_id", None)
            channels.append(c)
        return {
            "id": _sid(self.guild_id),
            "name": "ReactLearn Test Guild",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": _sid(self.owner_id),
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": _sid(GENERAL_ID) if GENERAL_ID in self.channels else None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "vanity_url_code": None,
            "features": [],
            "roles": [dict(r) for r in self.roles.values()],
            "emojis": [],
            "stickers": [],
            "application_id": None,
            "max_members": 500000,
            "max_video_channel_users": 25,
            "joined_at": self.members[BOT_ID]["joined_at"],
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "members": [self.member_payload(uid) for uid in self.members],
            "channels": channels,
            "threads": [],
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
        }

    def _bot_user_full(self) -> Dict[str, Any]:
        u = self.user_payload(BOT_ID)
        u.update({"verified": True, "mfa_enabled": False, "flags": 0, "email": None, "locale": "en-US"})
        return u

    def _application_payload(self) -> Dict[str, Any]:
        return {
            "id": _sid(self.app_id),
            "name": "reactlearn",
            "icon": None,
            "description": "",
            "summary": "",
            "type": None,
            "hook": True,
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "owner": self.user_payload(self.owner_id),
            "team": None,
            "flags": 0,
            "rpc_origins": [],
            "redirect_uris": [],
            "interactions_endpoint_url": None,
            "tags": [],
            "bot": self.user_payload(BOT_ID),
            "approximate_guild_count": 1,
        }

    # ------------------------------------------------------------------ messages helpers

    def get_message(self, message_id: int) -> Optional[Dict[str, Any]]:
        """Stored message dict by id (any channel), or None."""
        return self._messages_by_id.get(int(message_id))

    def channel_messages(self, channel_id: int) -> List[Dict[str, Any]]:
        """History of a channel, oldest first (user + bot + interaction messages)."""
        return list(self.messages.get(int(channel_id), []))

    def bot_messages_in(self, channel_id: int) -> List[Dict[str, Any]]:
        return [m for m in self.bot_messages if int(m["channel_id"]) == int(channel_id)]

    def _store_message(self, msg: Dict[str, Any]) -> None:
        cid = int(msg["channel_id"])
        self.messages.setdefault(cid, []).append(msg)
        self._messages_by_id[int(msg["id"])] = msg
        ch = self.channels.get(cid)
        if ch is not None:
            ch["last_message_id"] = msg["id"]

    def _mentions_from_content(self, content: str) -> Tuple[List[Dict[str, Any]], List[str]]:
        mentions: List[Dict[str, Any]] = []
        seen = set()
        for m in _MENTION_RE.finditer(content or ""):
            uid = int(m.group(1))
            if uid in self.users and uid not in seen:
                seen.add(uid)
                mentions.append(self._mention_payload(uid))
        roles = []
        for m in _ROLE_MENTION_RE.finditer(content or ""):
            if int(m.group(1)) in self.roles and m.group(1) not in roles:
                roles.append(m.group(1))
        return mentions, roles

    def _mention_payload(self, user_id: int) -> Dict[str, Any]:
        u = self.user_payload(user_id)
        if user_id in self.members:
            u["member"] = self.member_payload(user_id, with_user=False)
        return u

    def _message_view(self, msg: Dict[str, Any], viewer: int = BOT_ID) -> Dict[str, Any]:
        """Message payload as returned by REST (with current reactions)."""
        out = dict(msg)
        reactions = []
        for key, users in self._reactions.get(int(msg["id"]), {}).items():
            if not users:
                continue
            reactions.append(
                {
                    "emoji": dict(self._emoji_payloads[key]),
                    "count": len(users),
                    "count_details": {"burst": 0, "normal": len(users)},
                    "me": viewer in users,
                    "me_burst": False,
                    "burst_colors": [],
                }
            )
        out["reactions"] = reactions
        return out

    def _new_message(
        self,
        channel_id: int,
        author_id: int,
        content: str,
        *,
        reply_to: Optional[int] = None,
        reply_ping: bool = True,
        extra_mentions: Optional[List[int]] = None,
        msg_type: int = 0,
    ) -> Dict[str, Any]:
        ch = self.channels[channel_id]
        is_dm = ch["type"] == 1
        mentions, role_mentions = self._mentions_from_content(content)
        mentioned_ids = {int(m["id"]) for m in mentions}
        for uid in extra_mentions or []:
            if uid not in mentioned_ids:
                mentions.append(self._mention_payload(uid))
                mentioned_ids.add(uid)
        mid = self.snowflake()
        msg: Dict[str, Any] = {
            "id": _sid(mid),
            "channel_id": _sid(channel_id),
            "author": self.user_payload(author_id),
            "content": content,
            "timestamp": _iso(),
            "edited_timestamp": None,
            "tts": False,
            "mention_everyone": "@everyone" in (content or ""),
            "mentions": mentions,
            "mention_roles": role_mentions,
            "attachments": [],
            "embeds": [],
            "reactions": [],
            "pinned": False,
            "type": msg_type,
            "flags": 0,
            "components": [],
        }
        if not is_dm:
            msg["guild_id"] = _sid(self.guild_id)
        if reply_to is not None:
            ref = self._messages_by_id.get(int(reply_to))
            msg["type"] = 19
            msg["message_reference"] = {
                "type": 0,
                "message_id": _sid(reply_to),
                "channel_id": _sid(channel_id),
                **({} if is_dm else {"guild_id": _sid(self.guild_id)}),
            }
            msg["referenced_message"] = self._message_view(ref) if ref is not None else None
            if ref is not None and reply_ping:
                ref_author = int(ref["author"]["id"])
                if ref_author not in mentioned_ids:
                    mentions.append(self._mention_payload(ref_author))
        return msg

    def _gateway_message(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """MESSAGE_CREATE payload: message + partial ``member`` for guild messages."""
        d = dict(msg)
        if "guild_id" in d and not d.get("webhook_id"):
            d["member"] = self.member_payload(int(msg["author"]["id"]), with_user=False)
        return d

    # ------------------------------------------------------------------ test-facing actions

    async def user_message(
        self,
        channel_id: Optional[int],
        author_id: int,
        content: str,
        *,
        mentions_bot: bool = False,
        reply_to: Optional[int] = None,
        reply_ping: bool = True,
        bot_author: bool = False,
        dm: bool = False,
    ) -> Dict[str, Any]:
        """Simulate a user posting ``content``; dispatches MESSAGE_CREATE and
        stores it in the channel history.  Returns the message dict.

        * ``mentions_bot``: the bot is mentioned; if ``content`` lacks a
          ``<@BOT_ID>`` token, ``"<@1000> "`` is prepended (as a real mention
          must appear in the content).  ``<@id>`` tokens already in ``content``
          always populate ``mentions``.
        * ``reply_to``: message id this is a reply to (type 19, with
          ``message_reference`` + ``referenced_message``); with ``reply_ping``
          (default) the replied-to author is added to ``mentions`` like the
          Discord client does, so replying to a bot message mentions the bot.
        * ``bot_author``: mark the author account as a bot.
        * ``dm``: post in the DM channel between ``author_id`` and the bot
          (``channel_id`` may then be None).  A DM channel id also implies dm.
        """
        author_id = int(author_id)
        if dm or channel_id is None or self.is_dm(channel_id):
            channel_id = self.dm_channel_id(author_id) if (dm or channel_id is None) else int(channel_id)
            self.add_user(author_id, bot=bot_author)
        else:
            channel_id = int(channel_id)
            if channel_id not in self.channels:
                raise KeyError(f"unknown channel {channel_id}")
            self.add_member(author_id, bot=bot_author)
        if mentions_bot and not re.search(rf"<@!?{self.bot_id}>", content):
            content = f"<@{self.bot_id}> {content}"
        msg = self._new_message(channel_id, author_id, content, reply_to=reply_to, reply_ping=reply_ping)
        self._store_message(msg)
        await self.dispatch("MESSAGE_CREATE", self._gateway_message(msg))
        await self._bump()
        return msg

    @staticmethod
    def _parse_emoji(emoji: str) -> Dict[str, Any]:
        m = _CUSTOM_EMOJI_RE.match(emoji)
        if m and not emoji.isdigit():
            return {"id": m.group(3), "name": m.group(2), "animated": bool(m.group(1))}
        return {"id": None, "name": emoji}

    @staticmethod
    def _emoji_key(payload: Dict[str, Any]) -> str:
        return f"{payload['name']}:{payload['id']}" if payload.get("id") else payload["name"]

    def reactions_on(self, message_id: int) -> Dict[str, List[int]]:
        """Current reactions on a message: emoji key -> list of user ids
        (emoji key is the unicode char, or ``name:id`` for custom emoji)."""
        return {k: list(v) for k, v in self._reactions.get(int(message_id), {}).items() if v}

    async def _apply_reaction(
        self, channel_id: int, message_id: int, user_id: int, emoji: str, add: bool, *, force: bool = False
    ) -> bool:
        """Update reaction state and dispatch the event.  Returns False if it was a
        no-op (already reacted / not reacted), in which case nothing is dispatched
        unless ``force``."""
        payload = self._parse_emoji(emoji)
        key = self._emoji_key(payload)
        self._emoji_payloads.setdefault(key, payload)
        users = self._reactions.setdefault(int(message_id), {}).setdefault(key, [])
        if add:
            changed = user_id not in users
            if changed:
                users.append(user_id)
        else:
            changed = user_id in users
            if changed:
                users.remove(user_id)
        if not changed and not force:
            return False
        d: Dict[str, Any] = {
            "user_id": _sid(user_id),
            "channel_id": _sid(channel_id),
            "message_id": _sid(message_id),
            "emoji": dict(payload),
            "burst": False,
            "type": 0,
        }
        if not self.is_dm(channel_id):
            d["guild_id"] = _sid(self.guild_id)
        if add:
            d["burst_colors"] = []
            msg = self._messages_by_id.get(int(message_id))
            if msg is not None:
                d["message_author_id"] = msg["author"]["id"]
            if "guild_id" in d:
                d["member"] = self.member_payload(user_id)
        await self.dispatch("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", d)
        return True

    async def react(
        self,
        channel_id: int,
        message_id: Union[int, str],
        user_id: int,
        emoji: str,
        add: bool = True,
        bot_user: bool = False,
        *,
        force: bool = False,
    ) -> Dict[str, Any]:
        """Simulate ``user_id`` adding (``add=True``) or removing a reaction.

        ``emoji`` is a unicode emoji (``"👍"``) or a custom emoji ``"name:id"`` /
        ``"<:name:id>"``.  Dispatches MESSAGE_REACTION_ADD (with ``member`` in
        guild channels, ``message_author_id``, ``burst: false``, ``type: 0``) or
        MESSAGE_REACTION_REMOVE.  ``bot_user`` marks the reacting account as a
        bot.  Like Discord, adding an existing reaction / removing a missing one
        is a no-op with no event, unless ``force=True``.  The message need not be
        known to the fake.  Returns ``{"dispatched": bool, "emoji": {...}}``.
        """
        channel_id, message_id, user_id = int(channel_id), int(message_id), int(user_id)
        if self.is_dm(channel_id):
            self.add_user(user_id, bot=bot_user)
        else:
            self.add_member(user_id, bot=bot_user)
        sent = await self._apply_reaction(channel_id, message_id, user_id, emoji, add, force=force)
        await self._bump()
        return {"dispatched": sent, "emoji": self._parse_emoji(emoji)}

    # ---- slash commands

    def find_command(self, name: str, guild_id: Optional[int] = None) -> Dict[str, Any]:
        """Synced top-level command by name: guild scope first, then global."""
        for scope in ([guild_id] if guild_id is not None else []) + [None]:
            for cmd in self.synced_commands.get(scope, []):
                if cmd["name"] == name and int(cmd.get("type", 1)) == 1:
                    return cmd
        known = {scope: [c["name"] for c in cmds] for scope, cmds in self.synced_commands.items()}
        raise LookupError(f"slash command {name!r} not synced (synced: {known}); did the bot call tree.sync()?")

    def _resolve_option_value(self, spec: Dict[str, Any], value: Any, resolved: Dict[str, Dict[str, Any]], in_guild: bool) -> Any:
        t = int(spec["type"])
        name = spec["name"]
        choices = spec.get("choices") or []
        if choices and not any(c["value"] == value for c in choices):
            for c in choices:
                if c["name"] == value:
                    value = c["value"]
                    break
            else:
                raise ValueError(f"option {name!r}: {value!r} is not one of the choices {choices}")
        if t == 3:
            return str(value)
        if t == 4:
            if isinstance(value, bool):
                raise TypeError(f"option {name!r} is an integer")
            return int(value)
        if t == 5:
            return bool(value)
        if t == 10:
            return float(value)
        oid = int(getattr(value, "id", value))
        if t == 9:  # mentionable: role if it is a role id, else user
            t = 8 if oid in self.roles else 6
        if t == 6:
            resolved.setdefault("users", {})[str(oid)] = self.user_payload(oid)
            if in_guild and oid in self.members:
                m = self.member_payload(oid, with_user=False)
                m["permissions"] = str(self.member_permissions(oid))
                resolved.setdefault("members", {})[str(oid)] = m
        elif t == 7:
            ch = self.channels[oid]
            c = {k: ch[k] for k in ("id", "type") if k in ch}
            c.update({"name": ch.get("name", ""), "permissions": str(ALL_PERMISSIONS)})
            for k in ("guild_id", "position", "topic", "nsfw", "parent_id", "last_message_id", "rate_limit_per_user", "flags"):
                if k in ch:
                    c[k] = ch[k]
            resolved.setdefault("channels", {})[str(oid)] = c
        elif t == 8:
            resolved.setdefault("roles", {})[str(oid)] = dict(self.roles[oid])
        elif t == 11:
            raise NotImplementedError("attachment options are not supported by the fake")
        return str(oid)

    def _build_options(
        self, specs: List[Dict[str, Any]], given: Dict[str, Any], resolved: Dict[str, Dict[str, Any]], in_guild: bool, path: str
    ) -> List[Dict[str, Any]]:
        by_name = {s["name"]: s for s in specs}
        out = []
        for name, value in given.items():
            if name not in by_name:
                raise KeyError(f"/{path} has no option {name!r}; options: {sorted(by_name)}")
            spec = by_name[name]
            out.append({"name": name, "type": int(spec["type"]), "value": self._resolve_option_value(spec, value, resolved, in_guild)})
        missing = [s["name"] for s in specs if s.get("required") and s["name"] not in given]
        if missing:
            raise KeyError(f"/{path}: missing required option(s) {missing}")
        return out

    async def slash(
        self,
        name: str,
        options: Optional[Dict[str, Any]] = None,
        user_id: int = BOB_ID,
        *,
        admin: Optional[bool] = None,
        channel_id: Optional[int] = None,
        dm: bool = False,
        locale: str = "en-US",
    ) -> InteractionRecord:
        """Invoke a synced chat-input command; dispatches INTERACTION_CREATE
        (type 2) and returns an :class:`InteractionRecord` that collects the
        bot's callback response, ``@original`` edits and followups.

        * ``name``: command name; ``"group sub"`` / ``"cmd sub"`` addresses
          subcommands (options are then the subcommand's).
        * ``options``: ``{option_name: value}``; values are converted to the
          option's declared type (user/channel/role options accept ids or objects
          with ``.id`` and get ``resolved`` data; a choice's *name* is mapped to
          its value).  Unknown or missing-required options raise.
        * ``admin``: ``None`` -> permissions from the member's roles; ``True`` ->
          member additionally has the Admin role (MANAGE_GUILD 0x20); ``False``
          -> the Admin role is stripped for this interaction.
        * ``channel_id``: defaults to :data:`GENERAL_ID`; ``dm=True`` (or a DM
          channel id) invokes it from the user's DM with the bot.

        Raises :class:`LookupError` if not synced, :class:`SlashNotPermitted` if
        Discord would not offer the command to this user/context.
        """
        user_id = int(user_id)
        options = dict(options or {})
        if dm or (channel_id is not None and self.is_dm(channel_id)):
            channel_id = self.dm_channel_id(user_id) if channel_id is None else int(channel_id)
            in_guild = False
        else:
            channel_id = GENERAL_ID if channel_id is None else int(channel_id)
            in_guild = True
        parts = name.split()
        try:
            cmd = self.find_command(parts[0], self.guild_id if in_guild else None)
        except LookupError:
            if not in_guild and any(c["name"] == parts[0] for c in self.synced_commands.get(self.guild_id, [])):
                raise SlashNotPermitted(f"/{parts[0]} is a guild command; it is not available in DMs") from None
            raise

        # permissions
        perms = 0
        member: Optional[Dict[str, Any]] = None
        if in_guild:
            self.add_member(user_id)
            member = self.member_payload(user_id)
            roles = [r for r in member["roles"] if r != _sid(ADMIN_ROLE_ID)]
            has_admin_role = _sid(ADMIN_ROLE_ID) in member["roles"]
            if admin or (admin is None and has_admin_role):
                roles.append(_sid(ADMIN_ROLE_ID))
            member["roles"] = roles
            if user_id == self.owner_id:
                perms = ALL_PERMISSIONS
            else:
                perms = int(self.roles[EVERYONE_ROLE_ID]["permissions"])
                for rid in roles:
                    perms |= int(self.roles[int(rid)]["permissions"])
                if perms & ADMINISTRATOR:
                    perms = ALL_PERMISSIONS
            member["permissions"] = str(perms)
            required = cmd.get("default_member_permissions")
            # "0" means: nobody but administrators (all permission bits)
            if required is not None and (
                (int(required) & perms) != int(required) or (int(required) == 0 and perms != ALL_PERMISSIONS)
            ):
                raise SlashNotPermitted(
                    f"/{name}: user {user_id} lacks default_member_permissions={required} (has {perms}); "
                    "Discord would not show this command to them"
                )
        else:
            self.add_user(user_id)
            contexts = cmd.get("contexts")
            if cmd.get("guild_id") is not None or cmd.get("dm_permission") is False or (
                contexts is not None and 1 not in contexts
            ):
                raise SlashNotPermitted(f"/{name} is not available in DMs")

        # options / subcommands
        resolved: Dict[str, Dict[str, Any]] = {}
        specs = cmd.get("options") or []
        top_options: List[Dict[str, Any]] = []
        container = top_options
        path = parts[0]
        for sub in parts[1:]:
            spec = next((s for s in specs if s["name"] == sub and int(s["type"]) in (1, 2)), None)
            if spec is None:
                raise KeyError(f"/{path} has no subcommand {sub!r}")
            path += f" {sub}"
            node: Dict[str, Any] = {"name": sub, "type": int(spec["type"]), "options": []}
            container.append(node)
            container = node["options"]
            specs = spec.get("options") or []
        container.extend(self._build_options(specs, options, resolved, in_guild, path))

        iid = self.snowflake()
        token = f"fake-interaction-{iid}-{secrets.token_hex(8)}"
        data: Dict[str, Any] = {"id": cmd["id"], "name": cmd["name"], "type": 1, "options": top_options}
        if cmd.get("guild_id") is not None:
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        ch = self.channels[channel_id]
        payload: Dict[str, Any] = {
            "id": _sid(iid),
            "application_id": _sid(self.app_id),
            "type": 2,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "app_permissions": str(self.member_permissions(BOT_ID) if in_guild else 0),
            "channel_id": _sid(channel_id),
        }
        if in_guild:
            chan = dict(ch)
            chan["permissions"] = str(perms)
            payload.update(
                {
                    "guild_id": _sid(self.guild_id),
                    "guild": {"id": _sid(self.guild_id), "locale": "en-US", "features": []},
                    "guild_locale": "en-US",
                    "channel": chan,
                    "member": member,
                    "context": 0,
                    "authorizing_integration_owners": {"0": _sid(self.guild_id)},
                }
            )
        else:
            payload.update(
                {
                    "channel": dict(ch),
                    "user": self.user_payload(user_id),
                    "context": 1,
                    "authorizing_integration_owners": {"0": "0"},
                }
            )
        record = InteractionRecord(
            id=iid,
            token=token,
            name=name,
            command=cmd,
            user_id=user_id,
            channel_id=channel_id,
            guild_id=self.guild_id if in_guild else None,
            payload=payload,
        )
        self.interactions.append(record)
        self._interactions_by_token[token] = record
        self._interactions_by_id[iid] = record
        await self.dispatch("INTERACTION_CREATE", payload)
        await self._bump()
        return record

    # ---- gateway control

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to connected clients; discord.py then reconnects to
        ``resume_gateway_url`` and RESUMEs (missed dispatches are replayed)."""
        for sess in list(self._sessions.values()):
            if sess.alive and sess.ws is not None and not sess.ws.closed:
                await self._send_raw(sess.ws, {"op": 7, "d": None})

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway websocket from the server side with ``code``
        (4000 = resumable error; the client reconnects and RESUMEs)."""
        for ws in list(self._ws_conns):
            self._server_closed.add(ws)
            with contextlib.suppress(Exception):
                await ws.close(code=code)

    @property
    def connected(self) -> bool:
        """True while at least one identified session has an open websocket."""
        return any(s.alive and s.ws is not None and not s.ws.closed for s in self._sessions.values())

    # ------------------------------------------------------------------ waiting

    async def _bump(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Union[str, Callable[[], Any]], timeout: float = 10.0) -> Any:
        """Wait until ``predicate()`` returns something truthy and return it.
        The predicate is re-evaluated after every REST request, gateway message
        and test action.

        ``predicate`` may instead be one of these kinds (each waits for a *new*
        occurrence after the call and returns it):
        ``"connected"``, ``"bot_message"``, ``"reaction_by_bot"``, ``"typing"``,
        ``"commands_synced"`` (returns the synced scope list), ``"request"``
        (returns the ``(method, path)``).
        Raises :class:`FakeDiscordTimeout` (an AssertionError) on timeout.
        """
        desc = predicate if isinstance(predicate, str) else getattr(predicate, "__name__", "predicate")
        if isinstance(predicate, str):
            predicate = self._kind_predicate(predicate)

        async def _wait() -> Any:
            async with self._cond:
                return await self._cond.wait_for(predicate)  # type: ignore[arg-type]

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except asyncio.TimeoutError:
            raise FakeDiscordTimeout(
                f"timed out after {timeout}s waiting for {desc}; last requests: {self.requests[-8:]}; "
                f"unknown routes: {self.unknown_requests}; fake errors: {self.internal_errors}"
            ) from None

    def _kind_predicate(self, kind: str) -> Callable[[], Any]:
        if kind == "connected":
            return lambda: self.connected
        lists: Dict[str, List[Any]] = {
            "bot_message": self.bot_messages,
            "reaction_by_bot": self.reactions_by_bot,
            "typing": self.typing_calls,
            "request": self.requests,
        }
        if kind in lists:
            lst = lists[kind]
            n = len(lst)
            return lambda: lst[n] if len(lst) > n else None
        if kind == "commands_synced":
            n = self.sync_count
            return lambda: (self._last_synced_scope,) if self.sync_count > n else None
        raise ValueError(f"unknown wait kind {kind!r}")

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Wait until a client has IDENTIFIED and received READY + GUILD_CREATE
        (the client's ``on_ready`` fires ``guild_ready_timeout`` later)."""
        await self.wait_for(lambda: self.connected, timeout)

    async def wait_bot_message(
        self,
        channel_id: Optional[int] = None,
        timeout: float = 10.0,
        *,
        predicate: Optional[Callable[[Dict[str, Any]], bool]] = None,
    ) -> Dict[str, Any]:
        """Return the oldest bot channel message (REST ``POST /channels/{id}/messages``)
        in ``channel_id`` (any channel if None) matching ``predicate`` that no
        earlier ``wait_bot_message`` call returned, waiting for it if needed.
        Each message is handed out once, so sequential calls walk the messages
        in order and a reply posted before the call is not missed."""

        def _find() -> Optional[Dict[str, Any]]:
            for m in self.bot_messages:
                if int(m["id"]) in self._consumed_bot_messages:
                    continue
                if channel_id is not None and int(m["channel_id"]) != int(channel_id):
                    continue
                if predicate is not None and not predicate(m):
                    continue
                return m
            return None

        _find.__name__ = f"bot message in channel {channel_id}"
        msg = await self.wait_for(_find, timeout)
        self._consumed_bot_messages.add(int(msg["id"]))
        return msg

    async def expect_no_bot_message(self, channel_id: Optional[int] = None, within: float = 0.3) -> None:
        """Assert no *unconsumed* bot message appears in ``channel_id`` (any if
        None) within ``within`` seconds."""
        try:
            msg = await self.wait_bot_message(channel_id, timeout=within)
        except FakeDiscordTimeout:
            return
        raise AssertionError(f"unexpected bot message: {msg.get('content')!r} in {msg['channel_id']}")

    async def wait_interaction_response(self, record: InteractionRecord, timeout: float = 10.0) -> Dict[str, Any]:
        """Wait for the interaction's acknowledgement; returns the callback body."""

        def _responded() -> Optional[Dict[str, Any]]:
            return record.response

        _responded.__name__ = f"response to /{record.name}"
        return await self.wait_for(_responded, timeout)

    async def wait_followup(self, record: InteractionRecord, n: int = 1, timeout: float = 10.0) -> Dict[str, Any]:
        """Wait for the ``n``-th followup message (1-based); returns it."""

        def _f() -> Optional[Dict[str, Any]]:
            return record.followups[n - 1] if len(record.followups) >= n else None

        _f.__name__ = f"followup #{n} to /{record.name}"
        return await self.wait_for(_f, timeout)

    async def wait_interaction_message(self, record: InteractionRecord, n: int = 1, timeout: float = 10.0) -> Dict[str, Any]:
        """Wait until the interaction has ``n`` visible messages (see
        :meth:`InteractionRecord.messages`: a non-loading original counts, as do
        followups) and return the ``n``-th.  Works for direct responses,
        defer + followup and defer + ``edit_original_response`` alike."""

        def _m() -> Optional[Dict[str, Any]]:
            msgs = record.messages()
            return msgs[n - 1] if len(msgs) >= n else None

        _m.__name__ = f"message #{n} for /{record.name}"
        return await self.wait_for(_m, timeout)

    async def wait_commands_synced(self, guild_id: Optional[int] = None, timeout: float = 10.0) -> List[Dict[str, Any]]:
        """Wait until commands for ``guild_id`` (None = global) have been synced
        at least once; returns that scope's command list."""

        def _s() -> Optional[List[Dict[str, Any]]]:
            return self.synced_commands.get(guild_id) if guild_id in self.synced_commands else None

        _s.__name__ = f"commands synced for scope {guild_id}"
        return await self.wait_for(_s, timeout)

    def assert_clean(self) -> None:
        """Fail if any request hit an unknown route or a fake handler crashed."""
        assert not self.unknown_requests, f"requests to routes the fake lacks: {self.unknown_requests}"
        assert not self.internal_errors, f"fake discord handler errors: {self.internal_errors}"

    # ------------------------------------------------------------------ gateway

    def _intent_filter(self, sess: _Session, event: str, data: Any) -> Any:
        if not self.enforce_intents or not isinstance(data, dict):
            return data
        in_guild = "guild_id" in data
        if event.startswith("MESSAGE_REACTION"):
            need = INTENT_GUILD_MESSAGE_REACTIONS if in_guild else INTENT_DIRECT_MESSAGE_REACTIONS
            return data if sess.intents & need else None
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE", "MESSAGE_DELETE"):
            need = INTENT_GUILD_MESSAGES if in_guild else INTENT_DIRECT_MESSAGES
            if not sess.intents & need:
                return None
            if event != "MESSAGE_DELETE" and in_guild and not sess.intents & INTENT_MESSAGE_CONTENT:
                author = int((data.get("author") or {}).get("id", 0))
                mentioned = any(int(m["id"]) == self.bot_id for m in data.get("mentions") or [])
                if author != self.bot_id and not mentioned:
                    data = dict(data, content="", embeds=[], attachments=[], components=[])
            return data
        return data

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a DISPATCH (op 0) with a fresh sequence number to every live
        session (buffered for RESUME if its socket is momentarily down).
        Raises RuntimeError if no client has ever identified."""
        sessions = [s for s in self._sessions.values() if s.alive]
        if not sessions:
            raise RuntimeError(f"cannot dispatch {event}: no gateway client connected (await fake.wait_connected())")
        for sess in sessions:
            d = self._intent_filter(sess, event, data)
            if d is None:
                continue
            await sess.send_dispatch(event, d)
            self.gateway_log.append(("out", 0, event))

    async def _send_raw(self, ws: web.WebSocketResponse, payload: Dict[str, Any]) -> None:
        self.gateway_log.append(("out", payload.get("op"), payload.get("t")))
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(payload))

    async def _gateway_handler(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return _error(400, 0, "fake gateway: websocket upgrade expected")
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        self._ws_conns.add(ws)
        sess_holder: Dict[str, Optional[_Session]] = {"s": None}
        try:
            await self._send_raw(ws, {"op": 10, "s": None, "t": None, "d": {"heartbeat_interval": self.heartbeat_interval_ms}})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    try:
                        await self._on_gateway_payload(ws, json.loads(msg.data), sess_holder)
                    except Exception as exc:  # keep the socket alive; surface the bug
                        log.exception("fake gateway handler error")
                        self.internal_errors.append(f"gateway: {exc!r}")
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            self._ws_conns.discard(ws)
            sess = sess_holder["s"]
            server_closed = ws in self._server_closed
            self._server_closed.discard(ws)
            log.debug("fake gateway: socket closed with %s (server-initiated: %s)", ws.close_code, server_closed)
            if sess is not None and sess.ws is ws:
                sess.ws = None
                if not server_closed and ws.close_code in (1000, 1001):
                    sess.alive = False  # the client closed for good: not resumable
            await self._bump()
        return ws

    async def _on_gateway_payload(self, ws: web.WebSocketResponse, payload: Dict[str, Any], holder: Dict[str, Optional[_Session]]) -> None:
        op = payload.get("op")
        d = payload.get("d")
        self.gateway_log.append(("in", op, None))
        if op == 1:  # heartbeat
            await self._send_raw(ws, {"op": 11, "s": None, "t": None, "d": None})
        elif op == 2:  # identify
            if self.token is not None and d.get("token") != self.token:
                await ws.close(code=4004, message=b"Authentication failed.")
                return
            self.identify_count += 1
            sess = _Session(secrets.token_hex(16), int(d.get("intents") or 0))
            sess.ws = ws
            holder["s"] = sess
            await sess.send_dispatch(
                "READY",
                {
                    "v": 10,
                    "user": self._bot_user_full(),
                    "guilds": [{"id": _sid(self.guild_id), "unavailable": True}],
                    "session_id": sess.session_id,
                    "resume_gateway_url": self.gateway_url,
                    "session_type": "normal",
                    "application": {"id": _sid(self.app_id), "flags": 0},
                    "private_channels": [],
                    "relationships": [],
                    "presences": [],
                    "guild_join_requests": [],
                    "geo_ordered_rtc_regions": [],
                    "user_settings": {},
                },
            )
            await sess.send_dispatch("GUILD_CREATE", self.guild_payload())
            self.gateway_log.append(("out", 0, "READY"))
            self.gateway_log.append(("out", 0, "GUILD_CREATE"))
            self._sessions[sess.session_id] = sess  # only now can dispatch() see it
            await self._bump()
        elif op == 6:  # resume
            sess = self._sessions.get(d.get("session_id"))
            if sess is None or not sess.alive or (self.token is not None and d.get("token") != self.token):
                await self._send_raw(ws, {"op": 9, "s": None, "t": None, "d": False})
                return
            self.resume_count += 1
            async with sess.lock:
                sess.ws = ws
                holder["s"] = sess
                last = int(d.get("seq") or 0)
                for seq, raw in sess.buffer:
                    if seq > last:
                        await ws.send_str(raw)
            await sess.send_dispatch("RESUMED", {})
            self.gateway_log.append(("out", 0, "RESUMED"))
            await self._bump()
        elif op == 8:  # request guild members
            sess = holder["s"]
            if sess is None:
                return
            ids = {int(x) for x in (d.get("user_ids") or [])} if d.get("user_ids") else None
            query = (d.get("query") or "").lower()
            limit = int(d.get("limit") or 0) or len(self.members)
            members = []
            for uid in self.members:
                if ids is not None and uid not in ids:
                    continue
                if query and not self.users[uid]["username"].lower().startswith(query):
                    continue
                members.append(self.member_payload(uid))
            members = members[:limit]
            chunk = {"guild_id": _sid(self.guild_id), "members": members, "chunk_index": 0, "chunk_count": 1, "not_found": []}
            if d.get("nonce"):
                chunk["nonce"] = d["nonce"]
            await sess.send_dispatch("GUILD_MEMBERS_CHUNK", chunk)
        elif op in (3, 4):  # presence / voice state: accepted, ignored
            pass
        else:
            log.warning("fake gateway: unhandled op %s: %s", op, payload)

    # ------------------------------------------------------------------ REST plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path
        is_api = path.startswith("/api/")
        if is_api:
            rel = re.sub(r"^/api/v\d+", "", path)
            self.requests.append((request.method, rel))
            needs_auth = not (rel.startswith("/interactions/") or rel.startswith("/webhooks/"))
            if needs_auth and self.token is not None and request.headers.get("Authorization") != f"Bot {self.token}":
                await self._bump()
                return _error(401, 0, "401: Unauthorized")
        try:
            resp = await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("fake discord REST handler error for %s %s", request.method, path)
            self.internal_errors.append(f"{request.method} {path}: {exc!r}")
            resp = _error(400, 0, f"fake discord internal error: {exc!r}")
        await self._bump()
        return resp

    def _setup_routes(self, app: web.Application) -> None:
        p = r"/api/v{version:\d+}"
        r = app.router
        r.add_get("/", self._gateway_handler)
        r.add_get(p + "/gateway", self._h_gateway)
        r.add_get(p + "/gateway/bot", self._h_gateway_bot)
        r.add_get(p + "/users/@me", self._h_me)
        r.add_get(p + "/users/{uid:\\d+}", self._h_get_user)
        r.add_post(p + "/users/@me/channels", self._h_create_dm)
        r.add_get(p + "/applications/@me", self._h_application)
        r.add_get(p + "/oauth2/applications/@me", self._h_application)
        r.add_get(p + "/guilds/{gid}", self._h_get_guild)
        r.add_get(p + "/guilds/{gid}/channels", self._h_guild_channels)
        r.add_get(p + "/guilds/{gid}/roles", self._h_guild_roles)
        r.add_get(p + "/guilds/{gid}/members", self._h_guild_members)
        r.add_get(p + "/guilds/{gid}/members/{uid}", self._h_guild_member)
        r.add_get(p + "/channels/{cid}", self._h_get_channel)
        r.add_post(p + "/channels/{cid}/messages", self._h_post_message)
        r.add_get(p + "/channels/{cid}/messages", self._h_history)
        r.add_get(p + "/channels/{cid}/messages/{mid}", self._h_get_message)
        r.add_patch(p + "/channels/{cid}/messages/{mid}", self._h_edit_message)
        r.add_delete(p + "/channels/{cid}/messages/{mid}", self._h_delete_message)
        r.add_put(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self._h_add_own_reaction)
        r.add_delete(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}/{who}", self._h_remove_reaction)
        r.add_get(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}", self._h_reaction_users)
        r.add_post(p + "/channels/{cid}/typing", self._h_typing)
        for scope in ("", "/guilds/{gid}"):
            base = p + "/applications/{app}" + scope + "/commands"
            r.add_put(base, self._h_put_commands)
            r.add_get(base, self._h_get_commands)
            r.add_post(base, self._h_post_command)
            r.add_get(base + "/{cmd_id}", self._h_get_command)
            r.add_patch(base + "/{cmd_id}", self._h_patch_command)
            r.add_delete(base + "/{cmd_id}", self._h_delete_command)
        r.add_post(p + "/interactions/{iid}/{token}/callback", self._h_interaction_callback)
        r.add_post(p + "/webhooks/{app}/{token}", self._h_followup)
        r.add_get(p + "/webhooks/{app}/{token}/messages/{mid}", self._h_webhook_get)
        r.add_patch(p + "/webhooks/{app}/{token}/messages/{mid}", self._h_webhook_edit)
        r.add_delete(p + "/webhooks/{app}/{token}/messages/{mid}", self._h_webhook_delete)
        r.add_get("/attachments/{cid}/{aid}/{filename}", self._h_attachment)
        r.add_route("*", "/{tail:.*}", self._h_unknown)

    async def _h_unknown(self, request: web.Request) -> web.Response:
        rel = re.sub(r"^/api/v\d+", "", request.path)
        self.unknown_requests.append((request.method, rel))
        log.warning("fake discord: no route for %s %s", request.method, request.path_qs)
        return _error(404, 0, f"fake discord: unknown route {request.method} {rel}")

    async def _read_body(self, request: web.Request) -> Tuple[Dict[str, Any], List[Tuple[str, str, bytes]]]:
        """JSON body, or multipart ``payload_json`` + files -> (payload, files)."""
        files: List[Tuple[str, str, bytes]] = []
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            payload = json.loads(form.get("payload_json") or "{}")
            for key, value in form.items():
                if key.startswith("files[") and hasattr(value, "file"):
                    files.append((value.filename, value.content_type, value.file.read()))
            return payload, files
        raw = await request.read()
        return (json.loads(raw) if raw else {}), files

    def _attachments(self, channel_id: int, files: List[Tuple[str, str, bytes]]) -> List[Dict[str, Any]]:
        out = []
        for filename, ctype, data in files:
            aid = self.snowflake()
            self.attachment_data[aid] = data
            url = f"http://127.0.0.1:{self.port}/attachments/{channel_id}/{aid}/{urllib.parse.quote(filename)}"
            out.append(
                {"id": _sid(aid), "filename": filename, "size": len(data), "url": url, "proxy_url": url, "content_type": ctype}
            )
        return out

    @staticmethod
    def _validate_message_body(payload: Dict[str, Any], has_files: bool) -> Optional[web.Response]:
        content = payload.get("content")
        if content is not None and len(content) > 2000:
            return _error(
                400,
                50035,
                "Invalid Form Body",
                {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}},
            )
        if not (content or payload.get("embeds") or payload.get("components") or payload.get("sticker_ids") or payload.get("poll") or has_files):
            return _error(400, 50006, "Cannot send an empty message")
        return None

    def _check_channel(self, request: web.Request) -> Tuple[Optional[int], Optional[web.Response]]:
        try:
            cid = int(request.match_info["cid"])
        except ValueError:
            return None, _error(404, 10003, "Unknown Channel")
        if cid not in self.channels:
            return None, _error(404, 10003, "Unknown Channel")
        return cid, None

    def _check_message(self, cid: int, mid_raw: str) -> Tuple[Optional[Dict[str, Any]], Optional[web.Response]]:
        try:
            mid = int(mid_raw)
        except ValueError:
            return None, _error(404, 10008, "Unknown Message")
        msg = self._messages_by_id.get(mid)
        if msg is None or int(msg["channel_id"]) != cid:
            return None, _error(404, 10008, "Unknown Message")
        return msg, None

    # ------------------------------------------------------------------ REST handlers

    async def _h_gateway(self, request: web.Request) -> web.Response:
        return _json_response({"url": self.gateway_url.rstrip("/")})

    async def _h_gateway_bot(self, request: web.Request) -> web.Response:
        return _json_response(
            {
                "url": self.gateway_url.rstrip("/"),
                "shards": 1,
                "session_start_limit": {"total": 1000, "remaining": 999, "reset_after": 0, "max_concurrency": 1},
            }
        )

    async def _h_me(self, request: web.Request) -> web.Response:
        return _json_response(self._bot_user_full())

    async def _h_get_user(self, request: web.Request) -> web.Response:
        uid = int(request.match_info["uid"])
        if uid not in self.users:
            return _error(404, 10013, "Unknown User")
        return _json_response(self.user_payload(uid))

    async def _h_application(self, request: web.Request) -> web.Response:
        return _json_response(self._application_payload())

    async def _h_get_guild(self, request: web.Request) -> web.Response:
        if request.match_info["gid"] != _sid(self.guild_id):
            return _error(404, 10004, "Unknown Guild")
        g = self.guild_payload()
        for k in ("members", "channels", "threads", "presences", "voice_states", "stage_instances", "guild_scheduled_events", "soundboard_sounds", "joined_at", "large", "member_count", "unavailable"):
            g.pop(k, None)
        g["approximate_member_count"] = len(self.members)
        g["approximate_presence_count"] = 0
        return _json_response(g)

    async def _h_guild_channels(self, request: web.Request) -> web.Response:
        return _json_response([dict(c) for c in self.channels.values() if c["type"] != 1])

    async def _h_guild_roles(self, request: web.Request) -> web.Response:
        return _json_response([dict(r) for r in self.roles.values()])

    async def _h_guild_members(self, request: web.Request) -> web.Response:
        limit = int(request.query.get("limit", "1"))
        after = int(request.query.get("after", "0"))
        uids = sorted(u for u in self.members if u > after)[:limit]
        return _json_response([self.member_payload(u) for u in uids])

    async def _h_guild_member(self, request: web.Request) -> web.Response:
        uid = int(request.match_info["uid"])
        if uid not in self.members:
            return _error(404, 10007, "Unknown Member")
        return _json_response(self.member_payload(uid))

    async def _h_get_channel(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        return _json_response(dict(self.channels[cid]))

    async def _h_create_dm(self, request: web.Request) -> web.Response:
        body = await request.json()
        uid = int(body["recipient_id"])
        if uid not in self.users:
            return _error(400, 50033, "Invalid Recipient(s)")
        return _json_response(dict(self.channels[self.dm_channel_id(uid)]))

    async def _h_post_message(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        payload, files = await self._read_body(request)
        err = self._validate_message_body(payload, bool(files))
        if err:
            return err
        reply_to = None
        ref = payload.get("message_reference")
        if ref and ref.get("message_id"):
            reply_to = int(ref["message_id"])
            target = self._messages_by_id.get(reply_to)
            if target is None or int(target["channel_id"]) != cid:
                if ref.get("fail_if_not_exists", True):
                    return _error(
                        400,
                        50035,
                        "Invalid Form Body",
                        {"message_reference": {"_errors": [{"code": "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "message": "Unknown message"}]}},
                    )
                reply_to = None
        allowed = payload.get("allowed_mentions")
        reply_ping = True if allowed is None else bool(allowed.get("replied_user", False))
        msg = self._new_message(cid, BOT_ID, payload.get("content") or "", reply_to=reply_to, reply_ping=reply_ping)
        msg["embeds"] = payload.get("embeds") or []
        msg["components"] = payload.get("components") or []
        msg["tts"] = bool(payload.get("tts", False))
        msg["flags"] = int(payload.get("flags") or 0)
        msg["attachments"] = self._attachments(cid, files)
        if payload.get("nonce") is not None:
            msg["nonce"] = payload["nonce"]
        self._store_message(msg)
        self.bot_messages.append(msg)
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_CREATE", self._gateway_message(msg))
        return _json_response(msg)

    async def _h_history(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        q = request.query
        limit = max(1, min(100, int(q.get("limit", "50"))))
        msgs = sorted(self.messages.get(cid, []), key=lambda m: int(m["id"]))
        if "before" in q:
            msgs = [m for m in msgs if int(m["id"]) < int(q["before"])][-limit:]
        elif "after" in q:
            msgs = [m for m in msgs if int(m["id"]) > int(q["after"])][:limit]
        elif "around" in q:
            around = int(q["around"])
            older = [m for m in msgs if int(m["id"]) < around]
            newer = [m for m in msgs if int(m["id"]) >= around]
            half = limit // 2
            take_old = older[-half:] if half else []
            msgs = take_old + newer[: limit - len(take_old)]
        else:
            msgs = msgs[-limit:]
        return _json_response([self._message_view(m) for m in reversed(msgs)])  # newest first

    async def _h_get_message(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        return _json_response(self._message_view(msg))

    async def _h_edit_message(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        if int(msg["author"]["id"]) != BOT_ID:
            return _error(403, 50005, "Cannot edit a message authored by another user")
        payload, files = await self._read_body(request)
        if "content" in payload and payload["content"] is not None and len(payload["content"]) > 2000:
            return self._validate_message_body(payload, True)  # type: ignore[return-value]
        empty = {"content": "", "embeds": [], "components": [], "flags": 0}
        for k, default in empty.items():
            if k in payload:
                msg[k] = payload[k] if payload[k] is not None else default
        if files:
            msg["attachments"] = list(msg.get("attachments") or []) + self._attachments(cid, files)
        msg["edited_timestamp"] = _iso()
        self.message_edits.append({"channel_id": cid, "message_id": int(msg["id"]), "payload": payload})
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_UPDATE", self._gateway_message(self._message_view(msg)))
        return _json_response(self._message_view(msg))

    async def _h_delete_message(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        self._remove_message(msg)
        self.deleted_messages.append(msg)
        await self._dispatch_delete(msg)
        return _no_content()

    def _remove_message(self, msg: Dict[str, Any]) -> None:
        hist = self.messages.get(int(msg["channel_id"]), [])
        if msg in hist:
            hist.remove(msg)
        self._messages_by_id.pop(int(msg["id"]), None)

    async def _dispatch_delete(self, msg: Dict[str, Any]) -> None:
        d = {"id": msg["id"], "channel_id": msg["channel_id"]}
        if "guild_id" in msg:
            d["guild_id"] = msg["guild_id"]
        await self.dispatch("MESSAGE_DELETE", d)

    async def _h_add_own_reaction(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        emoji = request.match_info["emoji"]
        payload = self._parse_emoji(emoji)
        if payload["id"] is None and (not emoji or emoji.isascii()):
            return _error(400, 10014, "Unknown Emoji")
        self.reactions_by_bot.append(
            {"channel_id": cid, "message_id": int(msg["id"]), "emoji": emoji, "action": "add"}
        )
        await self._apply_reaction(cid, int(msg["id"]), BOT_ID, emoji, True)
        return _no_content()

    async def _h_remove_reaction(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        who = request.match_info["who"]
        emoji = request.match_info["emoji"]
        uid = BOT_ID if who == "@me" else int(who)
        if uid == BOT_ID:
            self.reactions_by_bot.append(
                {"channel_id": cid, "message_id": int(msg["id"]), "emoji": emoji, "action": "remove"}
            )
        await self._apply_reaction(cid, int(msg["id"]), uid, emoji, False)
        return _no_content()

    async def _h_reaction_users(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        key = self._emoji_key(self._parse_emoji(request.match_info["emoji"]))
        users = self._reactions.get(int(msg["id"]), {}).get(key, [])
        after = int(request.query.get("after", "0"))
        limit = int(request.query.get("limit", "25"))
        return _json_response([self.user_payload(u) for u in sorted(users) if u > after][:limit])

    async def _h_typing(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        self.typing_calls.append(cid)
        return _no_content()

    # ---- application commands

    def _scope(self, request: web.Request) -> Tuple[Optional[int], Optional[web.Response]]:
        if request.match_info["app"] != _sid(self.app_id):
            return None, _error(403, 50001, "Missing Access")
        gid = request.match_info.get("gid")
        if gid is not None and gid != _sid(self.guild_id):
            return None, _error(403, 50001, "Missing Access")
        return (int(gid) if gid is not None else None), None

    def _materialize_command(self, scope: Optional[int], body: Dict[str, Any]) -> Dict[str, Any]:
        ctype = int(body.get("type", 1))
        key = (scope, body["name"], ctype)
        cid = self._command_ids.setdefault(key, self.snowflake())
        cmd = dict(body)
        cmd.update(
            {
                "id": _sid(cid),
                "application_id": _sid(self.app_id),
                "version": _sid(self.snowflake()),
                "type": ctype,
                "description": body.get("description", ""),
                "default_member_permissions": body.get("default_member_permissions"),
                "nsfw": bool(body.get("nsfw", False)),
            }
        )
        if scope is not None:
            cmd["guild_id"] = _sid(scope)
        else:
            cmd.pop("guild_id", None)
            cmd.setdefault("contexts", None)
            cmd.setdefault("integration_types", [0])
        return cmd

    async def _h_put_commands(self, request: web.Request) -> web.Response:
        scope, err = self._scope(request)
        if err:
            return err
        body = await request.json()
        names = [(c["name"], int(c.get("type", 1))) for c in body]
        if len(set(names)) != len(names):
            return _error(400, 50035, "Invalid Form Body", {"_errors": [{"code": "APPLICATION_COMMANDS_DUPLICATE_NAME", "message": "duplicate"}]})
        cmds = [self._materialize_command(scope, c) for c in body]
        self.synced_commands[scope] = cmds
        self.sync_count += 1
        self._last_synced_scope = scope
        return _json_response(cmds)

    async def _h_get_commands(self, request: web.Request) -> web.Response:
        scope, err = self._scope(request)
        if err:
            return err
        return _json_response(self.synced_commands.get(scope, []))

    async def _h_post_command(self, request: web.Request) -> web.Response:
        scope, err = self._scope(request)
        if err:
            return err
        cmd = self._materialize_command(scope, await request.json())
        cmds = [c for c in self.synced_commands.get(scope, []) if not (c["name"] == cmd["name"] and c["type"] == cmd["type"])]
        cmds.append(cmd)
        self.synced_commands[scope] = cmds
        return _json_response(cmd, 201)

    def _find_command_by_id(self, scope: Optional[int], cmd_id: str) -> Optional[Dict[str, Any]]:
        return next((c for c in self.synced_commands.get(scope, []) if c["id"] == cmd_id), None)

    async def _h_get_command(self, request: web.Request) -> web.Response:
        scope, err = self._scope(request)
        if err:
            return err
        cmd = self._find_command_by_id(scope, request.match_info["cmd_id"])
        return _json_response(cmd) if cmd else _error(404, 10063, "Unknown application command")

    async def _h_patch_command(self, request: web.Request) -> web.Response:
        scope, err = self._scope(request)
        if err:
            return err
        cmd = self._find_command_by_id(scope, request.match_info["cmd_id"])
        if cmd is None:
            return _error(404, 10063, "Unknown application command")
        cmd.update(await request.json())
        return _json_response(cmd)

    async def _h_delete_command(self, request: web.Request) -> web.Response:
        scope, err = self._scope(request)
        if err:
            return err
        cmd = self._find_command_by_id(scope, request.match_info["cmd_id"])
        if cmd is None:
            return _error(404, 10063, "Unknown application command")
        self.synced_commands[scope].remove(cmd)
        return _no_content()

    # ---- interactions

    def _interaction_message(self, record: InteractionRecord, data: Dict[str, Any], files: List[Tuple[str, str, bytes]], *, followup: bool) -> Dict[str, Any]:
        cid = record.channel_id
        content = data.get("content") or ""
        mentions, roles = self._mentions_from_content(content)
        mid = self.snowflake()
        msg: Dict[str, Any] = {
            "id": _sid(mid),
            "channel_id": _sid(cid),
            "author": self.user_payload(BOT_ID),
            "content": content,
            "timestamp": _iso(),
            "edited_timestamp": None,
            "tts": bool(data.get("tts", False)),
            "mention_everyone": False,
            "mentions": mentions,
            "mention_roles": roles,
            "attachments": self._attachments(cid, files),
            "embeds": data.get("embeds") or [],
            "components": data.get("components") or [],
            "reactions": [],
            "pinned": False,
            "type": 20,
            "flags": int(data.get("flags") or 0),
            "application_id": _sid(self.app_id),
            "webhook_id": _sid(self.app_id),
            "interaction_metadata": {
                "id": _sid(record.id),
                "type": 2,
                "user": self.user_payload(record.user_id),
                "authorizing_integration_owners": record.payload.get("authorizing_integration_owners", {}),
                "name": record.name,
                "command_type": 1,
                **({"original_response_message_id": record.original["id"]} if followup and record.original else {}),
            },
        }
        if record.guild_id is not None:
            msg["guild_id"] = _sid(record.guild_id)
        return msg

    async def _publish_interaction_message(self, msg: Dict[str, Any]) -> None:
        """Non-ephemeral interaction messages are real channel messages."""
        if int(msg.get("flags") or 0) & FLAG_EPHEMERAL:
            return
        self._store_message(msg)
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_CREATE", self._gateway_message(msg))

    async def _h_interaction_callback(self, request: web.Request) -> web.Response:
        try:
            iid = int(request.match_info["iid"])
        except ValueError:
            return _error(404, 10062, "Unknown interaction")
        record = self._interactions_by_id.get(iid)
        if record is None or record.token != request.match_info["token"]:
            return _error(404, 10062, "Unknown interaction")
        body, files = await self._read_body(request)
        cb_type = int(body.get("type", 0))
        data = body.get("data") or {}
        if record.response is not None:
            record.extra_callbacks.append(body)
            return _error(400, 40060, "Interaction has already been acknowledged.")
        if cb_type == CB_CHANNEL_MESSAGE:
            err = self._validate_message_body(data, bool(files))
            if err:
                return err
        record.response = body
        interaction_info: Dict[str, Any] = {"id": _sid(iid), "type": 2}
        resource: Optional[Dict[str, Any]] = None
        if cb_type in (CB_CHANNEL_MESSAGE, CB_DEFERRED_CHANNEL_MESSAGE):
            mdata = dict(data)
            if cb_type == CB_DEFERRED_CHANNEL_MESSAGE:
                mdata = {"content": "", "flags": int(data.get("flags") or 0) | FLAG_LOADING}
            msg = self._interaction_message(record, mdata, files, followup=False)
            record.original = msg
            interaction_info.update(
                {
                    "response_message_id": msg["id"],
                    "response_message_loading": cb_type == CB_DEFERRED_CHANNEL_MESSAGE,
                    "response_message_ephemeral": bool(msg["flags"] & FLAG_EPHEMERAL),
                }
            )
            resource = {"type": cb_type, "message": msg}
            await self._publish_interaction_message(msg)
        elif cb_type in (CB_DEFERRED_UPDATE_MESSAGE, CB_UPDATE_MESSAGE, CB_AUTOCOMPLETE_RESULT, CB_MODAL, CB_PONG):
            resource = {"type": cb_type}
        else:
            record.response = None
            return _error(400, 50035, f"Invalid Form Body (callback type {cb_type})")
        return _json_response({"interaction": interaction_info, "resource": resource})

    def _record_for_webhook(self, request: web.Request) -> Tuple[Optional[InteractionRecord], Optional[web.Response]]:
        record = self._interactions_by_token.get(request.match_info["token"])
        if record is None or request.match_info["app"] != _sid(self.app_id):
            return None, _error(404, 10015, "Unknown Webhook")
        if record.response is None:  # Discord: token not usable before acknowledgement
            return None, _error(404, 10015, "Unknown Webhook")
        return record, None

    async def _h_followup(self, request: web.Request) -> web.Response:
        record, err = self._record_for_webhook(request)
        if err:
            return err
        payload, files = await self._read_body(request)
        err = self._validate_message_body(payload, bool(files))
        if err:
            return err
        assert record is not None
        if record.original is not None and int(record.original.get("flags") or 0) & FLAG_LOADING:
            # Discord: the first followup after a deferred response *replaces* the
            # loading message (it becomes the original).
            msg = record.original
            msg.update(
                {
                    "content": payload.get("content") or "",
                    "embeds": payload.get("embeds") or [],
                    "components": payload.get("components") or [],
                    # ephemerality was fixed by the defer; the followup's flag is ignored
                    "flags": int(msg["flags"]) & ~FLAG_LOADING,
                    "attachments": self._attachments(record.channel_id, files),
                    "edited_timestamp": _iso(),
                }
            )
            record.followups.append(msg)
            if not msg["flags"] & FLAG_EPHEMERAL and self.echo_bot_messages:
                await self.dispatch("MESSAGE_UPDATE", self._gateway_message(msg))
        else:
            msg = self._interaction_message(record, payload, files, followup=True)
            record.followups.append(msg)
            await self._publish_interaction_message(msg)
        if request.query.get("wait") in ("1", "true", "True"):
            return _json_response(msg)
        return _no_content()

    def _webhook_target(self, record: InteractionRecord, mid: str) -> Optional[Dict[str, Any]]:
        if mid == "@original" or (record.original is not None and mid == record.original["id"]):
            return None if record.original_deleted else record.original
        return next((m for m in record.followups if m["id"] == mid), None)

    async def _h_webhook_get(self, request: web.Request) -> web.Response:
        record, err = self._record_for_webhook(request)
        if err:
            return err
        msg = self._webhook_target(record, request.match_info["mid"])  # type: ignore[arg-type]
        return _json_response(msg) if msg else _error(404, 10008, "Unknown Message")

    async def _h_webhook_edit(self, request: web.Request) -> web.Response:
        record, err = self._record_for_webhook(request)
        if err:
            return err
        assert record is not None
        msg = self._webhook_target(record, request.match_info["mid"])
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        payload, files = await self._read_body(request)
        if payload.get("content") is not None and len(payload["content"]) > 2000:
            return self._validate_message_body(payload, True)  # type: ignore[return-value]
        for k in ("content", "embeds", "components"):
            if k in payload:
                msg[k] = payload[k] if payload[k] is not None else ("" if k == "content" else [])
        if files:
            msg["attachments"] = list(msg.get("attachments") or []) + self._attachments(record.channel_id, files)
        msg["flags"] = int(msg.get("flags") or 0) & ~FLAG_LOADING
        msg["edited_timestamp"] = _iso()
        if msg is record.original:
            record.original_edits.append(payload)
        if not msg["flags"] & FLAG_EPHEMERAL and self.echo_bot_messages:
            await self.dispatch("MESSAGE_UPDATE", self._gateway_message(msg))
        return _json_response(msg)

    async def _h_webhook_delete(self, request: web.Request) -> web.Response:
        record, err = self._record_for_webhook(request)
        if err:
            return err
        assert record is not None
        msg = self._webhook_target(record, request.match_info["mid"])
        if msg is None:
            return _error(404, 10008, "Unknown Message")
        if msg is record.original:
            record.original_deleted = True
        else:
            record.followups.remove(msg)
        if not int(msg.get("flags") or 0) & FLAG_EPHEMERAL:
            self._remove_message(msg)
            await self._dispatch_delete(msg)
        return _no_content()

    async def _h_attachment(self, request: web.Request) -> web.Response:
        data = self.attachment_data.get(int(request.match_info["aid"]))
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, headers={"Content-Type": "application/octet-stream"})
