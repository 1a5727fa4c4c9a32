"""The simulation's command line: flags, their checks, and the bot and trainer configs they make."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path

# Trainer fields that the simulator sets itself (from its own flags) rather than passing through.
OWN_TRAINER_FLAGS = {"seed", "threads"}


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _trainer_fields():
    from trainer.config import TrainerConfig

    hints = typing.get_type_hints(TrainerConfig)
    return [(f, hints[f.name]) for f in dataclasses.fields(TrainerConfig) if f.name not in OWN_TRAINER_FLAGS]


def build_parser() -> argparse.ArgumentParser:
    from trainer import simulate   # the package docstring is the user documentation, shown by --help

    ap = argparse.ArgumentParser(prog="python -m trainer.simulate", description=simulate.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="training rounds (default 10)")
    ap.add_argument("--replies", type=int, default=32, help="replies per round, generated as one batch (default 32)")
    ap.add_argument("--voters", type=int, default=5,
                    help="simulated users voting on each reply (default 5: trainer.max_user_share 0.2 needs five "
                         "people in a round)")
    ap.add_argument("--flip", type=float, default=0.1, help="probability that a vote is flipped (default 0.1)")
    ap.add_argument("--vote-rate", type=float,
                    help="sparse votes: each reply gets one vote with this probability, from one person of the "
                         "crowd (replaces --voters)")
    ap.add_argument("--crowd", type=int, default=20, help="people who vote, with --vote-rate (default 20)")
    ap.add_argument("--dissent", type=float, default=0.0,
                    help="share of the crowd that votes by a random taste of its own (default 0)")
    ap.add_argument("--late", type=float, default=0.2,
                    help="share of the sparse votes that arrive only after the next round began (default 0.2)")
    ap.add_argument("--taste", default="short", help="short | coin | regex:PATTERN | python:module:function")
    ap.add_argument("--taste-after", metavar="ROUND:TASTE",
                    help="the people's taste changes to TASTE from round ROUND on, e.g. '6:regex:\\?'")
    ap.add_argument("--seed", type=int, default=0, help="seeds prompts, votes, sampling and the trainer (default 0)")
    ap.add_argument("--model", help="override model.name (a model folder, or 'default')")
    ap.add_argument("--config", type=Path, help="a reactlearn TOML file ([trainer] etc.); default: built-in defaults")
    ap.add_argument("--out", type=Path, default=Path("sim_out"), help="folder for simulate.json and the PNG")
    ap.add_argument("--data-dir", type=Path, help="keep the database and versions here (default: a temp folder)")
    ap.add_argument("--train-on", choices=("round", "all"), default="all",
                    help="all: the newest [trainer] window rated replies, as the product trains "
                         "(default); round: this round's replies only (window = --replies)")
    ap.add_argument("--no-eval", action="store_true", help="skip the final evaluation round")
    ap.add_argument("--eval-extra", type=int, default=32,
                    help="prompts beyond round 1's that the evaluation also asks, the base model before round 1 "
                         "and the last version at the end, so first and last compare more prompts (default 32)")
    ap.add_argument("--threads", type=int, help="torch CPU threads for serving and training")
    ap.add_argument("--verbose", action="store_true", help="log the bot's and trainer's INFO lines")
    s = ap.add_argument_group("bot sampling (override [sampling])")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-p", type=float)
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--system-prompt", help="override model.system_prompt")
    t = ap.add_argument_group("trainer hyper-parameters (override [trainer]; see trainer/config.py)")
    for f, tp in _trainer_fields():
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if tp is bool:
            t.add_argument(flag, dest=f"trainer_{f.name}", type=_bool, metavar="BOOL", help=helptext)
        elif tp in (int, float, str):
            t.add_argument(flag, dest=f"trainer_{f.name}", type=tp, help=helptext)
        elif tp is list:
            t.add_argument(flag, dest=f"trainer_{f.name}", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                           metavar="A,B,...", help=helptext)
    return ap


def check_args(args) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise SystemExit(f"simulate: {msg}")

    need(args.rounds >= 1, "--rounds must be at least 1")
    need(args.replies >= 2, "--replies must be at least 2 (a mean baseline needs two replies)")
    need(args.voters >= 1, "--voters must be at least 1")
    need(0.0 <= args.flip <= 1.0, "--flip must be in [0, 1]")
    need(args.vote_rate is None or 0.0 < args.vote_rate <= 1.0, "--vote-rate must be in (0, 1]")
    need(args.crowd >= 1, "--crowd must be at least 1")
    need(0.0 <= args.dissent <= 1.0, "--dissent must be in [0, 1]")
    need(0.0 <= args.late < 1.0, "--late must be in [0, 1)")
    if args.taste_after is not None:
        when, _, spec = args.taste_after.partition(":")
        need(when.isdigit() and 2 <= int(when) <= args.rounds and bool(spec),
             f"--taste-after must be ROUND:TASTE with ROUND in 2..{args.rounds}, e.g. '6:regex:\\?'")
    need(args.eval_extra >= 0, "--eval-extra must be >= 0")


def make_configs(args):
    """The bot config and trainer config for the run (flags over --config over defaults)."""
    from bot.config import load_config, validate
    from trainer.config import load_trainer_config

    cfg = load_config(args.config, env={})
    if args.model:
        cfg.model.name = args.model
    if args.system_prompt is not None:
        cfg.model.system_prompt = args.system_prompt
    if args.threads:
        cfg.model.threads = args.threads
    for name in ("temperature", "top_p", "max_new_tokens"):
        if getattr(args, name) is not None:
            setattr(cfg.sampling, name, getattr(args, name))
    cfg.platforms = []
    cfg.serving.batch_size = args.replies                  # one round = one batch
    cfg.serving.queue_size = max(cfg.serving.queue_size, args.replies)
    cfg.chat.rate_limit_per_minute = 0                     # simulated people ask quickly
    trainer = dict(cfg.trainer)
    for f, _ in _trainer_fields():
        value = getattr(args, f"trainer_{f.name}", None)
        if value is not None:
            trainer[f.name] = value
    trainer["seed"] = args.seed
    if args.threads:
        trainer["threads"] = args.threads
    if args.train_on == "round":
        trainer["window"] = args.replies                   # the newest N rated replies = this round's
    cfg.trainer = trainer
    validate(cfg)
    return cfg, load_trainer_config(cfg)

