"""Simulated people with a hidden taste: the end-to-end proof that the bot learns.

    python -m trainer.simulate [--taste short] [--rounds 10] [--replies 32] [--voters 3] [--flip 0.1]
                               [--lr 2e-4 --kl-coef 0.05 --epochs 2 ...] [--out sim_out]

Everything real except the people: the chat core (``ChatCore.on_message`` with a send
function that returns a fake platform message id, ``ChatCore.on_reaction`` for votes),
the policy (``Policy.from_config``), the store (a temp SQLite file, or ``--data-dir``),
the trainer round (``run_round``) and the hot-swap (``ChatCore.sync_version``).

A round:
  1. ``--replies`` prompts from trainer/prompts.txt (seeded sample) are sent to the bot
     at once; the policy generates them as one batch (serving.batch_size = N).
  2. Each reply gets ``--voters`` simulated users (distinct ids). Each votes 👍 when the
     taste likes the reply and 👎 otherwise, flipped with probability ``--flip``. Votes
     are platform reactions on the reply's fake message id, through the chat core.
  3. One training round over this round's replies (``--train-on round``, the default) or
     the newest ``window`` rated replies (``--train-on all``); then the bot hot-swaps.
Evaluation: before round 1 the base model also answers ``--eval-extra`` more prompts
(unvoted); after the last round the last version answers round 1's prompts and those
again (votes, no training), so base and last version compare on the same prompts
(``eval`` in the JSON): one 32-reply round alone moves by about ±0.08 by chance.

Tastes (``--taste``):
  short                    the reply has 1-19 words (an empty reply is not a reply)
  regex:PATTERN            re.search(PATTERN, reply, re.IGNORECASE)
  python:module:function   function(text) -> bool, or a float in [-1, 1]: each voter then
                           votes 👍 with probability (1 + v) / 2; the reply counts as liked
                           when v > 0.

Per round it prints and saves (``--out``/simulate.json, rewritten after every round): the
like-rate (share of replies the taste likes, before any flip: the honest measure), the mean
reward (noisy votes, as the store aggregates them), the probe KL to the base model (gate
report), mean reply length in words, the version serving, seconds. At the end it draws
``--out``/learning_curve.png (like-rate and KL against training rounds done) and prints a
few before/after replies.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import json
import logging
import os
import random
import re
import sys
import tempfile
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Two torch processes on a small machine: OpenMP's default busy-wait makes them 3-30x slower
# (see trainer/__main__.py). Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bot.events import Message, Reaction  # noqa: E402
from bot.rewards import THUMBS_DOWN, THUMBS_UP  # noqa: E402
from trainer.fluency import symbol_spam  # noqa: E402

PROMPTS_FILE = Path(__file__).with_name("prompts.txt")
PLATFORM = "sim"
CHANNEL = "sim-channel"
SHORT_WORDS = 20
N_EXAMPLES = 5
# Display names of the simulated people who ask (the chat core puts "Name: text" in the prompt).
NAMES = ["Alex", "Sam", "Priya", "Jordan", "Mia", "Leo", "Aisha", "Noah", "Chen", "Lucia", "Omar", "Emma",
         "Kai", "Sofia", "Ravi", "Hannah", "Mateo", "Yuki", "Ben", "Zara", "Ivan", "Grace", "Tomás", "Nina",
         "Femi", "Clara", "Jonas", "Lina", "Hugo", "Maya", "Eli", "Rosa"]
# Trainer fields that the simulator sets itself (from its own flags) rather than passing through.
OWN_TRAINER_FLAGS = {"seed", "threads"}

log = logging.getLogger("trainer.simulate")


# -- tastes ---------------------------------------------------------------------


def word_count(text: str) -> int:
    return len(text.split())


@dataclass
class Taste:
    """A hidden preference: ``score(text)`` in [-1, 1]; liked when > 0."""

    spec: str
    score: Callable[[str], float]

    def liked(self, text: str) -> bool:
        return self.score(text) > 0

    def p_up(self, text: str) -> float:
        """Probability that one voter puts 👍 (before the flip)."""
        return (self.score(text) + 1.0) / 2.0


def _as_score(value) -> float:
    if isinstance(value, bool):
        return 1.0 if value else -1.0
    if isinstance(value, (int, float)):
        return max(-1.0, min(1.0, float(value)))
    raise TypeError(f"a taste must return bool or a number in [-1, 1], got {type(value).__name__} ({value!r})")


def parse_taste(spec: str) -> Taste:
    """``short`` | ``regex:PATTERN`` | ``python:module:function`` (see the module docstring)."""
    if spec == "short":
        return Taste(spec, lambda t: _as_score(0 < word_count(t) < SHORT_WORDS))
    if spec.startswith("regex:"):
        pattern = spec[len("regex:"):]
        try:
            rx = re.compile(pattern, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"--taste {spec!r}: bad regular expression ({e})") from None
        return Taste(spec, lambda t: _as_score(rx.search(t) is not None))
    if spec.startswith("python:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise ValueError(f"--taste {spec!r}: write python:module:function, e.g. python:mytastes:likes_cats")
        try:
            fn = getattr(importlib.import_module(parts[1]), parts[2])
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--taste {spec!r}: cannot load {parts[1]}.{parts[2]} ({e})") from None
        return Taste(spec, lambda t: _as_score(fn(t)))
    raise ValueError(f"--taste {spec!r}: use short, regex:PATTERN or python:module:function")


# -- arguments --------------------------------------------------------------------


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
    ap = argparse.ArgumentParser(prog="python -m trainer.simulate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="training rounds (default 10)")
    ap.add_argument("--replies", type=int, default=32, help="replies per round, generated as one batch (default 32)")
    ap.add_argument("--voters", type=int, default=3, help="simulated users voting on each reply (default 3)")
    ap.add_argument("--flip", type=float, default=0.1, help="probability that a vote is flipped (default 0.1)")
    ap.add_argument("--taste", default="short", help="short | regex:PATTERN | python:module:function")
    ap.add_argument("--seed", type=int, default=0, help="seeds prompts, votes, sampling and the trainer (default 0)")
    ap.add_argument("--model", help="override model.name (a model folder, or 'default')")
    ap.add_argument("--config", type=Path, help="a reactlearn TOML file ([trainer] etc.); default: built-in defaults")
    ap.add_argument("--out", type=Path, default=Path("sim_out"), help="folder for simulate.json and the PNG")
    ap.add_argument("--data-dir", type=Path, help="keep the database and versions here (default: a temp folder)")
    ap.add_argument("--train-on", choices=("round", "all"), default="round",
                    help="round: learn from this round's replies only (window = --replies); "
                         "all: the newest [trainer] window rated replies (default round)")
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


# -- the simulation ---------------------------------------------------------------


def load_prompts(path: Path = PROMPTS_FILE) -> list[str]:
    return [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def sample_prompts(rng: random.Random, prompts: list[str], n: int) -> list[str]:
    """n prompts, without repeats while the pool lasts."""
    out: list[str] = []
    while len(out) < n:
        out += rng.sample(prompts, min(len(prompts), n - len(out)))
    return out


@dataclass
class Asked:
    prompt: str
    platform_message_id: str | None = None   # the fake id of the bot's reply message
    sent_text: str = ""
    reply_id: int | None = None


def _hold_worker(policy) -> threading.Event:
    """Park the policy's worker until released, so that requests queued meanwhile form one batch.

    The worker runs callables it finds in its queue between batches (that is how versions
    are installed); this one just waits for the event."""
    release = threading.Event()
    policy._jobs.put(lambda: release.wait(timeout=120))
    return release


async def ask_all(core, prompts: list[str], tag: str) -> list[Asked]:
    """Send every prompt to the bot at once through ChatCore.on_message; one generation batch."""
    asked = [Asked(p) for p in prompts]

    def sender(a: Asked, pid: str):
        async def send(text: str) -> list[str]:
            a.sent_text, a.platform_message_id = text, pid
            return [pid]
        return send

    async def one(i: int, a: Asked) -> None:
        msg = Message(platform=PLATFORM, message_id=f"{tag}-m{i}", channel_id=CHANNEL, author_id=f"sim-asker-{i}",
                      author_name=NAMES[i % len(NAMES)], text=a.prompt, mentions_bot=True)
        a.reply_id = await core.on_message(msg, [], sender(a, f"{tag}-r{i}"))

    release = _hold_worker(core.policy)
    tasks = [asyncio.create_task(one(i, a)) for i, a in enumerate(asked)]
    deadline = time.monotonic() + 60
    try:
        while (core.policy._waiting < len(tasks) and not all(t.done() for t in tasks)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.01)
    finally:
        release.set()
    await asyncio.gather(*tasks)
    return asked


async def vote_all(core, asked: list[Asked], taste: Taste, voters: int, flip: float, rng: random.Random) -> int:
    """Each simulated voter reacts 👍/👎 on the reply's message through ChatCore.on_reaction."""
    n = 0
    for a in asked:
        if a.reply_id is None:
            continue
        p_up = taste.p_up(a.sent_text)
        for k in range(voters):
            up = rng.random() < p_up
            if rng.random() < flip:
                up = not up
            outcome = await core.on_reaction(Reaction(
                platform=PLATFORM, channel_id=CHANNEL, message_id=a.platform_message_id, user_id=f"sim-voter-{k}",
                emoji=THUMBS_UP if up else THUMBS_DOWN, added=True))
            if outcome != "added":
                raise RuntimeError(f"vote on reply #{a.reply_id} was not recorded: {outcome}")
            n += 1
    return n


