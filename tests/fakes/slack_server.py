"""A loopback fake of Slack (Web API + Socket Mode WebSocket) for tests.

The fake runs an aiohttp server on ``127.0.0.1`` (random port) that speaks
just enough of Slack's Web API and Socket Mode protocol for the real
``slack_bolt.async_app.AsyncApp`` + ``AsyncSocketModeHandler`` (slack_sdk's
aiohttp Socket Mode client) to run against it unchanged::

    async with FakeSlack() as fake:
        client = AsyncWebClient(token=fake.bot_token, base_url=fake.api_url)
        app = AsyncApp(client=client)
        ...register listeners...
        handler = AsyncSocketModeHandler(app, app_token=fake.app_token)
        await handler.connect_async()
        await fake.wait_connected()
        ts = await fake.user_message("C1", "U1", "hi", mention_bot=True)
        reply = await fake.wait_bot_message("C1", thread_ts=ts)
        await handler.close_async()

Modelled workspace (see :class:`FakeSlack` constants):

* team ``T1``; the bot is user ``UBOT`` / bot ``BBOT`` (token ``xoxb-fake-bot``,
  app token ``xapp-fake-app``);
* humans ``U1`` (alice), ``U2`` (bob), ``UADMIN`` (admin, ``is_admin``);
* channels ``C1`` (general), ``C2`` (random) and the DM ``D1`` (with U1).

HTTP routes:

* ``/api/<method>`` -- Web API (args from query string, form body or JSON);
* ``/link`` -- the Socket Mode WebSocket (URL handed out by
  ``apps.connections.open``);
* ``/respond/<envelope_id>`` -- ``response_url`` of slash commands
  (records what ``respond()`` posts);
* ``/upload/v1/<key>`` -- the ``upload_url`` that ``files.getUploadURLExternal`` hands
  out (step 2 of an upload: the file's bytes, raw or multipart, no token: the URL is the
  credential, as on files.slack.com).

Files (``files_upload_v2``): ``files.getUploadURLExternal`` (filename, length) → a file id
and an upload URL on the fake's own port; the POST to it stores the bytes; and
``files.completeUploadExternal`` (``files`` JSON, ``channel_id`` or ``channels``) shares each
file into the channel, which stores a ``file_share`` message there (echoed as an event, like
a posted message) and appends to ``shared_files``. Without a channel the file stays private
(shared nowhere), as on Slack. ``conversations.open`` (``users`` = one user id) opens or
resumes the DM with that user.

Scopes: the token's scopes are ``scopes`` (default :attr:`FakeSlack.SCOPES`, what
deploy/slack-manifest.yaml asks for); a method in :attr:`FakeSlack.REQUIRED_SCOPES` called
without its scope answers ``missing_scope`` with ``needed`` and ``provided``, as Slack does.

Everything recorded is plain dicts in lists on the instance
(``calls``, ``bot_messages``, ``bot_edits``, ``bot_reactions``, ``ephemerals``,
``envelopes``, ``messages``, ``files``, ``shared_files``) so tests can also assert on them directly.

``chat.update`` edits one of the bot's messages in place (its stored message and its
``bot_messages`` record); :meth:`FakeSlack.text_history` keeps what a message said, posted
then after each update, and a ``message_changed`` event is pushed as Slack does.
:meth:`FakeSlack.fail` makes a method answer ``{"ok": false, "error": ...}``.
:meth:`FakeSlack.redeliver` delivers an Events API envelope again as Slack's retry does (a new
envelope, the same ``event_id``, ``retry_attempt`` 1 and ``retry_reason`` "timeout"), and
:meth:`FakeSlack.push_event` takes any inner event, malformed ones included.
``reactions.get`` answers the stored message with its ``reactions`` (the user lists cut to
:attr:`FakeSlack.REACTION_USERS_SHOWN` unless ``full``); :meth:`FakeSlack.react` with
``silent=True`` changes a reaction without pushing an event (while the app was not connected),
and :meth:`FakeSlack.send_disconnect` makes the app reconnect (a new ``hello``).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from aiohttp import WSMsgType, web

logger = logging.getLogger(__name__)

__all__ = ["FakeSlack", "FakeSlackTimeout", "ApiCall", "Envelope"]


class FakeSlackTimeout(AssertionError):
    """Raised by the ``wait_*`` helpers when the awaited thing did not happen in time."""


@dataclass
class ApiCall:
    """One Web API request received by the fake (also the 429-answered ones)."""

    method: str
    args: Dict[str, Any]
    token: Optional[str]
    status: int = 200
    response: Optional[Dict[str, Any]] = None
    at: float = field(default_factory=time.monotonic)

    @property
    def ok(self) -> bool:
        return bool(self.response and self.response.get("ok"))


@dataclass
class Envelope:
    """A Socket Mode envelope pushed to the app, plus what came back for it.

    ``ack`` is the ack's ``payload`` (``{}`` for a bare ack) once ``acked`` is
    True.  For slash commands ``responses`` collects the JSON bodies that
    ``respond()`` POSTed to this envelope's ``response_url``.
    """

    envelope_id: str
    type: str
    payload: Dict[str, Any]
    accepts_response_payload: bool = False
    acked: bool = False
    ack: Optional[Dict[str, Any]] = None
    ack_count: int = 0
    responses: List[Dict[str, Any]] = field(default_factory=list)
    sent_at: float = field(default_factory=time.monotonic)
    retry_attempt: int = 0
    retry_reason: str = ""

    @property
    def event(self) -> Optional[Dict[str, Any]]:
        """The inner ``event`` of an ``events_api`` envelope (else None)."""
        return self.payload.get("event") if self.type == "events_api" else None

    @property
    def ack_text(self) -> Optional[str]:
        """``text`` of the ack payload (what ``ack("...")`` sent), if any."""
        return (self.ack or {}).get("text")

    def to_wire(self) -> Dict[str, Any]:
        return {
            "envelope_id": self.envelope_id,
            "type": self.type,
            "payload": self.payload,
            "accepts_response_payload": self.accepts_response_payload,
            **({"retry_attempt": self.retry_attempt, "retry_reason": self.retry_reason}
               if self.type == "events_api" else {}),
        }


def _channel_type_for(channel: str) -> str:
    if channel.startswith("D"):
        return "im"
    if channel.startswith("G"):
        return "group"
    return "channel"


class FakeSlack:
    """Loopback fake Slack workspace: Web API over HTTP + Socket Mode over WebSocket.

    Use as ``async with FakeSlack() as fake:`` (or ``await start()`` /
    ``await stop()``).  All methods must be called from the event loop that
    started it.
    """

    TEAM_ID = "T1"
    TEAM_NAME = "Fake Team"
    APP_ID = "A1"
    BOT_USER_ID = "UBOT"
    BOT_ID = "BBOT"
    BOT_NAME = "reactbot"
    BOT_TOKEN = "xoxb-fake-bot"
    APP_TOKEN = "xapp-fake-app"
    VERIFICATION_TOKEN = "fake-verification-token"
    SCOPES = ("app_mentions:read,channels:history,chat:write,commands,files:write,groups:history,im:history,"
              "im:write,mpim:history,reactions:read,reactions:write,users:read")
    #: the scope each checked method needs (conversations.history/.replies: by the channel's type)
    REQUIRED_SCOPES = {
        "chat.postMessage": "chat:write", "chat.update": "chat:write", "chat.postEphemeral": "chat:write",
        "reactions.add": "reactions:write", "reactions.remove": "reactions:write", "users.info": "users:read",
        "reactions.get": "reactions:read",
        "files.getUploadURLExternal": "files:write", "files.completeUploadExternal": "files:write",
        "conversations.open": "im:write",
    }
    _HISTORY_SCOPES = {"im": "im:history", "group": "groups:history", "channel": "channels:history"}
    #: users listed per reaction by reactions.get without ``full`` (Slack cuts the list too)
    REACTION_USERS_SHOWN = 2

    def __init__(self, *, echo_bot_messages: bool = True, check_tokens: bool = True, ts_base: int = 1700000000,
                 scopes: Optional[str] = None):
        """
        Args:
            echo_bot_messages: like real Slack, push a ``message`` event for every
                message the bot posts via chat.postMessage (bolt drops these as
                self events; they are acked with an empty payload).
            check_tokens: answer ``not_authed`` / ``invalid_auth`` for requests
                without / with a wrong token (``xoxb-`` token for the Web API,
                ``xapp-`` token for apps.connections.open).
            ts_base: seconds part of the first message ts.
            scopes: the bot token's scopes, comma-separated (default :attr:`SCOPES`); a method
                of :attr:`REQUIRED_SCOPES` without its scope answers ``missing_scope``.
        """
        self.scopes = self.SCOPES if scopes is None else scopes
        self.echo_bot_messages = echo_bot_messages
        self.check_tokens = check_tokens
        self._ts_base = ts_base
        self._ts_counter = itertools.count(1)
        self._event_counter = itertools.count(1)

        self.users: Dict[str, Dict[str, Any]] = {}
        self.channels: Dict[str, Dict[str, Any]] = {}
        self.add_user(self.BOT_USER_ID, self.BOT_NAME, is_bot=True)
        self.add_user("U1", "alice")
        self.add_user("U2", "bob")
        self.add_user("UADMIN", "admin", is_admin=True)
        self.add_channel("C1", "general")
        self.add_channel("C2", "random")
        self.add_channel("D1", is_im=True, user="U1")

        #: every stored message per channel, in ts order (user + bot messages)
        self.messages: Dict[str, List[Dict[str, Any]]] = {}
        #: every Web API request, in arrival order
        self.calls: List[ApiCall] = []
        #: API method names that the fake does not know
        self.unknown_calls: List[ApiCall] = []
        #: messages posted by the bot via chat.postMessage (copies with "channel"; chat.update keeps them current)
        self.bot_messages: List[Dict[str, Any]] = []
        #: successful chat.update calls: {"channel","ts","text","at"} (at: time.monotonic())
        self.bot_edits: List[Dict[str, Any]] = []
        #: reactions the bot added: {"channel","ts","name","removed": bool}
        self.bot_reactions: List[Dict[str, Any]] = []
        #: chat.postEphemeral calls: {"channel","user","text",...}
        self.ephemerals: List[Dict[str, Any]] = []
        #: files by id, from files.getUploadURLExternal on: {"id","filename","title","length","alt_txt",
        #: "data" (bytes once uploaded, else None),"completed","channels"}
        self.files: Dict[str, Dict[str, Any]] = {}
        #: each share of a file into a channel by files.completeUploadExternal, in order:
        #: {"file_id","channel","filename","title","thread_ts","initial_comment","data","ts"}
        self.shared_files: List[Dict[str, Any]] = []
        #: every envelope pushed over the socket, in order
        self.envelopes: List[Envelope] = []
        #: acks whose envelope_id matched nothing (or malformed frames)
        self.unmatched_acks: List[Any] = []

        self._envelopes_by_id: Dict[str, Envelope] = {}
        self._rate_limits: Dict[str, List[int]] = {}  # method -> [remaining, retry_after]
        self._failures: Dict[str, List[Any]] = {}  # method -> [remaining (None: always), error]
        self._text_history: Dict[tuple, List[str]] = {}  # (channel, ts) -> texts, oldest first
        self._upload_keys: Dict[str, str] = {}  # upload URL key -> file id
        self._upload_failures: List[Any] = []  # [remaining (None: always), HTTP status] once fail_uploads()
        self._file_counter = itertools.count(1)
        self._consumed_bot_messages: set = set()
        self._ws: Optional[web.WebSocketResponse] = None
        self._all_ws: List[web.WebSocketResponse] = []
        self.connection_count = 0
        self._cond: Optional[asyncio.Condition] = None
        self._runner: Optional[web.AppRunner] = None
        self._send_lock: Optional[asyncio.Lock] = None
        self.port: int = 0

    # ------------------------------------------------------------------
    # lifecycle

    async def start(self) -> "FakeSlack":
        """Start the aiohttp server on 127.0.0.1 with a free port."""
        self._cond = asyncio.Condition()
        self._send_lock = asyncio.Lock()
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._handle_api)
        app.router.add_get("/link", self._handle_ws)
        app.router.add_post("/respond/{envelope_id}", self._handle_respond)
        app.router.add_post("/upload/v1/{key}", self._handle_upload)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        """Close any open WebSocket and stop the server.

        Close the bolt handler (``await handler.close_async()``) *before* this,
        otherwise its auto-reconnect loop keeps trying to reach the dead fake.
        """
        for ws in list(self._all_ws):
            if not ws.closed:
                try:
                    await ws.close(code=1001, message=b"fake slack stopping")
                except Exception:  # pragma: no cover - best effort
                    pass
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "FakeSlack":
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ------------------------------------------------------------------
    # addresses / identities

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        """Web API base URL for ``AsyncWebClient(base_url=...)``: ``http://127.0.0.1:PORT/api/``"""
        return f"{self.base_url}/api/"

    @property
    def ws_url(self) -> str:
        """Socket Mode URL returned by apps.connections.open: ``ws://127.0.0.1:PORT/link``"""
        return f"ws://127.0.0.1:{self.port}/link"

    @property
    def bot_token(self) -> str:
        return self.BOT_TOKEN

    @property
    def app_token(self) -> str:
        return self.APP_TOKEN

    @property
    def bot_user_id(self) -> str:
        return self.BOT_USER_ID

    @property
    def bot_id(self) -> str:
        return self.BOT_ID

    def make_client(self, **kwargs: Any):
        """An ``AsyncWebClient`` with the bot token pointed at the fake (kwargs pass through)."""
        from slack_sdk.web.async_client import AsyncWebClient

        kwargs.setdefault("token", self.BOT_TOKEN)
        return AsyncWebClient(base_url=self.api_url, **kwargs)

    def add_user(self, user_id: str, name: str, *, is_admin: bool = False, is_owner: bool = False, is_bot: bool = False) -> None:
        """Add (or replace) a workspace member answered by users.info."""
        self.users[user_id] = {
            "id": user_id,
            "team_id": self.TEAM_ID,
            "name": name,
            "real_name": name.title(),
            "deleted": False,
            "is_admin": is_admin,
            "is_owner": is_owner,
            "is_primary_owner": False,
            "is_bot": is_bot,
            "is_app_user": False,
            "profile": {"display_name": name, "real_name": name.title()},
        }

    def add_channel(self, channel_id: str, name: Optional[str] = None, *, is_im: bool = False, user: Optional[str] = None, is_private: bool = False) -> None:
        """Add a conversation. ``is_im`` with ``user`` models a DM with that user."""
        info: Dict[str, Any] = {"id": channel_id, "created": self._ts_base}
        if is_im:
            info.update({"is_im": True, "is_channel": False, "is_private": True, "user": user})
        else:
            info.update(
                {
                    "name": name or channel_id.lower(),
                    "is_channel": not is_private,
                    "is_group": is_private,
                    "is_im": False,
                    "is_private": is_private,
                    "is_member": True,
                }
            )
        self.channels[channel_id] = info

    # ------------------------------------------------------------------
    # knobs

    def rate_limit(self, method: str, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls of ``method`` with HTTP 429,
        ``Retry-After: <retry_after>`` and ``{"ok": false, "error": "ratelimited"}``.

        Note slack_sdk's ``AsyncRateLimitErrorRetryHandler`` defaults to
        ``max_retry_count=1`` and sleeps ``Retry-After + random()`` seconds.
        """
        self._rate_limits[method] = [times, retry_after]

    def fail(self, method: str, error: str = "internal_error", times: Optional[int] = None) -> None:
        """Answer the next ``times`` calls of ``method`` (None: every one, until
        :meth:`clear_failures`) with HTTP 200 and ``{"ok": false, "error": error}``."""
        self._failures[method] = [times, error]

    def clear_failures(self) -> None:
        self._failures.clear()
        self._upload_failures = []

    def fail_uploads(self, status: int = 500, times: Optional[int] = None) -> None:
        """Answer the next ``times`` POSTs to an upload URL (None: every one, until
        :meth:`clear_failures`) with HTTP ``status`` and a text/plain body; nothing is stored."""
        self._upload_failures = [times, status]

    # ------------------------------------------------------------------
    # inspection helpers

    def text_history(self, channel: str, ts: str) -> List[str]:
        """A message's text as posted, then after each chat.update, oldest first."""
        msg = self.get_message(channel, ts)
        return list(self._text_history.get((channel, ts), [msg["text"]] if msg else []))

    def edits_of(self, channel: str, ts: str) -> List[Dict[str, Any]]:
        """The successful chat.update calls on one message, oldest first."""
        return [e for e in self.bot_edits if e["channel"] == channel and e["ts"] == ts]

    def calls_to(self, method: str) -> List[ApiCall]:
        """All recorded calls of one Web API method (including 429-answered ones)."""
        return [c for c in self.calls if c.method == method]

    def files_shared_to(self, channel: str) -> List[Dict[str, Any]]:
        """The :attr:`shared_files` records of one channel, oldest first."""
        return [f for f in self.shared_files if f["channel"] == channel]

    def dm_with(self, user: str) -> str:
        """The id of the bot's DM with ``user``, opened (``D<user>``) when there is none yet."""
        for cid, info in self.channels.items():
            if info.get("is_im") and info.get("user") == user:
                return cid
        dm = f"D{user}"
        self.add_channel(dm, is_im=True, user=user)
        return dm

    def get_message(self, channel: str, ts: str) -> Optional[Dict[str, Any]]:
        """The stored message (live dict, not a copy) or None."""
        for m in self.messages.get(channel, []):
            if m["ts"] == ts:
                return m
        return None

    def thread(self, channel: str, thread_ts: str) -> List[Dict[str, Any]]:
        """Parent + replies of a thread (copies), oldest first."""
        return [copy.deepcopy(m) for m in self.messages.get(channel, []) if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts]

    @property
    def connected(self) -> bool:
        """True while a Socket Mode WebSocket is open."""
        return self._ws is not None and not self._ws.closed

    # ------------------------------------------------------------------
    # waiting

    async def _notify(self) -> None:
        assert self._cond is not None, "FakeSlack not started"
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 10, what: str = "condition") -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every state change); return its value.

        Raises :class:`FakeSlackTimeout` (an AssertionError) after ``timeout`` seconds.
        """
        assert self._cond is not None, "FakeSlack not started"
        cond = self._cond

        async def _wait() -> Any:
            async with cond:
                return await cond.wait_for(predicate)

        try:
            return await asyncio.wait_for(_wait(), timeout)
        except asyncio.TimeoutError:
            recent = [f"{c.method}->{c.status}" for c in self.calls[-10:]]
            raise FakeSlackTimeout(f"timed out after {timeout}s waiting for {what}; recent API calls: {recent}") from None

    async def wait_connected(self, timeout: float = 10, *, count: int = 1) -> None:
        """Wait until a Socket Mode connection is open and at least ``count``
        connections have been made in total (use ``count`` to await a reconnect)."""
        await self.wait_for(
            lambda: self.connected and self.connection_count >= count,
            timeout,
            f"socket mode connection #{count}",
        )

    async def wait_bot_message(
        self,
        channel: Optional[str] = None,
        timeout: float = 10,
        thread_ts: Optional[str] = None,
        *,
        predicate: Optional[Callable[[Dict[str, Any]], bool]] = None,
    ) -> Dict[str, Any]:
        """Wait for a bot message (chat.postMessage) not yet returned by an earlier
        ``wait_bot_message`` call, in ``channel`` (any if None) and, if given,
        in thread ``thread_ts``; returns a copy including ``"channel"``.

        Each message is handed out once, so successive calls return successive
        replies.  ``fake.bot_messages`` keeps them all regardless.
        """

        def find() -> Optional[Dict[str, Any]]:
            for m in self.bot_messages:
                if m["ts"] in self._consumed_bot_messages:
                    continue
                if channel is not None and m["channel"] != channel:
                    continue
                if thread_ts is not None and m.get("thread_ts") != thread_ts:
                    continue
                if predicate is not None and not predicate(m):
                    continue
                return m
            return None

        m = await self.wait_for(find, timeout, f"bot message in {channel or 'any channel'} thread_ts={thread_ts}")
        self._consumed_bot_messages.add(m["ts"])
        return copy.deepcopy(m)

    async def wait_bot_reaction(self, channel: str, ts: str, name: Optional[str] = None, timeout: float = 10) -> Dict[str, Any]:
        """Wait until the bot added a reaction (``name`` or any) to message ``ts``."""

        def find() -> Optional[Dict[str, Any]]:
            for r in self.bot_reactions:
                if r["channel"] == channel and r["ts"] == ts and (name is None or r["name"] == name) and not r["removed"]:
                    return r
            return None

        return await self.wait_for(find, timeout, f"bot reaction {name or '*'} on {channel}/{ts}")

    async def wait_call(self, method: str, timeout: float = 10, *, predicate: Optional[Callable[[ApiCall], bool]] = None) -> ApiCall:
        """Wait for a (successful or not) Web API call of ``method``; returns the first match."""

        def find() -> Optional[ApiCall]:
            for c in self.calls:
                if c.method == method and (predicate is None or predicate(c)):
                    return c
            return None

        return await self.wait_for(find, timeout, f"API call {method}")

    async def wait_ack(self, record: Envelope, timeout: float = 10) -> Dict[str, Any]:
        """Wait until the app acked ``record``; returns the ack payload (``{}`` when bare)."""
        await self.wait_for(lambda: record.acked, timeout, f"ack of envelope {record.envelope_id} ({record.type})")
        return record.ack or {}

    async def wait_response(self, record: Envelope, timeout: float = 10, *, index: int = 0) -> Dict[str, Any]:
        """Wait for the ``index``-th body that ``respond()`` POSTed to ``record``'s response_url."""
        await self.wait_for(lambda: len(record.responses) > index, timeout, f"respond() #{index} for {record.envelope_id}")
        return record.responses[index]

    async def wait_shared_file(self, channel: Optional[str] = None, timeout: float = 10, *, index: int = 0) -> Dict[str, Any]:
        """Wait for the ``index``-th file shared (files.completeUploadExternal) into ``channel``
        (any if None); returns its :attr:`shared_files` record."""

        def find() -> Optional[Dict[str, Any]]:
            shared = [f for f in self.shared_files if channel is None or f["channel"] == channel]
            return shared[index] if len(shared) > index else None

        return await self.wait_for(find, timeout, f"file #{index} shared to {channel or 'any channel'}")

    # ------------------------------------------------------------------
    # simulated workspace activity (pushes envelopes to the app)

    def _next_ts(self) -> str:
        n = next(self._ts_counter)
        return f"{self._ts_base + n // 10000}.{(n % 10000) * 100:06d}"

    def next_ts(self) -> str:
        """A fresh message ts, later than every one so far (for events a test pushes itself)."""
        return self._next_ts()

    def _store_message(self, channel: str, msg: Dict[str, Any]) -> None:
        self.messages.setdefault(channel, []).append(msg)
        thread_ts = msg.get("thread_ts")
        if thread_ts and thread_ts != msg["ts"]:
            parent = self.get_message(channel, thread_ts)
            if parent is not None:
                parent["thread_ts"] = thread_ts
                parent["reply_count"] = parent.get("reply_count", 0) + 1
                parent["latest_reply"] = msg["ts"]
                author = msg.get("user") or msg.get("bot_id")
                users = parent.setdefault("reply_users", [])
                if author and author not in users:
                    users.append(author)
                parent["reply_users_count"] = len(users)
                msg.setdefault("parent_user_id", parent.get("user"))

    def _event_payload(self, event: Dict[str, Any]) -> Dict[str, Any]:
        n = next(self._event_counter)
        return {
            "token": self.VERIFICATION_TOKEN,
            "team_id": self.TEAM_ID,
            "context_team_id": self.TEAM_ID,
            "api_app_id": self.APP_ID,
            "event": event,
            "type": "event_callback",
            "event_id": f"Ev{n:08d}",
            "event_time": int(time.time()),
            "authorizations": [
                {
                    "enterprise_id": None,
                    "team_id": self.TEAM_ID,
                    "user_id": self.BOT_USER_ID,
                    "is_bot": True,
                    "is_enterprise_install": False,
                }
            ],
            "is_ext_shared_channel": False,
        }

    async def send_envelope(
        self,
        type: str,
        payload: Dict[str, Any],
        *,
        accepts_response_payload: bool = False,
        envelope_id: Optional[str] = None,
        timeout: float = 10,
        retry_attempt: int = 0,
        retry_reason: str = "",
    ) -> Envelope:
        """Push a raw envelope of ``type`` ("events_api", "slash_commands",
        "interactive", ...) and return its record (waits up to ``timeout`` for a
        connection). ``retry_attempt`` / ``retry_reason`` go on ``events_api``
        envelopes (0 and "" for a first delivery)."""
        await self.wait_connected(timeout)
        env = Envelope(envelope_id=envelope_id or str(uuid.uuid4()), type=type, payload=payload,
                       accepts_response_payload=accepts_response_payload,
                       retry_attempt=retry_attempt, retry_reason=retry_reason)
        self.envelopes.append(env)
        self._envelopes_by_id[env.envelope_id] = env
        assert self._send_lock is not None and self._ws is not None
        async with self._send_lock:
            await self._ws.send_str(json.dumps(env.to_wire()))
        await self._notify()
        return env

    async def push_event(self, event: Any, *, timeout: float = 10) -> Envelope:
        """Push an ``events_api`` envelope wrapping ``event`` (the inner event dict; any JSON
        value, to test what the app makes of a malformed one)."""
        return await self.send_envelope("events_api", self._event_payload(event), timeout=timeout)

    async def redeliver(self, record: Envelope, *, retry_attempt: int = 1, retry_reason: str = "timeout",
                        timeout: float = 10) -> Envelope:
        """Deliver an ``events_api`` envelope again, as Slack does when the app did not
        acknowledge it in time: a new envelope (new ``envelope_id``) with the same payload
        (same ``event_id``), ``retry_attempt`` (1, 2, 3 in real Slack) and ``retry_reason``
        ("timeout", "http_error", ...). Returns the new record."""
        assert record.type == "events_api", "Slack retries only Events API envelopes"
        return await self.send_envelope("events_api", copy.deepcopy(record.payload), timeout=timeout,
                                        retry_attempt=retry_attempt, retry_reason=retry_reason)

    def envelopes_for(self, predicate: Callable[[Dict[str, Any]], bool]) -> List[Envelope]:
        """The ``events_api`` envelopes whose inner event matches ``predicate``, oldest first."""
        return [e for e in self.envelopes if isinstance(e.event, dict) and predicate(e.event)]

    async def user_message(
        self,
        channel: str,
        user: str,
        text: str,
        *,
        thread_ts: Optional[str] = None,
        mention_bot: bool = False,
        bot: bool = False,
        channel_type: Optional[str] = None,
    ) -> str:
        """Simulate someone posting ``text`` in ``channel``; returns the new message ts.

        The message is stored (so conversations.history / .replies see it) and a
        ``message`` event is pushed.  ``mention_bot`` prefixes ``<@UBOT>`` (unless
        already in the text) and additionally pushes an ``app_mention`` event
        first -- except in DMs (``channel_type == "im"``), where, as in real
        Slack, only the ``message`` event is sent.  The two envelopes are
        separate, and slack_sdk dispatches envelopes concurrently, so listeners
        may see them in either order.  ``bot=True`` makes it another
        bot's message: ``subtype: "bot_message"`` and ``bot_id`` ("B"+user).
        ``channel_type`` defaults from the id: D→"im", G→"group", else "channel".
        """
        channel_type = channel_type or _channel_type_for(channel)
        if mention_bot and f"<@{self.BOT_USER_ID}>" not in text:
            text = f"<@{self.BOT_USER_ID}> {text}"
        ts = self._next_ts()
        msg: Dict[str, Any] = {"type": "message", "user": user, "text": text, "ts": ts, "team": self.TEAM_ID}
        if bot:
            msg.update({"subtype": "bot_message", "bot_id": user if user.startswith("B") else f"B{user}", "username": user.lower()})
        else:
            msg["client_msg_id"] = str(uuid.uuid4())
        if thread_ts:
            msg["thread_ts"] = thread_ts
        self._store_message(channel, msg)
        await self._notify()

        base = {k: v for k, v in msg.items() if k not in ("reply_count", "reply_users", "reply_users_count", "latest_reply")}
        if mention_bot and channel_type != "im":
            mention = {**copy.deepcopy(base), "type": "app_mention", "channel": channel, "event_ts": ts}
            await self.push_event(mention)
        event = {**copy.deepcopy(base), "channel": channel, "event_ts": ts, "channel_type": channel_type}
        await self.push_event(event)
        return ts

    async def react(self, channel: str, ts: str, user: str, reaction: str, add: bool = True, *,
                    item_user: Optional[str] = None, silent: bool = False) -> Optional[Envelope]:
        """Simulate ``user`` adding (or removing) ``:reaction:`` on message ``ts``.

        Pushes ``reaction_added`` / ``reaction_removed`` with
        ``item={"type":"message","channel","ts"}`` and ``item_user`` (the stored
        message's author unless given), updating the stored message's
        ``reactions``.  Returns the envelope record.  ``silent``: only the stored
        ``reactions`` change (``reactions.get`` shows it) and no event is pushed (returns
        None): a reaction added or removed while the app was not connected.
        """
        msg = self.get_message(channel, ts)
        if item_user is None and msg is not None:
            item_user = msg.get("user") or msg.get("bot_id")
        if msg is not None:
            self._apply_reaction(msg, user, reaction, add)
        if silent:
            await self._notify()
            return None
        return await self._push_reaction(channel, ts, user, reaction, add, item_user)

    async def _push_reaction(self, channel: str, ts: str, user: str, reaction: str, add: bool, item_user: Optional[str]) -> Envelope:
        event: Dict[str, Any] = {
            "type": "reaction_added" if add else "reaction_removed",
            "user": user,
            "reaction": reaction,
            "item": {"type": "message", "channel": channel, "ts": ts},
            "event_ts": self._next_ts(),
        }
        if item_user is not None:
            event["item_user"] = item_user
        return await self.push_event(event)

    @staticmethod
    def _apply_reaction(msg: Dict[str, Any], user: str, reaction: str, add: bool) -> bool:
        """Update msg["reactions"]; return False if nothing changed (dup add / missing remove)."""
        reactions = msg.setdefault("reactions", [])
        entry = next((r for r in reactions if r["name"] == reaction), None)
        if add:
            if entry is None:
                reactions.append({"name": reaction, "users": [user], "count": 1})
                return True
            if user in entry["users"]:
                return False
            entry["users"].append(user)
            entry["count"] += 1
            return True
        if entry is None or user not in entry["users"]:
            return False
        entry["users"].remove(user)
        entry["count"] -= 1
        if entry["count"] == 0:
            reactions.remove(entry)
        if not reactions:
            del msg["reactions"]
        return True

    async def slash(self, command: str, text: str, user: str, channel: str) -> Envelope:
        """Simulate ``user`` running ``command text`` in ``channel``.

        Pushes a ``slash_commands`` envelope (``accepts_response_payload``) whose
        payload has ``response_url`` = ``http://127.0.0.1:PORT/respond/<envelope_id>``.
        The returned record gets ``ack`` (``ack("x")`` → ``{"text": "x"}``) and
        ``responses`` (bodies POSTed by ``respond()``); await them with
        :meth:`wait_ack` / :meth:`wait_response`.
        """
        envelope_id = str(uuid.uuid4())
        chan = self.channels.get(channel, {})
        payload = {
            "token": self.VERIFICATION_TOKEN,
            "team_id": self.TEAM_ID,
            "team_domain": "fake",
            "channel_id": channel,
            "channel_name": chan.get("name", "directmessage" if chan.get("is_im") else channel.lower()),
            "user_id": user,
            "user_name": self.users.get(user, {}).get("name", user.lower()),
            "command": command,
            "text": text,
            "api_app_id": self.APP_ID,
            "is_enterprise_install": "false",
            "response_url": f"{self.base_url}/respond/{envelope_id}",
            "trigger_id": f"{next(self._event_counter)}.{self.TEAM_ID}.{uuid.uuid4().hex[:12]}",
        }
        return await self.send_envelope("slash_commands", payload, accepts_response_payload=True, envelope_id=envelope_id)

    async def send_disconnect(self, reason: str = "refresh_requested") -> None:
        """Send ``{"type": "disconnect"}`` as Slack does before rotating a
        connection; slack_sdk then calls apps.connections.open and reconnects
        (await it with ``wait_connected(count=previous + 1)``)."""
        assert self._ws is not None, "no socket mode connection"
        async with self._send_lock:  # type: ignore[union-attr]
            await self._ws.send_str(json.dumps({"type": "disconnect", "reason": reason, "debug_info": {"host": "fake-slack"}}))

    # ------------------------------------------------------------------
    # HTTP: Socket Mode WebSocket

    async def _handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._all_ws.append(ws)
        self._ws = ws
        self.connection_count += 1
        await ws.send_str(
            json.dumps(
                {
                    "type": "hello",
                    "num_connections": 1,
                    "debug_info": {"host": "fake-slack", "approximate_connection_time": 18060},
                    "connection_info": {"app_id": self.APP_ID},
                }
            )
        )
        await self._notify()
        try:
            async for frame in ws:
                if frame.type == WSMsgType.TEXT:
                    await self._on_ws_text(frame.data)
                elif frame.type == WSMsgType.ERROR:
                    logger.warning("fake slack websocket error: %s", ws.exception())
        finally:
            self._all_ws.remove(ws)
            if self._ws is ws:
                self._ws = None
            await self._notify()
        return ws

    async def _on_ws_text(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            self.unmatched_acks.append(data)
            logger.warning("fake slack: non-JSON frame from app: %r", data)
            return
        env = self._envelopes_by_id.get(msg.get("envelope_id")) if isinstance(msg, dict) else None
        if env is None:
            self.unmatched_acks.append(msg)
            logger.warning("fake slack: ack for unknown envelope: %r", msg)
            return
        env.ack_count += 1
        if env.acked:
            logger.warning("fake slack: duplicate ack for envelope %s", env.envelope_id)
        else:
            env.acked = True
            env.ack = msg.get("payload") or {}
        await self._notify()

    # ------------------------------------------------------------------
    # HTTP: response_url

    async def _handle_respond(self, request: web.Request) -> web.Response:
        env = self._envelopes_by_id.get(request.match_info["envelope_id"])
        try:
            body = await request.json()
        except ValueError:
            body = {"_raw": await request.text()}
        if env is None:
            logger.warning("fake slack: respond() to unknown response_url %s", request.path)
            return web.Response(status=404, text="no_active_hooks")
        env.responses.append(body)
        await self._notify()
        return web.Response(text="ok")

    # ------------------------------------------------------------------
    # HTTP: upload URLs (step 2 of files_upload_v2)

    async def _handle_upload(self, request: web.Request) -> web.Response:
        """Store the bytes POSTed to an upload URL: the raw body, or a multipart form's file
        field. Answers ``OK - <length>`` (text/plain) as files.slack.com does."""
        file_id = self._upload_keys.get(request.match_info["key"])
        if request.content_type == "multipart/form-data":
            form = await request.post()
            part = next((v for v in form.values() if isinstance(v, web.FileField)), None)
            data = part.file.read() if part is not None else b""
        else:
            data = await request.read()
        failure = self._upload_failures
        if failure and failure[0] != 0:
            if failure[0] is not None:
                failure[0] -= 1
            return web.Response(status=failure[1], text="upload failed (fake)")
        if file_id is None:
            logger.warning("fake slack: upload to unknown URL %s", request.path)
            return web.Response(status=404, text="file not found")
        self.files[file_id]["data"] = data
        await self._notify()
        return web.Response(text=f"OK - {len(data)}")

    # ------------------------------------------------------------------
    # HTTP: Web API

    @staticmethod
    async def _read_args(request: web.Request) -> Dict[str, Any]:
        args: Dict[str, Any] = dict(request.query)
        if request.can_read_body:
            ctype = request.content_type
            if ctype == "application/json":
                try:
                    body = await request.json()
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    args.update(body)
            elif ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
                form = await request.post()
                for k in form:
                    args[k] = form.get(k)
        return args

    async def _handle_api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        args = await self._read_args(request)
        token = args.pop("token", None)
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer ") :]
        call = ApiCall(method=method, args=args, token=token)
        self.calls.append(call)

        limit = self._rate_limits.get(method)
        if limit and limit[0] > 0:
            limit[0] -= 1
            call.status = 429
            call.response = {"ok": False, "error": "ratelimited"}
            await self._notify()
            return web.json_response(call.response, status=429, headers={"Retry-After": str(limit[1])})

        handler = self._METHODS.get(method)
        failure = self._failures.get(method)
        if handler is not None and failure and failure[0] != 0:
            if failure[0] is not None:
                failure[0] -= 1
            call.response = {"ok": False, "error": failure[1]}
            await self._notify()
            return web.json_response(call.response)
        if handler is None:
            logger.warning("fake slack: unknown Web API method %s args=%r", method, args)
            self.unknown_calls.append(call)
            resp: Dict[str, Any] = {"ok": False, "error": "unknown_method", "req_method": method}
        elif self.check_tokens and not token:
            resp = {"ok": False, "error": "not_authed"}
        elif self.check_tokens and token != (self.APP_TOKEN if method == "apps.connections.open" else self.BOT_TOKEN):
            resp = {"ok": False, "error": "invalid_auth"}
        elif self._needed_scope(method, args):
            resp = {"ok": False, "error": "missing_scope", "needed": self._needed_scope(method, args),
                    "provided": self.scopes}
        else:
            try:
                resp = await handler(self, args)
            except _ApiError as e:
                resp = {"ok": False, "error": e.error}
        call.response = resp
        await self._notify()
        return web.json_response(resp, headers={"x-oauth-scopes": self.scopes,
                                                "x-accepted-oauth-scopes": self._needed_scope(method, args, True)})

    def _needed_scope(self, method: str, args: Dict[str, Any], always: bool = False) -> str:
        """The scope ``method`` needs that the token lacks ("" when none is missing); with
        ``always``, the scope it needs whether or not the token has it."""
        needed = self.REQUIRED_SCOPES.get(method, "")
        if method in ("conversations.history", "conversations.replies"):
            needed = self._HISTORY_SCOPES[_channel_type_for(str(args.get("channel") or ""))]
        if always or not needed:
            return needed
        return "" if needed in self.scopes.split(",") else needed

    # --- individual methods (args -> response dict) --------------------

    def _require(self, args: Dict[str, Any], name: str) -> Any:
        value = args.get(name)
        if value in (None, ""):
            raise _ApiError("invalid_arguments")
        return value

    def _require_channel(self, args: Dict[str, Any], *, user_opens_dm: bool = False) -> str:
        channel = args.get("channel")
        if not channel:
            raise _ApiError("channel_not_found")
        if user_opens_dm and channel in self.users:
            return self.dm_with(channel)  # chat.postMessage(channel=<user id>) posts to the DM with that user
        if channel not in self.channels:
            raise _ApiError("channel_not_found")
        return channel

    def _require_message(self, channel: str, ts: Any) -> Dict[str, Any]:
        msg = self.get_message(channel, str(ts)) if ts else None
        if msg is None:
            raise _ApiError("message_not_found")
        return msg

    async def _api_auth_test(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return {
            "ok": True,
            "url": "https://fake.slack.com/",
            "team": self.TEAM_NAME,
            "user": self.BOT_NAME,
            "team_id": self.TEAM_ID,
            "user_id": self.BOT_USER_ID,
            "bot_id": self.BOT_ID,
            "is_enterprise_install": False,
        }

    async def _api_apps_connections_open(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return {"ok": True, "url": self.ws_url}

    async def _api_chat_post_message(self, args: Dict[str, Any]) -> Dict[str, Any]:
        channel = self._require_channel(args, user_opens_dm=True)
        text = args.get("text") or ""
        if not text and not args.get("blocks") and not args.get("attachments"):
            raise _ApiError("no_text")
        ts = self._next_ts()
        msg: Dict[str, Any] = {
            "type": "message",
            "user": self.BOT_USER_ID,
            "bot_id": self.BOT_ID,
            "app_id": self.APP_ID,
            "text": text,
            "ts": ts,
            "team": self.TEAM_ID,
            "bot_profile": {"id": self.BOT_ID, "app_id": self.APP_ID, "name": self.BOT_NAME, "team_id": self.TEAM_ID},
        }
        for key in ("blocks", "attachments", "metadata"):
            if args.get(key):
                msg[key] = args[key]
        thread_ts = args.get("thread_ts")
        if thread_ts:
            msg["thread_ts"] = str(thread_ts)
        self._store_message(channel, msg)
        self.bot_messages.append({**copy.deepcopy(msg), "channel": channel})
        await self._notify()
        if self.echo_bot_messages and self.connected:
            event = {**copy.deepcopy(msg), "channel": channel, "event_ts": ts, "channel_type": _channel_type_for(channel)}
            await self.push_event(event)
        return {"ok": True, "channel": channel, "ts": ts, "message": copy.deepcopy(msg)}

    async def _api_chat_update(self, args: Dict[str, Any]) -> Dict[str, Any]:
        """Edit one of the bot's messages: its text (and blocks/attachments when given)."""
        channel = self._require_channel(args)
        ts = str(args.get("ts") or "")
        msg = self._require_message(channel, ts)
        if msg.get("user") != self.BOT_USER_ID:
            raise _ApiError("cant_update_message")
        text = args.get("text") or ""
        if not text and not args.get("blocks") and not args.get("attachments"):
            raise _ApiError("no_text")
        if len(text) > 40000:
            raise _ApiError("msg_too_long")
        self._text_history.setdefault((channel, ts), [msg["text"]]).append(text)
        changes: Dict[str, Any] = {"text": text, "edited": {"user": self.BOT_USER_ID, "ts": self._next_ts()}}
        for key in ("blocks", "attachments"):
            if args.get(key):
                changes[key] = args[key]
        msg.update(changes)
        for record in self.bot_messages:
            if record["channel"] == channel and record["ts"] == ts:
                record.update(copy.deepcopy(changes))
        self.bot_edits.append({"channel": channel, "ts": ts, "text": text, "at": time.monotonic()})
        await self._notify()
        if self.echo_bot_messages and self.connected:
            await self.push_event({"type": "message", "subtype": "message_changed", "hidden": True,
                                   "channel": channel, "ts": changes["edited"]["ts"], "event_ts": changes["edited"]["ts"],
                                   "channel_type": _channel_type_for(channel), "message": copy.deepcopy(msg)})
        return {"ok": True, "channel": channel, "ts": ts, "text": text, "message": copy.deepcopy(msg)}

    async def _api_chat_post_ephemeral(self, args: Dict[str, Any]) -> Dict[str, Any]:
        channel = self._require_channel(args)
        user = self._require(args, "user")
        if not args.get("text") and not args.get("blocks") and not args.get("attachments"):
            raise _ApiError("no_text")
        ts = self._next_ts()
        self.ephemerals.append({**args, "channel": channel, "user": user, "message_ts": ts})
        return {"ok": True, "message_ts": ts}

    async def _reaction_call(self, args: Dict[str, Any], add: bool) -> Dict[str, Any]:
        channel = self._require_channel(args)
        name = str(self._require(args, "name")).strip(":")
        ts = str(args.get("timestamp") or "")
        msg = self._require_message(channel, ts)
        if not self._apply_reaction(msg, self.BOT_USER_ID, name, add):
            raise _ApiError("already_reacted" if add else "no_reaction")
        if add:
            self.bot_reactions.append({"channel": channel, "ts": ts, "name": name, "removed": False})
        else:
            for r in self.bot_reactions:
                if r["channel"] == channel and r["ts"] == ts and r["name"] == name:
                    r["removed"] = True
        await self._notify()
        if self.connected:
            # Real Slack also delivers the bot's own reaction as an event (user = the bot).
            await self._push_reaction(channel, ts, self.BOT_USER_ID, name, add, msg.get("user") or msg.get("bot_id"))
        return {"ok": True}

    async def _api_reactions_add(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return await self._reaction_call(args, True)

    async def _api_reactions_remove(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return await self._reaction_call(args, False)

    async def _api_reactions_get(self, args: Dict[str, Any]) -> Dict[str, Any]:
        """The message with its ``reactions`` (name, users, count). Like Slack, ``users`` is
        cut to the first :attr:`REACTION_USERS_SHOWN` unless ``full`` is true."""
        channel = self._require_channel(args)
        msg = copy.deepcopy(self._require_message(channel, args.get("timestamp")))
        if str(args.get("full", "")).lower() not in ("1", "true"):
            for r in msg.get("reactions", []):
                r["users"] = r["users"][:self.REACTION_USERS_SHOWN]
        return {"ok": True, "type": "message", "channel": channel, "message": msg}

    @staticmethod
    def _ts_filter(messages: List[Dict[str, Any]], args: Dict[str, Any]) -> List[Dict[str, Any]]:
        inclusive = str(args.get("inclusive", "0")).lower() in ("1", "true")
        oldest, latest = args.get("oldest"), args.get("latest")
        out = []
        for m in messages:
            t = float(m["ts"])
            if oldest not in (None, "") and (t < float(oldest) or (t == float(oldest) and not inclusive)):
                continue
            if latest not in (None, "") and (t > float(latest) or (t == float(latest) and not inclusive)):
                continue
            out.append(m)
        return out

    async def _api_conversations_replies(self, args: Dict[str, Any]) -> Dict[str, Any]:
        channel = self._require_channel(args)
        ts = str(self._require(args, "ts"))
        msg = self.get_message(channel, ts)
        if msg is None:
            raise _ApiError("thread_not_found")
        if msg.get("thread_ts") and msg["thread_ts"] != ts:
            messages = [copy.deepcopy(msg)]  # ts of a reply: Slack returns just that reply
        else:
            messages = self.thread(channel, ts)
        parent, replies = messages[:1], self._ts_filter(messages[1:], args)
        limit = int(args.get("limit") or 1000)
        messages = (parent + replies)[:limit]
        return {"ok": True, "messages": messages, "has_more": False, "response_metadata": {"next_cursor": ""}}

    async def _api_conversations_history(self, args: Dict[str, Any]) -> Dict[str, Any]:
        channel = self._require_channel(args)
        top = [m for m in self.messages.get(channel, []) if not m.get("thread_ts") or m["thread_ts"] == m["ts"]]
        top = self._ts_filter(top, args)
        limit = int(args.get("limit") or 100)
        newest_first = [copy.deepcopy(m) for m in reversed(top)]
        return {
            "ok": True,
            "messages": newest_first[:limit],
            "has_more": len(newest_first) > limit,
            "pin_count": 0,
            "response_metadata": {"next_cursor": ""},
        }

    async def _api_conversations_info(self, args: Dict[str, Any]) -> Dict[str, Any]:
        channel = self._require_channel(args)
        return {"ok": True, "channel": copy.deepcopy(self.channels[channel])}

    async def _api_users_info(self, args: Dict[str, Any]) -> Dict[str, Any]:
        user = self.users.get(str(args.get("user") or ""))
        if user is None:
            raise _ApiError("user_not_found")
        return {"ok": True, "user": copy.deepcopy(user)}

    async def _api_conversations_open(self, args: Dict[str, Any]) -> Dict[str, Any]:
        """Open or resume the DM with one user (``users``), or resume an IM by ``channel``."""
        users = [u.strip() for u in str(args.get("users") or "").split(",") if u.strip()]
        if not users:
            channel = args.get("channel")
            if not channel:
                raise _ApiError("users_list_not_supplied")
            if not self.channels.get(str(channel), {}).get("is_im"):
                raise _ApiError("channel_not_found")
            return {"ok": True, "no_op": True, "already_open": True, "channel": {"id": str(channel)}}
        if len(users) > 1:
            raise _ApiError("not_supported_by_fake")  # Slack: a multi-person DM (mpim)
        user = self.users.get(users[0])
        if user is None or user["deleted"]:
            raise _ApiError("user_not_found" if user is None else "user_disabled")
        known = any(i.get("is_im") and i.get("user") == users[0] for i in self.channels.values())
        channel = self.dm_with(users[0])
        extra = {"no_op": True, "already_open": True} if known else {}
        body = copy.deepcopy(self.channels[channel]) if str(args.get("return_im")).lower() in ("1", "true") \
            else {"id": channel}
        return {"ok": True, **extra, "channel": body}

    async def _api_files_get_upload_url_external(self, args: Dict[str, Any]) -> Dict[str, Any]:
        filename = self._require(args, "filename")
        try:
            length = int(self._require(args, "length"))
        except (TypeError, ValueError):
            raise _ApiError("invalid_arguments") from None
        if length <= 0:
            raise _ApiError("invalid_arguments")
        file_id, key = f"F{next(self._file_counter):08d}", uuid.uuid4().hex
        self._upload_keys[key] = file_id
        self.files[file_id] = {"id": file_id, "filename": str(filename), "title": str(filename), "length": length,
                               "alt_txt": args.get("alt_txt"), "data": None, "completed": False, "channels": []}
        return {"ok": True, "upload_url": f"{self.base_url}/upload/v1/{key}", "file_id": file_id}

    def _completed_files(self, args: Dict[str, Any]) -> List[Dict[str, Any]]:
        try:
            items = json.loads(args["files"]) if isinstance(args.get("files"), str) else args.get("files")
        except ValueError:
            raise _ApiError("invalid_arguments") from None
        if not isinstance(items, list) or not items or not all(isinstance(i, dict) and i.get("id") for i in items):
            raise _ApiError("invalid_arguments")
        for item in items:
            f = self.files.get(str(item["id"]))
            if f is None or f["data"] is None or f["completed"]:    # never uploaded, or completed before
                raise _ApiError("file_not_found")
        return items

    async def _api_files_complete_upload_external(self, args: Dict[str, Any]) -> Dict[str, Any]:
        """Finish uploads: the files become the bot's, shared into ``channel_id`` / ``channels``
        (each must exist; a user id means the DM with that user), or private when neither is given."""
        items = self._completed_files(args)
        channels = [self._require_channel({"channel": args["channel_id"]})] if args.get("channel_id") else []
        channels += [self._require_channel({"channel": c.strip()}, user_opens_dm=True)     # ids of channels or users
                     for c in str(args.get("channels") or "").split(",") if c.strip()]
        thread_ts, comment = args.get("thread_ts") or None, args.get("initial_comment") or ""
        if thread_ts and (len(channels) != 1 or self.get_message(channels[0], str(thread_ts)) is None):
            raise _ApiError("invalid_arguments" if len(channels) != 1 else "message_not_found")
        done = []
        for item in items:
            f = self.files[str(item["id"])]
            f.update(completed=True, title=str(item.get("title") or f["filename"]), channels=channels)
            done.append({"id": f["id"], "title": f["title"]})
        for channel in channels:
            await self._share_files(channel, [self.files[str(i["id"])] for i in items], comment, thread_ts)
        await self._notify()
        return {"ok": True, "files": done}

    async def _share_files(self, channel: str, files: List[Dict[str, Any]], comment: str, thread_ts: Any) -> None:
        """What Slack does with a completed upload in one channel: a ``file_share`` message by
        the bot (echoed as an event), and a :attr:`shared_files` record per file."""
        ts = self._next_ts()
        msg: Dict[str, Any] = {
            "type": "message", "subtype": "file_share", "user": self.BOT_USER_ID, "bot_id": self.BOT_ID,
            "text": comment, "ts": ts, "team": self.TEAM_ID, "upload": True, "display_as_bot": False,
            "files": [{"id": f["id"], "name": f["filename"], "title": f["title"], "size": len(f["data"]),
                       "user": self.BOT_USER_ID, "mimetype": "image/png" if f["data"].startswith(b"\x89PNG")
                       else "application/octet-stream"} for f in files],
        }
        if thread_ts:
            msg["thread_ts"] = str(thread_ts)
        self._store_message(channel, msg)
        for f in files:
            self.shared_files.append({"file_id": f["id"], "channel": channel, "filename": f["filename"],
                                      "title": f["title"], "thread_ts": msg.get("thread_ts"),
                                      "initial_comment": comment, "data": f["data"], "ts": ts})
        if self.echo_bot_messages and self.connected:
            await self.push_event({**copy.deepcopy(msg), "channel": channel, "event_ts": ts,
                                   "channel_type": _channel_type_for(channel)})

    _METHODS: Dict[str, Callable[["FakeSlack", Dict[str, Any]], Any]] = {
        "auth.test": _api_auth_test,
        "apps.connections.open": _api_apps_connections_open,
        "chat.postMessage": _api_chat_post_message,
        "chat.postEphemeral": _api_chat_post_ephemeral,
        "chat.update": _api_chat_update,
        "reactions.add": _api_reactions_add,
        "reactions.remove": _api_reactions_remove,
        "reactions.get": _api_reactions_get,
        "conversations.replies": _api_conversations_replies,
        "conversations.history": _api_conversations_history,
        "conversations.info": _api_conversations_info,
        "conversations.open": _api_conversations_open,
        "users.info": _api_users_info,
        "files.getUploadURLExternal": _api_files_get_upload_url_external,
        "files.completeUploadExternal": _api_files_complete_upload_external,
    }


class _ApiError(Exception):
    def __init__(self, error: str):
        super().__init__(error)
        self.error = error
