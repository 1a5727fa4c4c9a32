"""The fake's HTTP REST API under ``/api/v10``: the request middleware (bot-token auth, the
request log, bugs inside the fake answered as HTTP 400), Discord-shaped JSON errors, the routes
discord.py calls for what the tests do (login, posting, editing and fetching messages, history,
the bot's own reactions, typing, opening a DM), a knob that makes chosen routes fail, and a 404
for every other route."""

from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from aiohttp import web

from .state import BOT_ID, emoji_key, iso, parse_emoji, sid

log = logging.getLogger(__name__)

API_PREFIX = r"/api/v{version:\d+}"


def json_response(data: Any, status: int = 200) -> web.Response:
    # NB: discord.py only parses JSON if Content-Type is *exactly* "application/json";
    # web.json_response() appends "; charset=utf-8" which makes it return a str.
    return web.Response(status=status, body=json.dumps(data).encode(), headers={"Content-Type": "application/json"})


def error(status: int, code: int, message: str, errors: Optional[dict] = None) -> web.Response:
    """A Discord error body: ``{"message", "code"[, "errors"]}``."""
    body: Dict[str, Any] = {"message": message, "code": code}
    if errors:
        body["errors"] = errors
    return json_response(body, status)


def no_content() -> web.Response:
    return web.Response(status=204)


def validate_message_body(payload: Dict[str, Any], has_files: bool) -> Optional[web.Response]:
    """Discord's 400s for a message body: content over 2000 characters, or nothing to send."""
    content = payload.get("content")
    if content is not None and len(content) > 2000:
        return error(
            400,
            50035,
            "Invalid Form Body",
            {"content": {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}},
        )
    if not (content or payload.get("embeds") or payload.get("components") or payload.get("sticker_ids") or payload.get("poll") or has_files):
        return error(400, 50006, "Cannot send an empty message")
    return None


async def read_body(request: web.Request) -> Tuple[Dict[str, Any], List[Tuple[str, str, bytes]]]:
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