async def version_kl(store, version: int) -> float | None:
    if version == 0:
        return 0.0
    v = await store.get_version(version)
    return v.metrics.get("probe_kl") if v else None


async def measure(core, store, asked: list[Asked], taste: Taste) -> dict:
    replied = [a for a in asked if a.reply_id is not None]
    rewards, items = [], []
    for a in replied:
        r = await store.get_reply(a.reply_id)
        reward = r.reward if r is not None else None
        if reward is not None:
            rewards.append(reward)
        items.append({"reply_id": a.reply_id, "prompt": a.prompt, "text": a.sent_text,
                      "liked": taste.liked(a.sent_text), "reward": reward})
    n = max(1, len(replied))
    return {"replies": items,
        "n_replies": len(replied),
        "failed": len(asked) - len(replied),
        "like_rate": sum(taste.liked(a.sent_text) for a in replied) / n,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "mean_words": sum(word_count(a.sent_text) for a in replied) / n,
        "symbol_spam_share": sum(symbol_spam(a.sent_text) for a in replied) / n,
    }


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_row(row: dict) -> None:
    train = row.get("train") or {}
    trained = (f"train {train['status']}" + (f" v{train['version']}" if train.get("version") is not None else "")
               + f" KL {_fmt(train.get('kl'), '.4f')}"
               + (f", {train['n_degenerate']} degenerate" if train.get("n_degenerate") else "")) if train else "eval only"
    print(f"round {row['round']!s:>5}: v{row['serving_version']} like-rate {row['like_rate']:.2f}  "
          f"reward {_fmt(row['mean_reward'], '+.2f')}  words {row['mean_words']:.1f}  "
          f"emoji-spam {row['symbol_spam_share']:.2f}  "
          f"KL(v{row['serving_version']}) {_fmt(row['serving_kl'], '.4f')}  | {trained}  "
          f"| {row['seconds']:.0f}s (gen {row['generate_seconds']:.0f}s)", flush=True)
    if row.get("served_kl") is not None:
        print(f"         on these {row['n_replies']} replies: KL(v{row['serving_version']} ‖ base) "
              f"{row['served_kl']:.4f} nats/token, base-model NLL {row['base_nll']:.3f} nats/token", flush=True)
    if train.get("reason"):
        print(f"         reason: {train['reason']}", flush=True)


