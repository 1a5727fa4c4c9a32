"""The fake's gateway websocket (served at ``ws://127.0.0.1:PORT/``): HELLO, IDENTIFY (READY +
GUILD_CREATE), heartbeat ACKs, RESUME with a replay of missed dispatches, RECONNECT (op 7) and
server-side drops, and DISPATCH to every live session, filtered by the session's intents the
way Discord filters them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from typing import Any, Dict, List, Optional, Tuple

from aiohttp import WSMsgType, web

from .rest import error
from .state import sid

log = logging.getLogger(__name__)

# gateway intents
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_GUILD_MESSAGE_REACTIONS = 1 << 10
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_DIRECT_MESSAGE_REACTIONS = 1 << 13
INTENT_MESSAGE_CONTENT = 1 << 15


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


class GatewayMixin:
    """The gateway half of :class:`~tests.fakes.discord.FakeDiscord`.

    Test-facing: ``connected``, :meth:`dispatch`, :meth:`request_reconnect`,
    :meth:`drop_connections`, :meth:`invalidate_sessions`, ``identify_count``, ``resume_count`` and ``gateway_log``
    (``(direction, op, event_name)`` of gateway traffic). Relies on the world
    (``guild_payload`` ...), ``token``, ``gateway_url``, ``enforce_intents``,
    ``heartbeat_interval_ms``, ``internal_errors`` and ``_bump`` of the composed class.
    """

    def _init_gateway(self) -> None:
        self.gateway_log: List[Tuple[str, Any, Optional[str]]] = []
        self._sessions: Dict[str, _Session] = {}
        self._ws_conns: set = set()
        self._server_closed: set = set()  # sockets we closed ourselves (resumable)
        self.identify_count = 0
        self.resume_count = 0

    def _add_gateway_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/", self._gateway_handler)

    async def _close_gateway(self) -> None:
        for sess in self._sessions.values():
            sess.alive = False
        for ws in list(self._ws_conns):
            with contextlib.suppress(Exception):
                await ws.close(code=1001, message=b"fake discord shutting down")

    # ------------------------------------------------------------------ test-facing

    @property
    def connected(self) -> bool:
        """True while at least one identified session has an open websocket."""
        return any(s.alive and s.ws is not None and not s.ws.closed for s in self._sessions.values())

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

    async def request_reconnect(self) -> None:
        """Send op 7 RECONNECT to connected clients; discord.py then reconnects to
        ``resume_gateway_url`` and RESUMEs (missed dispatches are replayed)."""
        for sess in list(self._sessions.values()):
            if sess.alive and sess.ws is not None and not sess.ws.closed:
                await self._send_raw(sess.ws, {"op": 7, "d": None})

    async def invalidate_sessions(self) -> None:
        """End every session for good and drop its socket: the client's RESUME is answered
        with op 9 INVALID_SESSION (not resumable), so it IDENTIFIES afresh and gets a new
        READY; the dispatches it missed are never replayed, as after a long outage."""
        for sess in self._sessions.values():
            sess.alive = False
        await self.drop_connections()

    async def drop_connections(self, code: int = 4000) -> None:
        """Close every gateway websocket from the server side with ``code``
        (4000 = resumable error; the client reconnects and RESUMEs)."""
        for ws in list(self._ws_conns):
            self._server_closed.add(ws)
            with contextlib.suppress(Exception):
                await ws.close(code=code)

    # ------------------------------------------------------------------ protocol

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

    async def _send_raw(self, ws: web.WebSocketResponse, payload: Dict[str, Any]) -> None:
        self.gateway_log.append(("out", payload.get("op"), payload.get("t")))
        if not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_str(json.dumps(payload))

    async def _gateway_handler(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return error(400, 0, "fake gateway: websocket upgrade expected")
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
            await self._identify(ws, d, holder)
        elif op == 6:  # resume
            await self._resume(ws, d, holder)
        elif op in (3, 4):  # presence / voice state: accepted, ignored
            pass
        else:
            log.warning("fake gateway: unhandled op %s: %s", op, payload)

    async def _identify(self, ws: web.WebSocketResponse, d: Dict[str, Any], holder: Dict[str, Optional[_Session]]) -> None:
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
                "guilds": [{"id": sid(self.guild_id), "unavailable": True}],
                "session_id": sess.session_id,
                "resume_gateway_url": self.gateway_url,
                "session_type": "normal",
                "application": {"id": sid(self.app_id), "flags": 0},
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

    async def _resume(self, ws: web.WebSocketResponse, d: Dict[str, Any], holder: Dict[str, Optional[_Session]]) -> None:
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
