"""Application commands and interactions: the bot syncing its commands (``PUT .../commands``),
a person invoking a synced slash command (:meth:`InteractionsMixin.slash`, with Discord's
permission and DM rules), and the bot's answers: the interaction callback, followups and edits
of the original response, all collected in an :class:`InteractionRecord`."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from aiohttp import web

from .rest import API_PREFIX, error, json_response, no_content, read_body, validate_message_body
from .state import (ADMIN_ROLE_ID, ADMINISTRATOR, ALL_PERMISSIONS, BOB_ID, BOT_ID, EVERYONE_ROLE_ID, GENERAL_ID,
                    iso, sid)

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


class SlashNotPermitted(PermissionError):
    """Raised by :meth:`InteractionsMixin.slash` when real Discord would not let the user
    invoke the command (``default_member_permissions`` not satisfied, or the
    command is not available in DMs)."""


@dataclass
class InteractionRecord:
    """One slash-command invocation made with :meth:`InteractionsMixin.slash`.

    The fake fills it in as the bot answers:

    * ``response``: the raw callback body ``{"type": .., "data": {..}}`` (first
      acknowledgement), ``None`` until the bot responds.
    * ``original``: the ``@original`` message (created by callback type 4/5,
      updated by ``PATCH .../messages/@original``); for a deferred response it
      carries the LOADING flag until edited.
    * ``followups``: messages posted with ``POST /webhooks/{app}/{token}``.
    * ``original_edits``: raw bodies of PATCHes to ``@original``.
    * ``extra_callbacks``: callbacks after the first (each answered with 400, code 40060).
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
        """Visible messages produced so far: the original (unless still loading),
        then followups in order."""
        out: List[Dict[str, Any]] = []
        if self.original is not None and not (int(self.original.get("flags") or 0) & FLAG_LOADING):
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