async def run(args) -> dict:
    """The whole simulation; returns (and writes) the results dict."""
    import torch

    from bot.chat import ChatCore
    from bot.policy import Policy
    from bot.store import Store
    from trainer.round import Learner, run_round

    check_args(args)
    taste = parse_taste(args.taste)
    cfg, tcfg = make_configs(args)
    tmp = None
    if args.data_dir:
        cfg.data_dir = str(args.data_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="reactlearn-sim-")
        cfg.data_dir = tmp.name
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / "simulate.json", out_dir / "learning_curve.png"

    rng = random.Random(args.seed)
    vote_rng = random.Random(args.seed + 1)
    torch.manual_seed(args.seed)
    prompts = load_prompts()
    started = time.monotonic()

    store = await Store.open(cfg.db_path)
    policy = core = None
    try:
        policy = await asyncio.to_thread(Policy.from_config, cfg)
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        learner = Learner(cfg, tcfg, progress=False)
        await asyncio.to_thread(learner.load)
        results = {
            "command": "python -m trainer.simulate " + " ".join(getattr(args, "argv", []) or []),
            "taste": args.taste, "rounds_requested": args.rounds, "replies": args.replies, "voters": args.voters,
            "flip": args.flip, "seed": args.seed, "train_on": args.train_on,
            "model": cfg.model.name, "system_prompt": cfg.model.system_prompt,
            "sampling": dataclasses.asdict(cfg.sampling), "trainer": dataclasses.asdict(tcfg),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "setup_seconds": round(time.monotonic() - started, 2),
            "rounds": [], "final": None, "examples": [], "total_seconds": None,
        }
        print(f"simulate: taste {args.taste!r}, {args.rounds} rounds x {args.replies} replies, {args.voters} voters, "
              f"flip {args.flip}, model {cfg.model.name}, data {cfg.data_dir}", flush=True)
        first_asked: list[Asked] = []

        async def one_round(number, prompt_list: list[str], train: bool,
                            vote: bool = True) -> tuple[dict, list[Asked]]:
            t0 = time.monotonic()
            serving = policy.active_version
            asked = []
            for i in range(0, len(prompt_list), args.replies):      # one batch (and queue) at a time
                asked += await ask_all(core, prompt_list[i:i + args.replies], f"r{number}-{i}")
            gen_s = time.monotonic() - t0
            n_votes = await vote_all(core, asked, taste, args.voters, args.flip, vote_rng) if vote else 0
            row = {"round": number, "serving_version": serving, "serving_kl": await version_kl(store, serving),
                   **await measure(core, store, asked, taste), "n_votes": n_votes,
                   "generate_seconds": round(gen_s, 2)}
            row["kl"] = None
            row["train"] = None
            if train:
                t1 = time.monotonic()
                res = await run_round(store, cfg, tcfg, learner, use_all=True)
                await core.sync_version()
                v = await store.get_version(res.version) if res.version is not None else None
                m = v.metrics if v else {}
                row["kl"] = res.kl
                row["train"] = {"status": res.status, "version": res.version, "kl": res.kl, "loss": res.loss,
                                "n_replies": res.n_replies, "mean_reward": res.mean_reward, "reason": res.reason,
                                "train_kl": m.get("train_kl"), "clip_frac": m.get("clip_frac"),
                                "probe_repetition": m.get("probe_repetition"),
                                "probe_empty_share": m.get("probe_empty_share"),
                                "probe_spam_share": m.get("probe_spam_share"), "n_degenerate": m.get("n_degenerate"),
                                "start": m.get("start"),
                                "seconds": round(res.seconds, 2), "timings": res.timings,
                                "wall_seconds": round(time.monotonic() - t1, 2)}
            row["version_after"] = policy.active_version
            row["seconds"] = round(time.monotonic() - t0, 2)
            return row, asked

        async def add_reply_stats(row: dict, asked: list[Asked]) -> None:
            t0 = time.monotonic()
            records = [await store.get_reply(a.reply_id) for a in asked if a.reply_id is not None]
            row.update(await asyncio.to_thread(reply_stats, learner, await store.get_version(row["serving_version"]),
                                               records))
            row["reply_stats_seconds"] = round(time.monotonic() - t0, 2)

        round1 = sample_prompts(rng, prompts, args.replies)
        extra = [] if args.no_eval else eval_extra_prompts(prompts, round1, args.eval_extra, args.seed)
        if extra:
            # the base model on the extra evaluation prompts (no votes: nothing here is trained on)
            row, _ = await one_round("base-eval", extra, train=False, vote=False)
            results["base_eval"] = row
            print_row(row)
        for number in range(1, args.rounds + 1):
            row, asked = await one_round(number, round1 if number == 1 else sample_prompts(rng, prompts, args.replies),
                                         train=True)
            if number == 1:
                first_asked = asked
                await add_reply_stats(row, asked)     # the base's own numbers, to compare the final ones with
            results["rounds"].append(row)
            print_row(row)
            write_json(json_path, results)
        last_asked = asked
        if not args.no_eval:
            row, last_asked = await one_round("final", [a.prompt for a in first_asked] + extra, train=False)
            await add_reply_stats(row, last_asked)
            results["final"] = row
            results["eval"] = same_prompt_eval(results["rounds"][0], results.get("base_eval"), row)
            print_row(row)
        results["examples"] = examples(first_asked, last_asked, taste, same_prompts=not args.no_eval)
        results["total_seconds"] = round(time.monotonic() - started, 2)
        results["store_counts"] = await store.counts()
        results["png"] = str(png_path)
        write_json(json_path, results)
        plot(results, png_path)
        print_summary(results)
        print(f"wrote {json_path} and {png_path}", flush=True)
        return results
    finally:
        if policy is not None:
            policy.close()
        await store.close()
        if tmp is not None:
            tmp.cleanup()


