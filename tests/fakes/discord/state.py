"""The fake's in-memory Discord world: ids and permission bits, the one guild with its roles,
members and text channels, DM channels, users, messages and reactions, and the JSON payloads
Discord sends for them. No networking here: gateway.py and rest.py serve this state."""

from __future__ import annotations

import datetime as _dt
import re
import time
from typing import Any, Dict, List, Optional, Tuple

# --------------------------------------------------------------------------- ids

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

# --------------------------------------------------------------------------- permission bits

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

_MENTION_RE = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION_RE = re.compile(r"<@&(\d+)>")
_CUSTOM_EMOJI_RE = re.compile(r"^<?(?:(a):)?:?([A-Za-z0-9_~]+):(\d+)>?$")


def iso(ts: Optional[float] = None) -> str:
    """An ISO-8601 UTC timestamp (now, or unix time ``ts``), as Discord writes them."""
    return _dt.datetime.fromtimestamp(ts if ts is not None else time.time(), tz=_dt.timezone.utc).isoformat()


def sid(x: Any) -> str:
    """A snowflake as payloads carry it: a decimal string."""
    return str(int(x))


def parse_emoji(emoji: str) -> Dict[str, Any]:
    """``"👍"`` -> ``{"id": None, "name": "👍"}``; ``"name:id"`` / ``"<:name:id>"`` -> a custom emoji."""
    m = _CUSTOM_EMOJI_RE.match(emoji)
    if m and not emoji.isdigit():
        return {"id": m.group(3), "name": m.group(2), "animated": bool(m.group(1))}
    return {"id": None, "name": emoji}


def emoji_key(payload: Dict[str, Any]) -> str:
    """The key reactions are stored under: the unicode emoji, or ``name:id`` for a custom one."""
    return f"{payload['name']}:{payload['id']}" if payload.get("id") else payload["name"]


