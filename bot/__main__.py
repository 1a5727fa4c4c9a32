"""python -m bot: load config, open the store, load the policy, run the adapter(s).

    python -m bot                       console playground (no platforms configured)
    python -m bot --config my.toml      Discord and/or Slack, as `platforms` says
    python -m bot --check-config        validate the config and exit
    python -m bot --with-trainer        also start `python -m trainer` beside the bot
    python -m bot --health-port 9321    also serve /healthz and /metrics there (bot/health.py)
    python -m bot backup PATH           copy the database to PATH, consistently, while the bot runs
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from bot import process

process.quiet_threads()      # before torch loads (bot/process.py says why)

from bot.config import Config, ConfigError, check_paths, load_config  # noqa: E402
from bot.health import HealthError  # noqa: E402
from bot.models import ModelError  # noqa: E402

log = logging.getLogger("bot")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bot", description="reactlearn chat bot")
    p.add_argument("--config", type=Path, help="TOML config file (default: $REACTLEARN_CONFIG, else built-in defaults)")
    p.add_argument("--check-config", action="store_true", help="validate the config, print a summary, exit")
    p.add_argument("--with-trainer", action="store_true", help="start the trainer process beside the bot")
    p.add_argument("--health-port", type=process.port_arg, metavar="PORT",
                   help="serve /healthz and /metrics on this port (overrides health.bot_port; 0 = off)")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", help="leave out to run the bot")
    b = commands.add_parser("backup", help="copy the database to PATH while the bot runs",
                            description="Copy the database (data_dir/reactlearn.sqlite3) to PATH with SQLite's "
                                        "online backup: consistent while the bot and trainer write, atomic.")
    b.add_argument("path", type=Path, metavar="PATH", help="the file to write (replaced atomically if it exists)")
    b.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="as above; may come after backup")
    return p.parse_args(argv)


def summary(cfg: Config) -> str:
    platforms = ", ".join(cfg.platforms) or "console playground"
    secrets = {name: ("set" if getattr(cfg, name) else "not set")
               for name in ("discord_token", "slack_bot_token", "slack_app_token")}
    return (f"config OK: platforms={platforms}; model={cfg.model.name}; data_dir={cfg.data_dir}; "
            f"secrets: {', '.join(f'{k} {v}' for k, v in secrets.items())}")


async def serve(cfg: Config) -> None:
    """Open the store, load the policy, run the console or the platforms until stopped.
    Whatever fails, the store and the policy are closed, so the process can exit."""
    from transformers.utils import logging as hf_logging

    from bot.chat import ChatCore
    from bot.health import BotHealth, HealthServer
    from bot.policy import Policy
    from bot.retention import pruning
    from bot.store import Store

    hf_logging.disable_progress_bar()
    try:
        store = await Store.open(cfg.db_path, synchronous=cfg.storage.synchronous)
    except (sqlite3.Error, OSError, RuntimeError) as e:     # RuntimeError: a schema newer than this code
        raise process.StartupError(process.store_problem(cfg.db_path, e)) from None
    server = None
    try:
        health = BotHealth(cfg, store)
        server = HealthServer(health, cfg.health.host, cfg.health.bot_port, "health.bot_port")
        if cfg.health.bot_port:
            await server.start()             # first: a taken port fails before the model loads
        log.info("store %s ready; loading model %s", cfg.db_path, cfg.model.name)
        policy = await asyncio.to_thread(Policy.from_config, cfg)
        try:
            core = ChatCore(cfg, store, policy, metrics=health)
            await core.sync_version()        # start on the registry's active version
            health.core = core               # /healthz: the model is ready
            async with pruning(store, cfg):  # storage.retention_days: old raw messages pruned hourly
                await run_platforms(cfg, core)
        finally:
            policy.close()
    finally:
        if server is not None:
            await server.stop()
        await store.close()


async def run_platforms(cfg: Config, core) -> None:
    """The console playground when no platform is configured, else Discord and/or Slack."""
    if not cfg.platforms:
        from bot.adapters.console import run_console

        await run_console(core)
        return
    runners, posters, adapters = [], {}, []
    if "discord" in cfg.platforms:
        from bot.adapters.discord import DiscordAdapter

        d = DiscordAdapter(core, cfg)
        runners.append(d.start(cfg.discord_token))
        posters["discord"] = d.post
        adapters.append(d)
    if "slack" in cfg.platforms:
        from bot.adapters.slack import SlackAdapter

        s = SlackAdapter(core, cfg)
        runners.append(s.start(cfg.slack_bot_token, cfg.slack_app_token))
        posters["slack"] = s.post
        adapters.append(s)
    try:
        await asyncio.gather(core.run_background(posters), *runners)
    finally:             # Ctrl-C / cancellation: close connections cleanly
        for adapter in adapters:
            try:
                await adapter.close()
            except Exception:  # noqa: BLE001 - closing the others matters more
                log.exception("closing %s failed", type(adapter).__name__)


def backup(cfg: Config, dest: Path) -> int:
    """`python -m bot backup PATH`: one line on stdout (what was written) or on stderr (why not)."""
    from bot.backup import cli

    code, line = cli(cfg.db_path, dest)
    if code:
        return process.fail(line, code)
    print(line)
    return 0


def stopped(e: Exception, cfg: Config) -> int:
    """The one line for an error that ended the bot: a full or read-only disk says so (no traceback),
    anything else has its traceback in the log."""
    line = process.disk_stop_line("bot", e, cfg.data_dir)
    if line:
        return process.fail(line)
    log.exception("the bot stopped")
    return process.fail(f"the bot stopped: {type(e).__name__}: {e}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, need_secrets=args.command != "backup")   # a backup connects to no chat
    except ConfigError as e:
        return process.fail(f"config error: {e}")
    if args.health_port is not None:
        cfg.health.bot_port = args.health_port
    if args.command == "backup":
        return backup(cfg, args.path)
    try:
        check_paths(cfg)
    except ConfigError as e:
        return process.fail(f"{'config error' if args.check_config else 'cannot start'}: {e}")
    if args.check_config:
        print(summary(cfg))
        return 0
    problem = process.writable_dir_problem(Path(cfg.data_dir), "data_dir")
    if problem:
        return process.fail(problem)
    # The console playground logs to data_dir/bot.log: the terminal is the chat.
    console_log = Path(cfg.data_dir).expanduser() / "bot.log"
    process.setup_logging(cfg.log_level, log_file=None if cfg.platforms else console_log)
    log.info(summary(cfg))
    trainer = None
    if args.with_trainer:
        cmd = [sys.executable, "-m", "trainer"] + (["--config", str(args.config)] if args.config else [])
        trainer_log = open(Path(cfg.data_dir).expanduser() / "trainer.log", "ab") if not cfg.platforms else None
        trainer = subprocess.Popen(cmd, env=os.environ.copy(), stdout=trainer_log, stderr=trainer_log)
        log.info("trainer started (pid %d)", trainer.pid)
    try:
        asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        pass
    except (HealthError, process.StartupError) as e:   # a taken port, a database that can't open: one line
        return process.fail(str(e))
    except ModelError as e:           # a model folder that is missing or can't be read: no traceback
        return process.fail(f"cannot start: {str(e).rstrip('.')}. Fix model.name in the config.")
    except Exception as e:  # noqa: BLE001 - whatever it is, exit non-zero with one line (Restart=on-failure)
        return stopped(e, cfg)
    finally:
        if trainer is not None:
            trainer.terminate()
            try:
                trainer.wait(timeout=30)
            except subprocess.TimeoutExpired:
                trainer.kill()
    return 0


if __name__ == "__main__":
    process.run_main(main)