class InteractionsMixin:
    """The application-command half of :class:`~tests.fakes.discord.FakeDiscord`.

    Test-facing: :meth:`slash`, :meth:`find_command`, the ``wait_*`` helpers below,
    ``synced_commands`` (scope -> command dicts as last synced; scope ``None`` is global,
    the guild id (int) a guild) and ``interactions`` (every :class:`InteractionRecord`).
    Relies on the world, ``dispatch``, ``wait_for``, ``_attachments`` and ``_bump`` of the
    composed class.
    """

    def _init_interactions(self) -> None:
        self.synced_commands: Dict[Optional[int], List[Dict[str, Any]]] = {}
        self.sync_count = 0
        self._last_synced_scope: Optional[int] = None
        self.interactions: List[InteractionRecord] = []
        self._interactions_by_token: Dict[str, InteractionRecord] = {}
        self._interactions_by_id: Dict[int, InteractionRecord] = {}
        self._command_ids: Dict[Tuple[Optional[int], str, int], int] = {}
        self.command_permissions: Dict[int, List[Dict[str, Any]]] = {}   # command id -> overrides

    def _add_interaction_routes(self, router: web.UrlDispatcher) -> None:
        p = API_PREFIX
        router.add_put(p + "/applications/{app}/commands", self._h_put_commands)
        router.add_put(p + "/applications/{app}/guilds/{gid}/commands", self._h_put_commands)
        router.add_post(p + "/interactions/{iid}/{token}/callback", self._h_interaction_callback)
        router.add_post(p + "/webhooks/{app}/{token}", self._h_followup)
        router.add_patch(p + "/webhooks/{app}/{token}/messages/{mid}", self._h_webhook_edit)

    # ------------------------------------------------------------------ command sync

    def find_command(self, name: str, guild_id: Optional[int] = None) -> Dict[str, Any]:
        """Synced top-level command by name: guild scope first, then global."""
        for scope in ([guild_id] if guild_id is not None else []) + [None]:
            for cmd in self.synced_commands.get(scope, []):
                if cmd["name"] == name and int(cmd.get("type", 1)) == 1:
                    return cmd
        known = {scope: [c["name"] for c in cmds] for scope, cmds in self.synced_commands.items()}
        raise LookupError(f"slash command {name!r} not synced (synced: {known}); did the bot call tree.sync()?")

    def set_command_permissions(self, name: str, permissions: List[Dict[str, Any]]) -> None:
        """What a server admin sets under Server Settings -> Integrations: who may use the
        guild command ``name`` beyond its ``default_member_permissions``, as Discord's
        application command permissions ``[{"id": role or user id, "type": 1 (role) | 2
        (user), "permission": bool}]`` (the ``@everyone`` role's id is the guild id). Discord
        takes these only with a user's Bearer token (PUT .../commands/{id}/permissions), so
        no bot can set them; tests set them here. A user's override beats their roles';
        an allowing role beats a denying one; with no override, the defaults apply."""
        cmd = self.find_command(name, self.guild_id)
        self.command_permissions[int(cmd["id"])] = [dict(p) for p in permissions]

    def _permission_override(self, cmd: Dict[str, Any], user_id: int, roles: List[str]) -> Optional[bool]:
        """The overrides' verdict for ``user_id`` with ``roles`` on ``cmd``: True, False, or None."""
        overrides = self.command_permissions.get(int(cmd["id"]), [])
        for o in overrides:
            if int(o["type"]) == 2 and int(o["id"]) == user_id:
                return bool(o["permission"])
        member_roles = {int(r) for r in roles} | {int(self.guild_id)}
        verdicts = [bool(o["permission"]) for o in overrides if int(o["type"]) == 1 and int(o["id"]) in member_roles]
        return (True in verdicts) if verdicts else None

    def _materialize_command(self, scope: Optional[int], body: Dict[str, Any]) -> Dict[str, Any]:
        ctype = int(body.get("type", 1))
        key = (scope, body["name"], ctype)
        cid = self._command_ids.setdefault(key, self.snowflake())
        cmd = dict(body)
        cmd.update(
            {
                "id": sid(cid),
                "application_id": sid(self.app_id),
                "version": sid(self.snowflake()),
                "type": ctype,
                "description": body.get("description", ""),
                "default_member_permissions": body.get("default_member_permissions"),
                "nsfw": bool(body.get("nsfw", False)),
            }
        )
        if scope is not None:
            cmd["guild_id"] = sid(scope)
        else:
            cmd.pop("guild_id", None)
            cmd.setdefault("contexts", None)
            cmd.setdefault("integration_types", [0])
        return cmd

    async def _h_put_commands(self, request: web.Request) -> web.Response:
        if request.match_info["app"] != sid(self.app_id):
            return error(403, 50001, "Missing Access")
        gid = request.match_info.get("gid")
        if gid is not None and gid != sid(self.guild_id):
            return error(403, 50001, "Missing Access")
        scope = int(gid) if gid is not None else None
        body = await request.json()
        names = [(c["name"], int(c.get("type", 1))) for c in body]
        if len(set(names)) != len(names):
            return error(400, 50035, "Invalid Form Body", {"_errors": [{"code": "APPLICATION_COMMANDS_DUPLICATE_NAME", "message": "duplicate"}]})
        cmds = [self._materialize_command(scope, c) for c in body]
        self.synced_commands[scope] = cmds
        self.sync_count += 1
        self._last_synced_scope = scope
        return json_response(cmds)

    # ------------------------------------------------------------------ invoking a command

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
            roles = [r for r in member["roles"] if r != sid(ADMIN_ROLE_ID)]
            has_admin_role = sid(ADMIN_ROLE_ID) in member["roles"]
            if admin or (admin is None and has_admin_role):
                roles.append(sid(ADMIN_ROLE_ID))
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
            override = self._permission_override(cmd, user_id, roles) if user_id != self.owner_id else None
            if override is False:
                raise SlashNotPermitted(f"/{name}: user {user_id} is denied it by the command's permissions")
            # "0" means: nobody but administrators (all permission bits)
            if override is None and required is not None and (
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
            "id": sid(iid),
            "application_id": sid(self.app_id),
            "type": 2,
            "data": data,
            "token": token,
            "version": 1,
            "locale": locale,
            "entitlements": [],
            "attachment_size_limit": 8 * 1024 * 1024,
            "app_permissions": str(self.member_permissions(BOT_ID) if in_guild else 0),
            "channel_id": sid(channel_id),
        }
        if in_guild:
            chan = dict(ch)
            chan["permissions"] = str(perms)
            payload.update(
                {
                    "guild_id": sid(self.guild_id),
                    "guild": {"id": sid(self.guild_id), "locale": "en-US", "features": []},
                    "guild_locale": "en-US",
                    "channel": chan,
                    "member": member,
                    "context": 0,
                    "authorizing_integration_owners": {"0": sid(self.guild_id)},
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

    # ------------------------------------------------------------------ the bot's answers

    def _interaction_message(self, record: InteractionRecord, data: Dict[str, Any], files: List[Tuple[str, str, bytes]], *, followup: bool) -> Dict[str, Any]:
        cid = record.channel_id
        content = data.get("content") or ""
        mentions, roles = self._mentions_from_content(content)
        mid = self.snowflake()
        msg: Dict[str, Any] = {
            "id": sid(mid),
            "channel_id": sid(cid),
            "author": self.user_payload(BOT_ID),
            "content": content,
            "timestamp": iso(),
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
            "application_id": sid(self.app_id),
            "webhook_id": sid(self.app_id),
            "interaction_metadata": {
                "id": sid(record.id),
                "type": 2,
                "user": self.user_payload(record.user_id),
                "authorizing_integration_owners": record.payload.get("authorizing_integration_owners", {}),
                "name": record.name,
                "command_type": 1,
                **({"original_response_message_id": record.original["id"]} if followup and record.original else {}),
            },
        }
        if record.guild_id is not None:
            msg["guild_id"] = sid(record.guild_id)
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
            return error(404, 10062, "Unknown interaction")
        record = self._interactions_by_id.get(iid)
        if record is None or record.token != request.match_info["token"]:
            return error(404, 10062, "Unknown interaction")
        body, files = await read_body(request)
        cb_type = int(body.get("type", 0))
        data = body.get("data") or {}
        if record.response is not None:
            record.extra_callbacks.append(body)
            return error(400, 40060, "Interaction has already been acknowledged.")
        if cb_type == CB_CHANNEL_MESSAGE:
            err = validate_message_body(data, bool(files))
            if err:
                return err
        record.response = body
        interaction_info: Dict[str, Any] = {"id": sid(iid), "type": 2}
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
            return error(400, 50035, f"Invalid Form Body (callback type {cb_type})")
        return json_response({"interaction": interaction_info, "resource": resource})

    def _record_for_webhook(self, request: web.Request) -> Tuple[Optional[InteractionRecord], Optional[web.Response]]:
        record = self._interactions_by_token.get(request.match_info["token"])
        if record is None or request.match_info["app"] != sid(self.app_id):
            return None, error(404, 10015, "Unknown Webhook")
        if record.response is None:  # Discord: token not usable before acknowledgement
            return None, error(404, 10015, "Unknown Webhook")
        return record, None

    async def _h_followup(self, request: web.Request) -> web.Response:
        record, err = self._record_for_webhook(request)
        if err:
            return err
        payload, files = await read_body(request)
        err = validate_message_body(payload, bool(files))
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
                    "edited_timestamp": iso(),
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
            return json_response(msg)
        return no_content()

    async def _h_webhook_edit(self, request: web.Request) -> web.Response:
        record, err = self._record_for_webhook(request)
        if err:
            return err
        assert record is not None
        mid = request.match_info["mid"]
        if mid == "@original" or (record.original is not None and mid == record.original["id"]):
            msg = record.original
        else:
            msg = next((m for m in record.followups if m["id"] == mid), None)
        if msg is None:
            return error(404, 10008, "Unknown Message")
        payload, files = await read_body(request)
        if payload.get("content") is not None and len(payload["content"]) > 2000:
            return validate_message_body(payload, True)  # type: ignore[return-value]
        for k in ("content", "embeds", "components"):
            if k in payload:
                msg[k] = payload[k] if payload[k] is not None else ("" if k == "content" else [])
        if files:
            msg["attachments"] = list(msg.get("attachments") or []) + self._attachments(record.channel_id, files)
        msg["flags"] = int(msg.get("flags") or 0) & ~FLAG_LOADING
        msg["edited_timestamp"] = iso()
        if msg is record.original:
            record.original_edits.append(payload)
        if not msg["flags"] & FLAG_EPHEMERAL and self.echo_bot_messages:
            await self.dispatch("MESSAGE_UPDATE", self._gateway_message(msg))
        return json_response(msg)

    # ------------------------------------------------------------------ waiting

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
