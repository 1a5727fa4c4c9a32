"""Slack adapter: slack-bolt AsyncApp in Socket Mode → bot.events payloads → ChatCore. No business logic.

Socket Mode needs no public URL: the app token (xapp-) opens a WebSocket, the bot token
(xoxb-) makes the Web API calls. What it does with Slack's events:

- ``message`` (and ``app_mention``, deduplicated by channel + ts: Slack sends both for a
  mention) → ``Message``. The bot's mention is stripped from the text; ``im`` channels are
  DMs; a message in a thread the bot has posted in is ``replies_to_bot``. Edits, joins and
  other subtypes are ignored; other bots' messages are passed on marked as bots (the core
  ignores them). The reply goes into the message's thread; the context is that thread
  (``conversations.replies``, oldest first, without the message itself) or, outside a
  thread, recent channel history (``conversations.history``).
- ``reaction_added`` / ``reaction_removed`` → ``Reaction``. Slack names (+1, thumbsup,
  -1, ...) and skin tones are canonicalised by bot.rewards. Reactions by the bot itself or
  by bot users (users.info ``is_bot``) are marked as bot reactions, so seeds never vote.
- Reactions given or taken back while the bot was away: each Socket Mode connection starts
  with a ``hello`` (the first one, and each reconnect: Slack's refresh, a dropped socket);
  after it ``backfill`` reads, in the background, ``reactions.get`` (``full``) of the bot's
  replies of the last ``chat.backfill_hours`` and ChatCore makes the stored votes exactly those;
  a reply whose message can't be read keeps its votes.
- The slash command (``[slack] command``, default /reactlearn) with subcommands retrain,
  status, rollback N, forget [@user]: acknowledged at once (an empty ack), then answered
  with an ephemeral ``respond()``. Workspace admins and owners (users.info, cached for a
  minute) are platform admins; the admin decision itself is ChatCore's. A command result's
  ``image`` (/status's chart) is uploaded (``files_upload_v2``) into the person's DM with the
  bot, where only they can see it (see ``_send_chart``); the text answer never waits on it.

Every Events API delivery is remembered by its ``event_id`` (the last ``EVENT_IDS``): Slack
delivers an event again (same ``event_id``, a ``retry_attempt``) when its acknowledgement did
not arrive in time, and a repeat is acknowledged and skipped, so nothing is answered or
recorded twice. An event of a type the bot does not handle is acknowledged and skipped; one
with a field missing or of the wrong type is logged and skipped (``text`` may be missing).

bolt and slack_sdk log through ``bot.adapters.slack.bolt``, whose ``RedactTokens`` filter masks
tokens (Socket Mode frames carry the verification token, and slack_sdk logs frames at DEBUG).

A reply is streamed: posted (chat.postMessage) as soon as the model has written a few words,
then updated in place (chat.update) with the text so far at most every ``UPDATE_SECONDS``;
the final text settles every part, split as below. The seeds go on the first part.

Platform message ids are ``"<channel>:<ts>"``: a Slack ts is unique only within its channel.
Outgoing text is escaped (``&``, ``<``, ``>``) so a generated ``<!channel>`` or ``<@U…>``
never pings anyone, and split at ``[slack] message_chars`` (default 4,000: Slack's guideline
for readable messages; the API's hard limit is 40,000). HTTP 429 answers are waited out by
slack_sdk's ``AsyncRateLimitErrorRetryHandler`` (Retry-After, up to 5 retries per call).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import aiohttp
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient

from bot.chat import ChatCore
from bot.config import Config
from bot.events import Command, HistoryItem, Message, Reaction
from bot.streaming import ShownReply
from bot.rewards import SLACK_NAMES, canonical
from bot.rerun import Rerun

log = logging.getLogger(__name__)
PLATFORM = "slack"
LIMIT = 4000            # Slack's guideline for message text; chat.postMessage refuses > 40,000
RATE_LIMIT_RETRIES = 5  # 429 answers waited out per Web API call (Retry-After seconds each)
USER_TTL = 60.0         # seconds users.info answers (names, admin/owner, is_bot) are cached
THREAD_PAGES = 10       # conversations.replies pages (200 messages each) read for context
UPDATE_SECONDS = 1.2    # between chat.update calls of a streamed reply (Slack: about 1 per second)
EVENT_IDS = 5000        # event ids remembered to skip Slack's retries (it retries 3 times within ~5 min)
HANDLED_EVENTS = {"message", "app_mention", "reaction_added", "reaction_removed"}
CHART_FILENAME = "status.png"
CHART_TITLE = "reactlearn status"
CHART_ALT = "Like-rate of each model version with its 95% interval, and the reward model's held-out AUC"

# Message subtypes that carry something a person wrote; every other subtype
# (message_changed, message_deleted, channel_join, ...) is ignored.
TEXT_SUBTYPES = {None, "thread_broadcast", "file_share", "me_message", "bot_message"}
# chat.postMessage errors that retrying later will not fix (a trainer result is then dropped).
PERMANENT_ERRORS = {"channel_not_found", "not_in_channel", "is_archived", "restricted_action",
                    "msg_too_long", "invalid_auth", "account_inactive", "missing_scope"}
_SLACK_NAME_FOR = {}
for _name, _emoji in SLACK_NAMES.items():       # first name wins: 👍 → "+1", 👎 → "-1"
    _SLACK_NAME_FOR.setdefault(_emoji, _name)
# slack_sdk's Socket Mode client logs every frame at DEBUG; a frame's payload carries the app's
# verification token ("token": "..."), and Web API tokens must never be logged either.
_SECRETS = re.compile(r"""(["'])token\1(\s*:\s*)(["'])[^"']*\3|\bx(?:ox[a-z]|app)-[A-Za-z0-9-]+""")


class RedactTokens(logging.Filter):
    """Masks tokens in the records of the logger it is on (the one bolt and slack_sdk are given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a record that can't be formatted is left to logging
            return True
        clean = _SECRETS.sub(lambda m: f"{m[1]}token{m[1]}{m[2]}{m[3]}…{m[3]}" if m[1] else "x…-…", text)
        if clean != text:
            record.msg, record.args = clean, None
        return True


BOLT_LOGGER = logging.getLogger("bot.adapters.slack.bolt")
if not any(isinstance(f, RedactTokens) for f in BOLT_LOGGER.filters):
    BOLT_LOGGER.addFilter(RedactTokens())

_PLAIN_NAME = re.compile(r"^[a-z0-9_+\-']+$")
_USER_ARG = re.compile(r"^<@([UW][A-Z0-9]+)(?:\|[^>]*)?>$|^([UW][A-Z0-9]{2,})$")
USAGE = ("Usage: {cmd} retrain | status | rollback VERSION | forget [@user]\n"
         "retrain and rollback are for admins; forget deletes your own messages, votes and the "
         "replies that may hold your words (admins: anyone's).")


def escape(text: str) -> str:
    """Slack's three control characters, so generated text cannot ping or link anyone."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def split_text(text: str, limit: int = LIMIT) -> list[str]:
    """Split (escaped) text into chunks of at most ``limit`` characters: at a newline or
    space when one is in the second half of the chunk, never inside an ``&amp;`` entity."""
    chunks = []
    while len(text) > limit:
        cut = max(text.rfind("\n", 0, limit + 1), text.rfind(" ", 0, limit + 1))
        if cut <= limit // 2:
            cut = limit
            amp = text.rfind("&", max(0, cut - 4), cut)
            if amp > 0 and ";" not in text[amp:cut]:
                cut = amp
        chunk = text[:cut].rstrip()
        if chunk:
            chunks.append(chunk)
        text = text[cut:].lstrip()
    if text.strip():
        chunks.append(text)
    return chunks or ["…"]


def slack_name(emoji: str) -> str | None:
    """The Slack reaction name for an emoji of the reward map ("👍" → "+1"), or None."""
    uni = canonical(emoji)
    if uni in _SLACK_NAME_FOR:
        return _SLACK_NAME_FOR[uni]
    return uni if _PLAIN_NAME.match(uni) else None   # a Slack name (custom emoji) given as is


def message_key(channel: str, ts: str) -> str:
    """The platform message id used in the store: a ts is unique only within a channel."""
    return f"{channel}:{ts}"


def parse_command(text: str) -> tuple[str, dict] | None:
    """``"rollback 3"`` → ("rollback", {"version": "3"}); ``"forget <@U1|bob>"`` → ("forget", {"user": "U1"}).

    Returns ("", {}) for an empty text or "help", and None when the arguments can't be read."""
    name, _, rest = (text or "").strip().partition(" ")
    name, rest = name.lower(), rest.strip()
    if name in ("", "help"):
        return "", {}
    if name == "rollback":
        return name, {"version": rest}
    if name == "forget":
        if not rest:
            return name, {}
        m = _USER_ARG.match(rest)
        return (name, {"user": m.group(1) or m.group(2)}) if m else None
    return name, {}


def _ts_key(ts: str) -> tuple[int, ...]:
    return tuple(int(p) for p in str(ts).split(".") if p.isascii() and p.isdigit())


# What the handlers read from an event, and the type each must have when it is there.
MESSAGE_FIELDS = {"channel": str, "ts": str, "text": str, "user": str, "bot_id": str, "subtype": str,
                  "thread_ts": str, "channel_type": str}
REACTION_FIELDS = {"user": str, "reaction": str, "item": dict}
ITEM_FIELDS = {"type": str, "channel": str, "ts": str}


def problem(event: Any, fields: dict[str, type], required: tuple[str, ...]) -> str | None:
    """Why ``event`` can't be used (not an object, a required field missing, a field of the
    wrong type), or None when it can."""
    if not isinstance(event, dict):
        return f"the event is {type(event).__name__}, not an object"
    for key in required:
        if event.get(key) in (None, ""):
            return f"no {key!r}"
    for key, kind in fields.items():
        value = event.get(key)
        if value is not None and not isinstance(value, kind):
            return f"{key!r} is {type(value).__name__}, not {kind.__name__}"
    return None


def _usable(m: Any) -> bool:
    """A message from conversations.replies / .history that can go into the context."""
    return isinstance(m, dict) and isinstance(m.get("ts"), str) and problem(m, MESSAGE_FIELDS, ()) is None


def _event_time(event: dict) -> float | None:
    """The event's ``event_ts`` as seconds (the order of two changes of one reaction), or None."""
    try:
        at = float(event["event_ts"])
    except (KeyError, TypeError, ValueError):
        return None
    return at if math.isfinite(at) else None


def _kind(event: Any) -> str:
    kind = event.get("type") if isinstance(event, dict) else None
    return kind if isinstance(kind, str) and kind else "Slack"


class SlackReply(ShownReply):
    """One answer in one thread: the ``send`` for notices and a ``bot.streaming.ReplyStream``.

    ``parts`` ((channel, ts) of each message) show ``split_text(escape(text))``: a part whose
    chunk changed is updated in place (chat.update), a missing one posted in the thread. A
    later part that can't be posted is logged and left out (the reply keeps the parts that
    are there); ``send`` starts afresh (new messages)."""

    def __init__(self, client: AsyncWebClient, channel: str, thread_ts: str, limit: int,
                 min_interval: float = UPDATE_SECONDS):
        self.client, self.channel, self.thread_ts, self.limit = client, channel, thread_ts, limit
        self.min_interval = min_interval
        self.parts: list[tuple[str, str]] = []
        self._shown: list[str] = []

    async def send(self, text: str) -> list[str]:
        self.parts, self._shown = [], []
        return await self._show(text)

    async def _show(self, text: str) -> list[str]:
        chunks = split_text(escape(text), self.limit)
        for i, chunk in enumerate(chunks):
            if i < len(self.parts):
                if self._shown[i] != chunk:
                    await self.client.chat_update(channel=self.parts[i][0], ts=self.parts[i][1], text=chunk)
                    self._shown[i] = chunk
                continue
            try:
                resp = await self.client.chat_postMessage(channel=self.channel, thread_ts=self.thread_ts, text=chunk,
                                                          unfurl_links=False, unfurl_media=False)
            except SlackApiError as e:
                if not self.parts:
                    raise
                log.error("slack: part %d of a reply in %s failed: %s", i + 1, self.channel, e.response.get("error"))
                break
            self.parts.append((resp["channel"], resp["ts"]))
            self._shown.append(chunk)
        return [message_key(c, ts) for c, ts in self.parts[:len(chunks)]]


class ScreeningHandler(AsyncSocketModeHandler):
    """bolt's Socket Mode handler with a screen in front of the app: an Events API envelope
    that ``admit`` turns away is acknowledged (so Slack does not send it again) and dropped."""

    def __init__(self, app: AsyncApp, app_token: str, admit: Callable[[SocketModeRequest], bool]):
        super().__init__(app, app_token=app_token)
        self.admit = admit

    async def handle(self, client, req: SocketModeRequest) -> None:
        if req.type == "events_api" and not self.admit(req):
            await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id))
            return
        await super().handle(client, req)