class DiscordState:
    """The world the fake serves (all plain dicts/lists, inspect freely):

    * ``users`` / ``members`` (user id -> member, without ``user``) / ``roles`` / ``channels``
    * ``messages``: channel id -> history, oldest first (user, bot and interaction messages)
    """

    def __init__(self) -> None:
        self.bot_id = BOT_ID
        self.app_id = APP_ID
        self.guild_id = GUILD_ID
        self.owner_id = OWNER_ID
        self._last_snowflake = 0

        self.users: Dict[int, Dict[str, Any]] = {}
        self.members: Dict[int, Dict[str, Any]] = {}  # user id -> member (without "user")
        self.roles: Dict[int, Dict[str, Any]] = {}
        self.channels: Dict[int, Dict[str, Any]] = {}
        self.messages: Dict[int, List[Dict[str, Any]]] = {}  # channel id -> history (oldest first)
        self._messages_by_id: Dict[int, Dict[str, Any]] = {}
        self._reactions: Dict[int, Dict[str, List[int]]] = {}  # message id -> emoji key -> user ids
        self._emoji_payloads: Dict[str, Dict[str, Any]] = {}
        self._dm_by_user: Dict[int, int] = {}
        self._build_world()

    # ------------------------------------------------------------------ ids / the guild

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
            "id": sid(role_id),
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
                "id": sid(user_id),
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
                "roles": [sid(r) for r in (roles or [])],
                "nick": None,
                "avatar": None,
                "joined_at": iso(),
                "premium_since": None,
                "deaf": False,
                "mute": False,
                "pending": False,
                "flags": 0,
                "communication_disabled_until": None,
            }
            self.members[user_id] = member
        elif roles is not None:
            member["roles"] = [sid(r) for r in roles]
        return member

    def add_text_channel(self, channel_id: int, name: str, *, position: Optional[int] = None) -> Dict[str, Any]:
        """Add a guild text channel (must be done before the client connects to be
        in GUILD_CREATE)."""
        ch = {
            "id": sid(channel_id),
            "type": 0,
            "guild_id": sid(self.guild_id),
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
            "id": sid(cid),
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

    # ------------------------------------------------------------------ payloads

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
            "id": sid(self.guild_id),
            "name": "ReactLearn Test Guild",
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": sid(self.owner_id),
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
            "system_channel_id": sid(GENERAL_ID) if GENERAL_ID in self.channels else None,
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
            "id": sid(self.app_id),
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

    # ------------------------------------------------------------------ messages

    def get_message(self, message_id: int) -> Optional[Dict[str, Any]]:
        """Stored message dict by id (any channel), or None."""
        return self._messages_by_id.get(int(message_id))

    def channel_messages(self, channel_id: int) -> List[Dict[str, Any]]:
        """History of a channel, oldest first (user + bot + interaction messages)."""
        return list(self.messages.get(int(channel_id), []))

    def _store_message(self, msg: Dict[str, Any]) -> None:
        cid = int(msg["channel_id"])
        self.messages.setdefault(cid, []).append(msg)
        self._messages_by_id[int(msg["id"])] = msg
        ch = self.channels.get(cid)
        if ch is not None:
            ch["last_message_id"] = msg["id"]

    def _remove_message(self, msg: Dict[str, Any]) -> None:
        hist = self.messages.get(int(msg["channel_id"]), [])
        if msg in hist:
            hist.remove(msg)
        self._messages_by_id.pop(int(msg["id"]), None)

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
            "id": sid(mid),
            "channel_id": sid(channel_id),
            "author": self.user_payload(author_id),
            "content": content,
            "timestamp": iso(),
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
            msg["guild_id"] = sid(self.guild_id)
        if reply_to is not None:
            ref = self._messages_by_id.get(int(reply_to))
            msg["type"] = 19
            msg["message_reference"] = {
                "type": 0,
                "message_id": sid(reply_to),
                "channel_id": sid(channel_id),
                **({} if is_dm else {"guild_id": sid(self.guild_id)}),
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

    @staticmethod
    def _delete_payload(msg: Dict[str, Any]) -> Dict[str, Any]:
        """MESSAGE_DELETE payload."""
        d = {"id": msg["id"], "channel_id": msg["channel_id"]}
        if "guild_id" in msg:
            d["guild_id"] = msg["guild_id"]
        return d

    # ------------------------------------------------------------------ reactions

    def reactions_on(self, message_id: int) -> Dict[str, List[int]]:
        """Current reactions on a message: emoji key -> list of user ids
        (emoji key is the unicode char, or ``name:id`` for custom emoji)."""
        return {k: list(v) for k, v in self._reactions.get(int(message_id), {}).items() if v}

    def _set_reaction(self, message_id: int, user_id: int, emoji: str, add: bool) -> bool:
        """Add or remove ``user_id``'s reaction; returns whether anything changed."""
        payload = parse_emoji(emoji)
        key = emoji_key(payload)
        self._emoji_payloads.setdefault(key, payload)
        users = self._reactions.setdefault(int(message_id), {}).setdefault(key, [])
        if add and user_id not in users:
            users.append(user_id)
            return True
        if not add and user_id in users:
            users.remove(user_id)
            return True
        return False

    def _reaction_payload(self, channel_id: int, message_id: int, user_id: int, emoji: str, add: bool) -> Dict[str, Any]:
        """MESSAGE_REACTION_ADD / _REMOVE payload."""
        d: Dict[str, Any] = {
            "user_id": sid(user_id),
            "channel_id": sid(channel_id),
            "message_id": sid(message_id),
            "emoji": dict(parse_emoji(emoji)),
            "burst": False,
            "type": 0,
        }
        if not self.is_dm(channel_id):
            d["guild_id"] = sid(self.guild_id)
        if add:
            d["burst_colors"] = []
            msg = self._messages_by_id.get(int(message_id))
            if msg is not None:
                d["message_author_id"] = msg["author"]["id"]
            if "guild_id" in d:
                d["member"] = self.member_payload(user_id)
        return d
