"""Plain, typed payloads that adapters build from platform events.

The chat core only ever sees these, so it never imports a chat SDK. Ids are strings
on every platform (Discord snowflakes are turned into str; Slack ids and ts are str).

Every text a payload carries is valid Unicode once built (``clean_text``): a lone surrogate
(JSON's ``"\\ud800"`` escape decodes to one, and so does invalid UTF-8 read with Python's
``surrogateescape``) would make SQLite and the tokenizer raise, so it becomes U+FFFD here,
the one place where platform text enters the core. NUL and other control characters are kept
as written: SQLite, the tokenizer and the chat template take them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields


def clean_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD (a surrogate pair written as two
    code points becomes the character it encodes); any other ``str`` is returned as it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _clean(value):
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_clean(v) for v in value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    return value


class _Clean:
    """Every field of the (frozen) payload passed through ``clean_text`` once it is built."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            cleaned = _clean(value)
            if cleaned is not value:
                object.__setattr__(self, f.name, cleaned)


@dataclass(frozen=True)
class Message(_Clean):
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
class HistoryItem(_Clean):
    """An earlier message in the channel or thread, oldest first when in a list.

    ``author_id`` (the platform's user id; '' when the adapter can't say) and ``message_id``
    (the platform message id, as the store keys it) say whose words a reply's context holds:
    the core records them with the reply so that ``/forget`` deletes exactly the replies whose
    context held a person's messages or the bot's replies to them."""

    author_name: str
    text: str
    from_bot: bool
    author_id: str = ""
    message_id: str = ""


@dataclass(frozen=True)
class Reaction(_Clean):
    """An emoji added to or removed from a message (cached or not)."""

    platform: str
    channel_id: str
    message_id: str
    user_id: str
    emoji: str
    added: bool
    user_is_bot: bool = False
    at: float | None = None          # when the platform says it happened (Slack: event_ts), if it says so


@dataclass(frozen=True)
class Command(_Clean):
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
class CommandResult(_Clean):
    text: str
    ok: bool
    image: str | None = None      # a PNG to attach where the platform can (/status's chart)