class SlackAdapter:
    def __init__(self, core: ChatCore, cfg: Config, *, client: AsyncWebClient | None = None,
                 update_seconds: float = UPDATE_SECONDS):
        """``client``: a ready AsyncWebClient (tests point one at a fake); by default one is
        built from the bot token and ``[slack] api_url`` when ``start`` runs. ``update_seconds``:
        the least time between two updates of a streamed reply."""
        self.core = core
        self.cfg = cfg
        self.update_seconds = update_seconds
        self.client = client
        self.app: AsyncApp | None = None
        self.handler: AsyncSocketModeHandler | None = None
        self.bot_user_id = ""
        self.bot_id = ""
        self.ready = asyncio.Event()
        self._stop: asyncio.Event | None = None
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()       # (channel, ts) handled
        self._events: OrderedDict[str, None] = OrderedDict()                 # event ids delivered
        self._threads: OrderedDict[tuple[str, str], bool] = OrderedDict()    # bot posted in thread?
        self._users: dict[str, tuple[float, dict | None]] = {}
        self._backfill = Rerun(self.backfill, "slack: reconciling votes")
        self._hellos = 0                  # Socket Mode connections opened (each starts with "hello")
        self._lookups: dict[str, asyncio.Future] = {}                        # users.info calls under way

    @property
    def command_name(self) -> str:
        name = self.cfg.slack.command.strip()
        return name if name.startswith("/") else "/" + name

    # -- lifecycle ------------------------------------------------------------

    async def start(self, bot_token: str = "", app_token: str = "") -> None:
        """Connect over Socket Mode and serve until ``close()`` (or cancellation)."""
        if self.client is None:
            self.client = AsyncWebClient(token=bot_token or self.cfg.slack_bot_token,
                                         base_url=self.cfg.slack.api_url.rstrip("/") + "/")
        if not any(isinstance(h, AsyncRateLimitErrorRetryHandler) for h in self.client.retry_handlers):
            self.client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=RATE_LIMIT_RETRIES))
        auth = await self.client.auth_test()        # a bad bot token fails here, clearly
        self.bot_user_id, self.bot_id = auth["user_id"], auth.get("bot_id") or ""
        self.app = AsyncApp(client=self.client, logger=BOLT_LOGGER)
        self._register(self.app)
        self.handler = ScreeningHandler(self.app, app_token or self.cfg.slack_app_token, self._admit)
        self.handler.client.message_listeners.append(self._on_socket_message)
        self._stop = asyncio.Event()
        try:
            await self.handler.connect_async()
            log.info("slack: connected as %s (%s) over Socket Mode", auth.get("user"), self.bot_user_id)
            self.ready.set()
            await self._stop.wait()
        finally:
            self.ready.clear()
            await self.handler.close_async()

    async def close(self) -> None:
        self._backfill.cancel()
        if self._stop is not None:
            self._stop.set()
        if self.handler is not None:
            await self.handler.close_async()

    def _register(self, app: AsyncApp) -> None:
        app.event("message")(self._on_message_event)
        app.event("app_mention")(self._on_message_event)
        app.event("reaction_added")(self._on_reaction_added)
        app.event("reaction_removed")(self._on_reaction_removed)
        app.command(self.command_name)(self._on_command)

    def _admit(self, req: SocketModeRequest) -> bool:
        """Should bolt see this Events API envelope? Not when its ``event_id`` was delivered
        before (Slack's retry: ``retry_attempt`` 1-3, ``retry_reason`` "timeout", ...), nor
        when its event is of a type no listener handles or is malformed (bolt would leave it
        unacknowledged, or fail in its own middleware, and Slack would retry it)."""
        body = req.payload
        if not isinstance(body, dict) or body.get("type") != "event_callback":
            return True
        event_id, event = body.get("event_id"), body.get("event")
        kind = event.get("type") if isinstance(event, dict) else None
        if isinstance(event_id, str) and event_id:
            if event_id in self._events:
                log.debug("slack: skipped event %s (%s), already delivered: retry %s (%s)",
                          event_id, kind, req.retry_attempt, req.retry_reason)
                return False
            self._remember(self._events, event_id, None, EVENT_IDS)
        if kind in HANDLED_EVENTS:
            return True
        if isinstance(kind, str) and kind:
            log.debug("slack: ignored a %s event (not one the bot handles)", kind)
        else:
            log.warning("slack: skipped a malformed event %s: %s", event_id, problem(event, {"type": str}, ("type",)))
        return False

    # -- users ----------------------------------------------------------------

    async def _user(self, user_id: str) -> dict | None:
        """users.info, cached for USER_TTL seconds; None when it can't be read. Events that
        need the same user at once share one call (a flood of reactions makes one, not
        hundreds) and go on in the order they came."""
        if not user_id:
            return None
        hit = self._users.get(user_id)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        lookup = self._lookups.get(user_id)
        if lookup is None:
            lookup = self._lookups[user_id] = asyncio.ensure_future(self._users_info(user_id))
            lookup.add_done_callback(lambda _: self._lookups.pop(user_id, None))
        return await asyncio.shield(lookup)

    async def _users_info(self, user_id: str) -> dict | None:
        try:
            info = (await self.client.users_info(user=user_id)).get("user")
            info = info if isinstance(info, dict) else None
        except SlackApiError as e:
            log.warning("slack: users.info %s failed: %s", user_id, e.response.get("error"))
            info = None
        self._users[user_id] = (time.monotonic() + USER_TTL, info)
        return info

    async def _name(self, user_id: str) -> str:
        info = await self._user(user_id)
        if not info:
            return user_id
        profile = info.get("profile") if isinstance(info.get("profile"), dict) else {}
        for name in (profile.get("display_name"), info.get("real_name"), info.get("name")):
            if isinstance(name, str) and name:
                return name
        return user_id

    # -- messages -------------------------------------------------------------

    def _from_me(self, m: dict) -> bool:
        return bool(m.get("user") and m.get("user") == self.bot_user_id) or \
            bool(self.bot_id and m.get("bot_id") == self.bot_id)

    def _clean(self, text: str) -> str:
        """Slack text → what the model reads: the bot's mention gone, &amp; &lt; &gt; decoded."""
        text = re.sub(rf"<@{re.escape(self.bot_user_id)}(?:\|[^>]*)?>", "", text or "")
        return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&").strip()

    def _remember(self, cache: OrderedDict, key: Any, value: Any, size: int = 5000) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > size:
            cache.popitem(last=False)

    async def _thread(self, channel: str, thread_ts: str, before: str) -> list[dict]:
        """The thread's messages older than ``before``, oldest first (the parent included)."""
        out: list[dict] = []
        cursor, ok = None, True
        try:
            for _ in range(THREAD_PAGES):
                resp = await self.client.conversations_replies(channel=channel, ts=thread_ts, limit=200, cursor=cursor)
                out += resp.get("messages") or []
                cursor = (resp.get("response_metadata") or {}).get("next_cursor")
                if not resp.get("has_more") or not cursor:
                    break
        except SlackApiError as e:
            log.warning("slack: conversations.replies %s/%s failed: %s", channel, thread_ts, e.response.get("error"))
            ok = False
        seen, unique = set(), []
        for m in filter(_usable, out):
            if m.get("ts") not in seen and _ts_key(m["ts"]) < _ts_key(before):
                seen.add(m.get("ts"))
                unique.append(m)
        if ok:      # remember whether the bot is in this thread (not after a failed read)
            self._remember(self._threads, (channel, thread_ts), any(self._from_me(m) for m in unique)
                           or self._threads.get((channel, thread_ts), False))
        return sorted(unique, key=lambda m: _ts_key(m["ts"]))

    async def _channel_history(self, channel: str, before: str) -> list[dict]:
        n = self.cfg.chat.history_messages
        if n <= 0:
            return []
        try:
            resp = await self.client.conversations_history(channel=channel, latest=before, inclusive=False, limit=n)
        except SlackApiError as e:
            log.warning("slack: conversations.history %s failed: %s", channel, e.response.get("error"))
            return []
        return [m for m in reversed(resp.get("messages") or []) if _usable(m) and _ts_key(m["ts"]) < _ts_key(before)]

    async def _item(self, m: dict, channel: str) -> HistoryItem | None:
        if not _usable(m) or m.get("subtype") not in TEXT_SUBTYPES or not (m.get("text") or "").strip():
            return None
        if self._from_me(m):
            return HistoryItem("bot", self._clean(m["text"]), True, message_id=message_key(channel, m["ts"]))
        if m.get("bot_id") and not m.get("user"):
            name = m.get("username") or (m.get("bot_profile") or {}).get("name") or m["bot_id"]
        else:
            name = await self._name(m.get("user", ""))
        return HistoryItem(name, self._clean(m["text"]), False, author_id=str(m.get("user") or m.get("bot_id") or ""),
                           message_id=message_key(channel, m["ts"]))

    async def _on_message_event(self, event: dict) -> None:
        why = problem(event, MESSAGE_FIELDS, ("channel", "ts"))
        if why is not None:
            log.warning("slack: skipped a malformed %s event: %s", _kind(event), why)
            return
        channel, ts = event["channel"], event["ts"]
        if event.get("hidden") or event.get("subtype") not in TEXT_SUBTYPES:
            return
        if not event.get("user") and not event.get("bot_id"):
            log.warning("slack: skipped a message event %s/%s: no 'user' and no 'bot_id'", channel, ts)
            return
        if (channel, ts) in self._seen:          # a mention arrives as app_mention and message
            return
        self._remember(self._seen, (channel, ts), None, 2000)
        user = event.get("user") or ""
        text = event.get("text") or ""
        thread_ts = event.get("thread_ts")
        in_thread = bool(thread_ts and thread_ts != ts)
        msg = Message(
            platform=PLATFORM, message_id=message_key(channel, ts), channel_id=channel,
            author_id=user or event.get("bot_id", ""), author_name=user,
            text=self._clean(text),
            author_is_bot=bool(event.get("bot_id")) or event.get("subtype") == "bot_message" or user == self.bot_user_id,
            is_dm=event.get("channel_type") == "im",
            mentions_bot=bool(re.search(rf"<@{re.escape(self.bot_user_id)}(?:\|[^>]*)?>", text)),
            replies_to_bot=in_thread and self._threads.get((channel, thread_ts), False))
        thread: list[dict] | None = None
        if not self.core.wants_reply(msg):
            if msg.author_is_bot or not in_thread or (channel, thread_ts) in self._threads:
                return
            thread = await self._thread(channel, thread_ts, before=ts)      # unknown thread: look once
            if not self._threads.get((channel, thread_ts)):
                return
            msg = dataclasses.replace(msg, replies_to_bot=True)
            if not self.core.wants_reply(msg):
                return
        msg = dataclasses.replace(msg, author_name=await self._name(user))
        if in_thread:
            raw = thread if thread is not None else await self._thread(channel, thread_ts, before=ts)
        else:
            raw = await self._channel_history(channel, before=ts)
        history = [h for h in [await self._item(m, channel) for m in raw] if h is not None]
        root = thread_ts or ts
        self._remember(self._threads, (channel, root), True)      # the bot is about to post here
        reply = SlackReply(self.client, channel, root, self.cfg.slack.message_chars, self.update_seconds)
        reply_id = await self.core.on_message(msg, history, reply.send, reply)
        # Seeds go on generated replies only (not on "busy" or "too fast" notes), on the first part.
        if reply_id is not None and reply.parts:
            await self._seed(*reply.parts[0])

    async def _seed(self, channel: str, ts: str) -> None:
        for emoji in self.core.seed_emoji:
            name = slack_name(emoji)
            if name is None:
                log.debug("slack: no Slack name for seed emoji %r", emoji)
                continue
            try:
                await self.client.reactions_add(channel=channel, timestamp=ts, name=name)
            except SlackApiError as e:
                log.warning("slack: could not seed :%s: on %s/%s: %s", name, channel, ts, e.response.get("error"))

    # -- reactions ------------------------------------------------------------

    async def _reaction(self, event: dict, added: bool) -> None:
        why = problem(event, REACTION_FIELDS, ("user", "reaction", "item"))
        item = event.get("item") if why is None else None
        if item is not None and item.get("type") != "message":      # on a file, a file comment
            return
        why = why or problem(item, ITEM_FIELDS, ("channel", "ts"))
        if why is not None:
            log.warning("slack: skipped a malformed %s event: %s", _kind(event), why)
            return
        user, emoji = event["user"], event["reaction"]
        is_bot = user == self.bot_user_id
        if not is_bot and self.core.is_voting_emoji(emoji):   # only voting emoji cost a lookup
            info = await self._user(user)
            is_bot = bool(info and (info.get("is_bot") or info.get("id") == "USLACKBOT"))
        outcome = await self.core.on_reaction(Reaction(
            platform=PLATFORM, channel_id=item["channel"], message_id=message_key(item["channel"], item["ts"]),
            user_id=user, emoji=emoji, added=added, user_is_bot=is_bot, at=_event_time(event)))
        log.debug("slack: reaction :%s: on %s/%s by %s: %s", emoji, item["channel"], item["ts"], user, outcome)

    async def _on_reaction_added(self, event: dict) -> None:
        await self._reaction(event, True)

    async def _on_reaction_removed(self, event: dict) -> None:
        await self._reaction(event, False)

    # -- votes given or taken back while the bot was away ----------------------

    async def _on_socket_message(self, _client, message: dict, _raw: str) -> None:
        """Every Socket Mode frame; a ``hello`` opens each connection: the first, and each
        reconnect (Slack's refresh, a dropped socket), after which the votes are reconciled."""
        if isinstance(message, dict) and message.get("type") == "hello":
            self._hellos += 1
            self._backfill.ask("connecting" if self._hellos == 1 else "a Socket Mode reconnect")

    async def backfill(self, why: str = "a request") -> tuple[int, int, int]:
        """Votes on the recent replies made what ``reactions.get`` says now (``ChatCore.backfill_votes``)."""
        return await self.core.backfill_votes(PLATFORM, self._reactions_on, why)

    async def _reactions_on(self, _channel: str, keys: list[str]) -> list[Reaction] | None:
        """Every voting reaction on the messages (``channel:ts`` keys) of one reply, as
        ``reactions.get`` lists them now; None when one can't be read (deleted, no access, a
        malformed answer): that reply's votes stay as they are."""
        out: list[Reaction] = []
        for key in keys:
            channel, _, ts = key.partition(":")
            try:
                resp = await self.client.reactions_get(channel=channel, timestamp=ts, full=True)
            except SlackApiError as e:
                log.warning("slack: left the votes on reply message %s as they are: %s", key, e.response.get("error"))
                return None
            message = resp.get("message")
            listed = message.get("reactions", []) if isinstance(message, dict) else None
            if not isinstance(listed, list):
                log.warning("slack: left the votes on reply message %s as they are: reactions.get answered no "
                            "message", key)
                return None
            for item in listed:
                name, users = (item.get("name"), item.get("users")) if isinstance(item, dict) else (None, None)
                if not isinstance(name, str) or not isinstance(users, list) or not self.core.is_voting_emoji(name):
                    continue
                for user in users:
                    if isinstance(user, str) and user:
                        out.append(Reaction(platform=PLATFORM, channel_id=channel, message_id=key, user_id=user,
                                            emoji=name, added=True, user_is_bot=await self._is_bot_user(user)))
        return out

    async def _is_bot_user(self, user: str) -> bool:
        """The bot itself, or a user users.info says is a bot (Slackbot too)."""
        if user == self.bot_user_id:
            return True
        info = await self._user(user)
        return bool(info and (info.get("is_bot") or info.get("id") == "USLACKBOT"))

    # -- the slash command ----------------------------------------------------

    async def _on_command(self, ack, command: dict, respond) -> None:
        await ack()          # within Slack's 3 s; the answer follows through response_url
        text = command.get("text")
        parsed = parse_command(text if isinstance(text, str) else "")
        if parsed is None or not parsed[0]:
            await respond(text=escape(USAGE.format(cmd=self.command_name)), response_type="ephemeral")
            return
        name, args = parsed
        user = command.get("user_id")
        user = user if isinstance(user, str) else ""
        info = await self._user(user)
        result = await self.core.on_command(Command(
            PLATFORM, command.get("channel_id", ""), user, name, args,
            is_platform_admin=bool(info and (info.get("is_admin") or info.get("is_owner")
                                             or info.get("is_primary_owner"))),
            prefix=f"{self.command_name} "))     # one slash command with sub-commands: "/reactlearn rollback"
        for chunk in split_text(escape(result.text), self.cfg.slack.message_chars):
            await respond(text=chunk, response_type="ephemeral")
        if result.image and user:
            channel = command.get("channel_id")
            await self._send_chart(user, channel if isinstance(channel, str) else "", result.image, respond)

    async def _send_chart(self, user: str, channel: str, path: str, respond) -> None:
        """Upload the chart at ``path`` into ``user``'s DM with the bot; when the command was
        typed elsewhere, an ephemeral line says where it went. A failure (a missing scope:
        files:write, im:write; the upload refused; the file unreadable) is one warning, with
        Slack's reason; the text answer has gone out already.

        Why the DM: the answer is ephemeral, and neither ``response_url`` nor
        chat.postEphemeral can carry a file. Shared into the channel (completeUploadExternal
        ``channel_id``) the chart would be seen by every member; uploaded without a channel it
        is private to its uploader, the bot, so a link to it in an ephemeral message would open
        for no one else. The DM (conversations.open with the user) is the one conversation only
        the person and the bot are in."""
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
            opened = await self.client.conversations_open(users=user)
            dm = (opened.get("channel") or {}).get("id")
            if not isinstance(dm, str) or not dm:
                raise SlackClientError(f"conversations.open answered no channel id for {user}")
            await self.client.files_upload_v2(channel=dm, file=data, filename=CHART_FILENAME, title=CHART_TITLE,
                                              alt_txt=CHART_ALT)
        except SlackApiError as e:
            needed = e.response.get("needed")
            log.warning("slack: the /status chart was not sent to %s: %s%s", user, e.response.get("error"),
                        f" (the app lacks the {needed} scope: update it from deploy/slack-manifest.yaml "
                        "and reinstall)" if needed else "")
            return
        except (SlackClientError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:  # the POST, network, file
            log.warning("slack: the /status chart was not sent to %s: %s", user, e)
            return
        if dm != channel:
            await respond(text=f"The chart is in your direct messages with <@{self.bot_user_id}>.",
                          response_type="ephemeral")

    # -- trainer results --------------------------------------------------------

    async def post(self, channel_id: str, text: str) -> None:
        """Post a trainer result where the retrain was asked. Raises on errors worth retrying."""
        for chunk in split_text(escape(text), self.cfg.slack.message_chars):
            try:
                await self.client.chat_postMessage(channel=channel_id, text=chunk, unfurl_links=False,
                                                   unfurl_media=False)
            except SlackApiError as e:
                error = e.response.get("error")
                if error in PERMANENT_ERRORS:
                    log.warning("slack: dropped a trainer result for %s: %s (invite the bot to the channel)",
                                channel_id, error)
                    return
                raise