def eval_extra_prompts(prompts: list[str], round1: list[str], n: int, seed: int) -> list[str]:
    """n evaluation prompts besides round 1's, different from them while the pool lasts."""
    rest = [p for p in prompts if p not in set(round1)]
    return random.Random(seed + 2).sample(rest, min(n, len(rest)))


def same_prompt_eval(first: dict, base_extra: dict | None, final: dict) -> dict:
    """Base model against the last version on the same prompts: round 1's (answered by v0 in
    round 1) plus the extra ones (answered by v0 before round 1)."""
    before = first["replies"] + (base_extra["replies"] if base_extra else [])
    after = final["replies"]
    rate = lambda rows: sum(r["liked"] for r in rows) / max(1, len(rows))   # noqa: E731
    return {"prompts": len(after), "base_version": first["serving_version"], "base_like_rate": rate(before),
            "final_version": final["serving_version"], "final_like_rate": rate(after),
            "same_prompts": [r["prompt"] for r in before] == [r["prompt"] for r in after]}


def _tcfg_of(version, tcfg):
    """The trainer settings that rebuild ``version`` exactly (its own adapter shape), so that
    Learner.candidate loads its weights rather than starting a fresh adapter."""
    try:
        saved = json.loads((Path(version.path) / "meta.json").read_text())["trainer"]
    except (OSError, ValueError, KeyError, TypeError):
        return tcfg
    keep = ("full_finetune", "lora_rank", "lora_alpha", "target_modules")
    return dataclasses.replace(tcfg, **{k: saved[k] for k in keep if k in saved})