class RestMixin:
    """The REST half of :class:`~tests.fakes.discord.FakeDiscord`.

    Test-facing records: ``requests`` (``(method, path)`` of every REST request, path
    relative to ``/api/v10``), ``unknown_requests`` (those no route matched),
    ``bot_messages`` (what the bot POSTed to channels, DMs included), ``reactions_by_bot``
    (``{"channel_id", "message_id", "emoji", "action"}``, action ``"add"``),
    ``typing_calls`` (channel ids), ``message_edits`` (each successful ``PATCH`` of a
    message: ``{"channel_id", "message_id", "content", "at"}``, ``at`` from time.monotonic)
    and ``failed_requests`` (``(method, path)`` answered with an error by :meth:`fail`).
    A message the bot posted is a live dict: an edit changes it in ``bot_messages`` too, and
    :meth:`content_history` keeps what it said before. Relies on the world, ``dispatch``,
    ``_apply_reaction``, ``internal_errors`` and ``_bump`` of the composed class.
    """

    def _init_rest(self) -> None:
        self.requests: List[Tuple[str, str]] = []
        self.unknown_requests: List[Tuple[str, str]] = []
        self.bot_messages: List[Dict[str, Any]] = []
        self.reactions_by_bot: List[Dict[str, Any]] = []
        self.typing_calls: List[int] = []
        self.message_edits: List[Dict[str, Any]] = []
        self.failed_requests: List[Tuple[str, str]] = []
        self._failures: List[Dict[str, Any]] = []
        self._content_history: Dict[int, List[str]] = {}

    def bot_messages_in(self, channel_id: int) -> List[Dict[str, Any]]:
        return [m for m in self.bot_messages if int(m["channel_id"]) == int(channel_id)]

    def content_history(self, message_id: Union[int, str]) -> List[str]:
        """A message's content as posted, then after each edit, oldest first."""
        msg = self.get_message(int(message_id))
        current = [msg["content"]] if msg is not None else []
        return list(self._content_history.get(int(message_id), current))

    def edits_of(self, message_id: Union[int, str]) -> List[Dict[str, Any]]:
        """The successful edits of one message, oldest first."""
        return [e for e in self.message_edits if e["message_id"] == int(message_id)]

    def fail(self, method: str, path: str, *, status: int = 403, code: int = 50013,
             message: str = "Missing Permissions", times: Optional[int] = None) -> None:
        """Answer requests ``method`` on paths matching the regex ``path`` (relative to
        ``/api/v10``, e.g. ``"/channels/[0-9]+/messages/[0-9]+"``) with a Discord error, the
        next ``times`` of them (None: all until :meth:`clear_failures`). Not a 429 or 5xx,
        which discord.py would retry."""
        self._failures.append({"method": method.upper(), "path": re.compile(path), "left": times,
                               "status": status, "code": code, "message": message})

    def clear_failures(self) -> None:
        self._failures.clear()

    def _failure_for(self, method: str, rel: str) -> Optional[web.Response]:
        for f in self._failures:
            if f["method"] == method and f["path"].fullmatch(rel) and f["left"] != 0:
                if f["left"] is not None:
                    f["left"] -= 1
                self.failed_requests.append((method, rel))
                return error(f["status"], f["code"], f["message"])
        return None

    # ------------------------------------------------------------------ plumbing

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        path = request.path
        if path.startswith("/api/"):
            rel = re.sub(r"^/api/v\d+", "", path)
            self.requests.append((request.method, rel))
            needs_auth = not (rel.startswith("/interactions/") or rel.startswith("/webhooks/"))
            if needs_auth and self.token is not None and request.headers.get("Authorization") != f"Bot {self.token}":
                await self._bump()
                return error(401, 0, "401: Unauthorized")
            failure = self._failure_for(request.method, rel)
            if failure is not None:
                await self._bump()
                return failure
        try:
            resp = await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            log.exception("fake discord REST handler error for %s %s", request.method, path)
            self.internal_errors.append(f"{request.method} {path}: {exc!r}")
            resp = error(400, 0, f"fake discord internal error: {exc!r}")
        await self._bump()
        return resp

    def _add_rest_routes(self, router: web.UrlDispatcher) -> None:
        p = API_PREFIX
        router.add_get(p + "/users/@me", self._h_me)
        router.add_get(p + "/oauth2/applications/@me", self._h_application)
        router.add_post(p + "/users/@me/channels", self._h_create_dm)
        router.add_get(p + "/channels/{cid}", self._h_get_channel)
        router.add_post(p + "/channels/{cid}/messages", self._h_post_message)
        router.add_get(p + "/channels/{cid}/messages", self._h_history)
        router.add_get(p + "/channels/{cid}/messages/{mid}", self._h_get_message)
        router.add_patch(p + "/channels/{cid}/messages/{mid}", self._h_edit_message)
        router.add_put(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}/@me", self._h_add_own_reaction)
        router.add_get(p + "/channels/{cid}/messages/{mid}/reactions/{emoji}", self._h_reaction_users)
        router.add_post(p + "/channels/{cid}/typing", self._h_typing)

    def _add_unknown_route(self, router: web.UrlDispatcher) -> None:
        """Last: every route the fake lacks answers 404 and is recorded."""
        router.add_route("*", "/{tail:.*}", self._h_unknown)

    async def _h_unknown(self, request: web.Request) -> web.Response:
        rel = re.sub(r"^/api/v\d+", "", request.path)
        self.unknown_requests.append((request.method, rel))
        log.warning("fake discord: no route for %s %s", request.method, request.path_qs)
        return error(404, 0, f"fake discord: unknown route {request.method} {rel}")

    def _attachments(self, channel_id: int, files: List[Tuple[str, str, bytes]]) -> List[Dict[str, Any]]:
        """Attachment payloads for uploaded files (metadata only: the fake does not serve the URLs)."""
        out = []
        for filename, ctype, data in files:
            aid = self.snowflake()
            url = f"http://127.0.0.1:{self.port}/attachments/{channel_id}/{aid}/{urllib.parse.quote(filename)}"
            out.append(
                {"id": sid(aid), "filename": filename, "size": len(data), "url": url, "proxy_url": url, "content_type": ctype}
            )
        return out

    def _check_channel(self, request: web.Request) -> Tuple[Optional[int], Optional[web.Response]]:
        try:
            cid = int(request.match_info["cid"])
        except ValueError:
            return None, error(404, 10003, "Unknown Channel")
        if cid not in self.channels:
            return None, error(404, 10003, "Unknown Channel")
        return cid, None

    def _check_message(self, cid: int, mid_raw: str) -> Tuple[Optional[Dict[str, Any]], Optional[web.Response]]:
        try:
            mid = int(mid_raw)
        except ValueError:
            return None, error(404, 10008, "Unknown Message")
        msg = self._messages_by_id.get(mid)
        if msg is None or int(msg["channel_id"]) != cid:
            return None, error(404, 10008, "Unknown Message")
        return msg, None

    # ------------------------------------------------------------------ login

    async def _h_me(self, request: web.Request) -> web.Response:
        return json_response(self._bot_user_full())

    async def _h_application(self, request: web.Request) -> web.Response:
        return json_response(self._application_payload())

    # ------------------------------------------------------------------ channels and messages

    async def _h_create_dm(self, request: web.Request) -> web.Response:
        body = await request.json()
        uid = int(body["recipient_id"])
        if uid not in self.users:
            return error(400, 50033, "Invalid Recipient(s)")
        return json_response(dict(self.channels[self.dm_channel_id(uid)]))

    async def _h_get_channel(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err is not None:
            return err
        return json_response(self.channels[cid])

    async def _h_post_message(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        payload, files = await read_body(request)
        err = validate_message_body(payload, bool(files))
        if err:
            return err
        reply_to = None
        ref = payload.get("message_reference")
        if ref and ref.get("message_id"):
            reply_to = int(ref["message_id"])
            target = self._messages_by_id.get(reply_to)
            if target is None or int(target["channel_id"]) != cid:
                if ref.get("fail_if_not_exists", True):
                    return error(
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
        return json_response(msg)

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
        return json_response([self._message_view(m) for m in reversed(msgs)])  # newest first

    async def _h_get_message(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        return json_response(self._message_view(msg))

    async def _h_edit_message(self, request: web.Request) -> web.Response:
        """``PATCH /channels/{cid}/messages/{mid}``: the bot edits one of its messages (content,
        embeds, components, flags); over 2000 characters or nothing left -> 400, like Discord."""
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        if int(msg["author"]["id"]) != BOT_ID:
            return error(403, 50005, "Cannot edit a message authored by another user")
        payload, files = await read_body(request)
        edited = {**msg, **{k: payload[k] for k in ("content", "embeds", "components") if k in payload}}
        err = validate_message_body({k: edited.get(k) for k in ("content", "embeds", "components")},
                                    bool(files or msg.get("attachments")))
        if err:
            return err
        mid = int(msg["id"])
        self._content_history.setdefault(mid, [msg["content"]])
        for key, default in (("content", ""), ("embeds", []), ("components", []), ("flags", 0)):
            if key in payload:
                msg[key] = payload[key] if payload[key] is not None else default
        if files:
            msg["attachments"] = list(msg.get("attachments") or []) + self._attachments(cid, files)
        msg["edited_timestamp"] = iso()
        self._content_history[mid].append(msg["content"])
        self.message_edits.append({"channel_id": cid, "message_id": mid, "content": msg["content"],
                                   "at": time.monotonic()})
        if self.echo_bot_messages:
            await self.dispatch("MESSAGE_UPDATE", self._gateway_message(self._message_view(msg)))
        return json_response(self._message_view(msg))

    async def _h_add_own_reaction(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        emoji = request.match_info["emoji"]
        if parse_emoji(emoji)["id"] is None and (not emoji or emoji.isascii()):
            return error(400, 10014, "Unknown Emoji")
        self.reactions_by_bot.append(
            {"channel_id": cid, "message_id": int(msg["id"]), "emoji": emoji, "action": "add"}
        )
        await self._apply_reaction(cid, int(msg["id"]), BOT_ID, emoji, True)
        return no_content()

    async def _h_reaction_users(self, request: web.Request) -> web.Response:
        """``GET /channels/{cid}/messages/{mid}/reactions/{emoji}?limit=&after=``: the users who
        reacted with ``emoji`` (``👍`` or ``name:id``), by id, at most ``limit`` (1-100, default
        25) after the id ``after``, like Discord; an emoji nobody used gives ``[]``."""
        cid, err = self._check_channel(request)
        if err:
            return err
        msg, err = self._check_message(cid, request.match_info["mid"])
        if err:
            return err
        q = request.query
        try:
            limit, after = int(q.get("limit", "25")), int(q.get("after", "0"))
        except ValueError:
            return error(400, 50035, "Invalid Form Body")
        if not 1 <= limit <= 100:
            return error(400, 50035, "Invalid Form Body", {"limit": {"_errors": [{"code": "NUMBER_TYPE_MAX"}]}})
        users = sorted(self.reactions_on(int(msg["id"])).get(emoji_key(parse_emoji(request.match_info["emoji"])), []))
        return json_response([self.user_payload(u) for u in users if u > after][:limit])

    async def _h_typing(self, request: web.Request) -> web.Response:
        cid, err = self._check_channel(request)
        if err:
            return err
        self.typing_calls.append(cid)
        return no_content()
