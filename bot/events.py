"""Plain, typed payloads that adapters build from platform events.

The chat core only ever sees these, so it never imports a chat SDK. Ids are strings
on every platform (Discord snowflakes are turned into str; Slack ids and ts are str).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Message:
    """Someone wrote something where the bot can see it."""

    platform: str
    message_id: str
    channel_id: str
    author_id: str
    author_name: str
    text: str
    author_is_bot: bool = False
    is_dm: bool = False
    mentions_bot: bool = False
    replies_to_bot: bool = False     # a reply to one of the bot's messages / a post in the bot's thread
    rate_limited: bool = True        # False in the console playground, where one person is the audience


@dataclass(frozen=True)
class HistoryItem:
    """An earlier message in the channel or thread, oldest first when in a list."""

    author_name: str
    text: str
    from_bot: bool


@dataclass(frozen=True)
class Reaction:
    """An emoji added to or removed from a message (cached or not)."""

    platform: str
    channel_id: str
    message_id: str
    user_id: str
    emoji: str
    added: bool
    user_is_bot: bool = False


@dataclass(frozen=True)
class Command:
    """An admin/user command: retrain, status, rollback, forget."""

    platform: str
    channel_id: str
    user_id: str
    name: str
    args: dict = field(default_factory=dict)
    is_platform_admin: bool = False   # Discord: Manage Server; Slack: workspace admin/owner; the console: always
    role_ids: tuple[str, ...] = ()
    prefix: str = "/"                 # how commands are typed here: "/" ("/rollback"), Slack "/reactlearn "

    def typed(self, name: str) -> str:
        """Command ``name`` as people type it on this platform, for help and error texts."""
        return f"{self.prefix}{name}"


@dataclass(frozen=True)
class CommandResult:
    text: str
    ok: bool
    image: str | None = None      # a PNG to attach where the platform can (/status's chart)
