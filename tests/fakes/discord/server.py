"""FakeDiscord itself: the world (state.py), gateway, REST and interactions put together in one
loopback server; its lifecycle and the patching of discord.py's two base URLs; what people do
(post, react, delete a message, a system message); and waiting for what the bot does. Also
:func:`running_client`, which runs a discord.py client against it until it is ready."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Union

import yarl
from aiohttp import web

from .gateway import GatewayMixin
from .interactions import InteractionsMixin
from .rest import RestMixin
from .state import FAKE_TOKEN, DiscordState, parse_emoji


class FakeDiscordTimeout(AssertionError):
    """Raised by the ``wait_*`` helpers when the condition is not met in time."""


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


class FakeDiscord(DiscordState, GatewayMixin, RestMixin, InteractionsMixin):
    """Loopback Discord server.  Use as ``async with FakeDiscord() as fake:``.

    Constructor options:

    * ``token``: bot token REST/gateway must present (``None`` = accept any).
    * ``patch``: patch discord.py's URLs for the lifetime of the ``async with``
      (default True).  :meth:`patch_discord` is available for manual control.
    * ``echo_bot_messages``: dispatch MESSAGE_CREATE for the bot's own messages
      (as Discord does).
    * ``enforce_intents``: filter dispatches / blank content per IDENTIFY intents.
    * ``heartbeat_interval_ms``: sent in HELLO.

    Public, test-facing state (plain lists/dicts, inspect freely): the world
    (:class:`~.state.DiscordState`), the REST records (:class:`~.rest.RestMixin`:
    ``requests``, ``unknown_requests``, ``bot_messages``, ``reactions_by_bot``,
    ``typing_calls``, ``message_edits``, ``failed_requests``), the gateway's (:class:`~.gateway.GatewayMixin`), the commands and
    interactions (:class:`~.interactions.InteractionsMixin`), and ``internal_errors``:
    exception strings raised inside the fake's handlers.
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
        DiscordState.__init__(self)
        self.token = token
        self._patch = patch
        self.echo_bot_messages = echo_bot_messages
        self.enforce_intents = enforce_intents
        self.heartbeat_interval_ms = heartbeat_interval_ms

        self.port: int = 0
        self._runner: Optional[web.AppRunner] = None
        self._patcher: Optional[contextlib.ExitStack] = None
        self._cond = asyncio.Condition()
        self._consumed_bot_messages: set = set()
        self.internal_errors: List[str] = []
        self._init_gateway()
        self._init_rest()
        self._init_interactions()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> "FakeDiscord":
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def start(self) -> None:
        """Start the HTTP/websocket server on 127.0.0.1 (random port)."""
        app = web.Application(middlewares=[self._middleware])
        self._add_gateway_routes(app.router)
        self._add_rest_routes(app.router)
        self._add_interaction_routes(app.router)
        self._add_unknown_route(app.router)
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
        await self._close_gateway()
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

    # ------------------------------------------------------------------ what people do

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
        return await self._post(msg)

    async def system_message(self, channel_id: int, author_id: int, msg_type: int = 7,
                             content: str = "") -> Dict[str, Any]:
        """Simulate a system message in a guild channel, e.g. type 7 (``author_id`` joined
        the server, the default) or 6 (a pin); dispatches MESSAGE_CREATE and stores it.
        Returns the message dict."""
        channel_id, author_id = int(channel_id), int(author_id)
        self.add_member(author_id)
        return await self._post(self._new_message(channel_id, author_id, content, msg_type=msg_type))

    async def delete_message(self, channel_id: int, message_id: Union[int, str]) -> Dict[str, Any]:
        """Simulate a user (or moderator) deleting a message in the Discord client: it leaves
        the channel history and MESSAGE_DELETE is dispatched.  Returns the deleted message."""
        msg = self.get_message(int(message_id))
        if msg is None or int(msg["channel_id"]) != int(channel_id):
            raise KeyError(f"no message {message_id} in channel {channel_id}")
        self._remove_message(msg)
        await self.dispatch("MESSAGE_DELETE", self._delete_payload(msg))
        await self._bump()
        return msg

    async def delete_channel(self, channel_id: int) -> Dict[str, Any]:
        """Simulate a server admin deleting a guild channel: it and its messages are gone (REST
        on it answers 404 Unknown Channel, code 10003) and CHANNEL_DELETE is dispatched.
        Returns the deleted channel."""
        ch = self.channels.pop(int(channel_id))
        for msg in self.messages.pop(int(channel_id), []):
            self._messages_by_id.pop(int(msg["id"]), None)
        await self.dispatch("CHANNEL_DELETE", dict(ch))
        await self._bump()
        return ch

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
        silent: bool = False,
    ) -> Dict[str, Any]:
        """Simulate ``user_id`` adding (``add=True``) or removing a reaction.

        ``emoji`` is a unicode emoji (``"👍"``) or a custom emoji ``"name:id"`` /
        ``"<:name:id>"``.  Dispatches MESSAGE_REACTION_ADD (with ``member`` in
        guild channels, ``message_author_id``, ``burst: false``, ``type: 0``) or
        MESSAGE_REACTION_REMOVE.  ``bot_user`` marks the reacting account as a
        bot.  Like Discord, adding an existing reaction / removing a missing one
        is a no-op with no event, unless ``force=True``.  The message need not be
        known to the fake.  ``silent``: only the reaction lists change (REST shows it) and
        nothing is dispatched or kept for a RESUME replay: a reaction added or removed while
        the bot was away and the gateway has forgotten it.  Returns
        ``{"dispatched": bool, "emoji": {...}}``.
        """
        channel_id, message_id, user_id = int(channel_id), int(message_id), int(user_id)
        if self.is_dm(channel_id):
            self.add_user(user_id, bot=bot_user)
        else:
            self.add_member(user_id, bot=bot_user)
        if silent:
            self._set_reaction(message_id, user_id, emoji, add)
            sent = False
        else:
            sent = await self._apply_reaction(channel_id, message_id, user_id, emoji, add, force=force)
        await self._bump()
        return {"dispatched": sent, "emoji": parse_emoji(emoji)}

    async def _post(self, msg: Dict[str, Any]) -> Dict[str, Any]:
        """Store a message someone other than the bot posted and dispatch MESSAGE_CREATE."""
        self._store_message(msg)
        await self.dispatch("MESSAGE_CREATE", self._gateway_message(msg))
        await self._bump()
        return msg

    async def _apply_reaction(
        self, channel_id: int, message_id: int, user_id: int, emoji: str, add: bool, *, force: bool = False
    ) -> bool:
        """Update reaction state and dispatch the event.  Returns False if it was a
        no-op (already reacted / not reacted), in which case nothing is dispatched
        unless ``force``."""
        changed = self._set_reaction(message_id, user_id, emoji, add)
        if not changed and not force:
            return False
        payload = self._reaction_payload(channel_id, message_id, user_id, emoji, add)
        await self.dispatch("MESSAGE_REACTION_ADD" if add else "MESSAGE_REACTION_REMOVE", payload)
        return True

    # ------------------------------------------------------------------ waiting

    async def _bump(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def wait_for(self, predicate: Union[str, Callable[[], Any]], timeout: float = 60.0) -> Any:
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
        timeout: float = 60.0,
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

    def assert_clean(self) -> None:
        """Fail if any request hit an unknown route or a fake handler crashed."""
        assert not self.unknown_requests, f"requests to routes the fake lacks: {self.unknown_requests}"
        assert not self.internal_errors, f"fake discord handler errors: {self.internal_errors}"


@contextlib.asynccontextmanager
async def running_client(
    fake: FakeDiscord, client: Any, *, token: Optional[str] = None, timeout: float = 10.0
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