def reply_stats(learner, version, records, chunk: int = 8) -> dict:
    """Two numbers about replies that were really served (blocking):

    - ``served_kl``: mean per-token KL(version ‖ base) along the replies, exact over the
      vocabulary at each position, both tempered by the reply's temperature (as the gates
      compute it on their probes);
    - ``base_nll``: mean per-token negative log-likelihood of the reply tokens under the
      base model at that temperature, a fluency proxy: gibberish the base would not write
      scores high; for v0 it is the base's own cross-entropy on its samples."""
    import torch

    from trainer.data import Example, collate, reference_logits, reply_logits, tempered
    from trainer.loss import full_kl

    learner.load()
    base_only = version is None or version.id == 0
    if base_only:
        model, reference = learner.base, None
    else:
        model, _, reference, _ = learner.candidate(version, seed=0, tcfg=_tcfg_of(version, learner.tcfg))
    model.eval()
    pad = learner.tokenizer.pad_token_id
    kl_sum = nll_sum = tokens = 0.0
    records = [r for r in records if r is not None and r.output_ids]
    with torch.no_grad():
        for i in range(0, len(records), chunk):
            batch = collate([Example(r.id, r.prompt_ids, r.output_ids, r.logprobs, r.temperature, 0.0)
                             for r in records[i:i + chunk]], pad)
            logp = torch.log_softmax(tempered(reply_logits(model, batch), batch.temperature), -1)   # [B, T, V]
            base = logp if base_only else torch.log_softmax(
                tempered(reference_logits(model, reference, batch), batch.temperature), -1)
            kl = full_kl(logp, base)                                                     # [B, T]
            nll = -base.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)               # [B, T]
            kl_sum += float((kl * batch.mask).sum())
            nll_sum += float((nll * batch.mask).sum())
            tokens += float(batch.mask.sum())
    if not tokens:
        return {"served_kl": None, "base_nll": None}
    return {"served_kl": 0.0 if base_only else kl_sum / tokens, "base_nll": nll_sum / tokens}


def examples(before: list[Asked], after: list[Asked], taste: Taste, same_prompts: bool) -> list[dict]:
    """Before/after reply pairs: the same prompts when the final evaluation ran."""
    out = []
    for b, a in list(zip(before, after))[:N_EXAMPLES]:
        item = {"prompt": b.prompt, "before": b.sent_text, "before_liked": taste.liked(b.sent_text),
                "after": a.sent_text, "after_liked": taste.liked(a.sent_text)}
        if not same_prompts:
            item["after_prompt"] = a.prompt
        out.append(item)
    return out


def write_json(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def curve_points(results: dict) -> tuple[list, list, list, list]:
    """(x, like-rate) and (x, KL) against training rounds done before the replies were written."""
    rows = results["rounds"] + ([results["final"]] if results.get("final") else [])
    xs = list(range(len(rows)))
    likes = [r["like_rate"] for r in rows]
    kl_x, kls = [0], [0.0]
    for i, r in enumerate(results["rounds"], start=1):
        t = r.get("train") or {}
        if t.get("kl") is not None:
            kl_x.append(i)
            kls.append(t["kl"])
    return xs, likes, kl_x, kls


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, likes, kl_x, kls = curve_points(results)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, likes, "o-", color="tab:blue", label="like-rate (before flips)")
    rewards = [r["mean_reward"] for r in results["rounds"] + ([results["final"]] if results.get("final") else [])]
    ax.plot(xs, [(r + 1) / 2 if r is not None else None for r in rewards], ".:", color="tab:cyan",
            label="share of up votes (after flips)")
    if results.get("final"):
        ev = results.get("eval") or {}
        label = f"evaluation on the same {ev.get('prompts', '')} prompts: base vs last version"
        ax.plot([0, xs[-1]], [ev.get("base_like_rate", likes[0]), likes[-1]], "*", color="tab:purple",
                markersize=13, label=label)
    ax.set_xlabel("training rounds done before the replies")
    ax.set_ylabel("like-rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(kl_x, kls, "s--", color="tab:red", label="KL to base (nats/token, probe)")
    ax2.set_ylabel("KL to base (nats/token)")
    ax2.set_ylim(0, max(0.1, max(kls) * 1.2))
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    ax.set_title(f"taste {results['taste']}: {results['replies']} replies x {len(results['rounds'])} rounds, "
                 f"{results['voters']} voters, flip {results['flip']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_summary(results: dict) -> None:
    rows = results["rounds"]
    first, last = rows[0], results.get("final") or rows[-1]
    kl = last.get("serving_kl")        # of the version that wrote the last replies (a rejected candidate's is not)
    print(f"\nlike-rate {first['like_rate']:.2f} (round 1, v{first['serving_version']}) -> {last['like_rate']:.2f} "
          f"(round {last['round']}, v{last['serving_version']}); KL to base: probes {_fmt(kl, '.4f')}, "
          f"served replies {_fmt(last.get('served_kl'), '.4f')}; base-model NLL of the replies "
          f"{_fmt(first.get('base_nll'), '.2f')} -> {_fmt(last.get('base_nll'), '.2f')}; "
          f"words {first['mean_words']:.1f} -> {last['mean_words']:.1f}; replies with emoji spam "
          f"{first['symbol_spam_share']:.2f} -> {last['symbol_spam_share']:.2f}; {results['total_seconds']:.0f}s in all")
    ev = results.get("eval")
    if ev:
        print(f"same {ev['prompts']} prompts: like-rate {ev['base_like_rate']:.2f} (v{ev['base_version']}) -> "
              f"{ev['final_like_rate']:.2f} (v{ev['final_version']})")
    for e in results["examples"]:
        print(f"\nQ: {e['prompt']}\n  before ({'liked' if e['before_liked'] else 'not liked'}): {e['before']}\n"
              f"  after  ({'liked' if e['after_liked'] else 'not liked'}): {e['after']}")


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))


if __name__ == "__main__":
    main()
