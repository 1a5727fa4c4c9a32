"""The whole simulation: ``run`` (the rounds, the evaluation, the outputs) and ``main``.

``run`` goes through its phases in order: set-up (the store, the policy, the chat core, the
learner), the base model on the extra evaluation prompts, the rounds (ask, vote, train,
hot-swap), the final evaluation, and the report (JSON, plot, summary) and clean-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bot import process
from bot.config import ConfigError

from .cli import build_parser, check_args, make_configs
from .metrics import measure, reply_stats, version_kl
from .people import Asked, Vote, Voters, ask_all, cast, eval_extra_prompts, load_prompts, sample_prompts, vote_all
from .report import examples, plot, print_row, print_summary, same_prompt_eval, write_json
from .tastes import Taste, parse_taste

if TYPE_CHECKING:
    from bot.chat import ChatCore
    from bot.config import Config
    from bot.policy import Policy
    from bot.store import Store
    from trainer.config import TrainerConfig
    from trainer.learner import Learner

log = logging.getLogger("trainer.simulate")


@dataclass
class _Sim:
    """One simulation: its settings, and the live pieces its phases share."""

    args: argparse.Namespace
    taste: Taste
    cfg: Config
    tcfg: TrainerConfig
    json_path: Path
    png_path: Path
    rng: random.Random             # which prompts each round asks
    voters: Voters                 # who votes, and how
    tmp: tempfile.TemporaryDirectory | None = None   # the data folder, without --data-dir
    prompts: list[str] = field(default_factory=list)
    started: float = 0.0
    store: Store | None = None
    policy: Policy | None = None
    core: ChatCore | None = None
    learner: Learner | None = None
    results: dict = field(default_factory=dict)
    late: list[Vote] = field(default_factory=list)   # votes that come at the next round


async def run(args) -> dict:
    """The whole simulation; returns (and writes) the results dict."""
    from bot.store import Store

    sim = _setup(args)
    sim.store = await Store.open(sim.cfg.db_path)
    try:
        await _start(sim)
        round1 = sample_prompts(sim.rng, sim.prompts, args.replies)
        extra = [] if args.no_eval else eval_extra_prompts(sim.prompts, round1, args.eval_extra, args.seed)
        if extra:
            await _base_eval(sim, extra)
        first_asked, last_asked = await _rounds(sim, round1)
        if not args.no_eval:
            last_asked = await _final_eval(sim, first_asked, extra)
        return await _report(sim, first_asked, last_asked)
    finally:
        await _clean_up(sim)


# -- set-up and clean-up ----------------------------------------------------------


def _setup(args) -> _Sim:
    """The flags checked, the configs, the data folder (a temporary one unless --data-dir),
    the output paths, the seeds and the prompts."""
    import torch

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
    voters = Voters(taste, args.flip, random.Random(args.seed + 1), voters=args.voters, vote_rate=args.vote_rate,
                    crowd=args.crowd, dissent=args.dissent, late=args.late)
    sim = _Sim(args, taste, cfg, tcfg, json_path=out_dir / "simulate.json", png_path=out_dir / "learning_curve.png",
               rng=random.Random(args.seed), voters=voters, tmp=tmp)
    torch.manual_seed(args.seed)
    sim.prompts = load_prompts()
    sim.started = time.monotonic()
    return sim


async def _start(sim: _Sim) -> None:
    """The policy, the chat core serving the active version, the learner with its base model;
    then the results' header and the opening line."""
    import torch

    from bot.chat import ChatCore
    from bot.policy import Policy
    from trainer.learner import Learner

    args, cfg, tcfg = sim.args, sim.cfg, sim.tcfg
    sim.policy = await asyncio.to_thread(Policy.from_config, cfg)
    sim.policy.seed(args.seed)
    sim.core = ChatCore(cfg, sim.store, sim.policy)
    await sim.core.sync_version()
    sim.learner = Learner(cfg, tcfg, progress=False)
    await asyncio.to_thread(sim.learner.load)
    sim.results = {
        "command": "python -m trainer.simulate " + " ".join(getattr(args, "argv", []) or []),
        "taste": args.taste, "taste_after": args.taste_after, "rounds_requested": args.rounds,
        "replies": args.replies, "voters": args.voters if args.vote_rate is None else None,
        "vote_rate": args.vote_rate, "crowd": args.crowd if args.vote_rate is not None else None,
        "dissent": args.dissent, "late": args.late if args.vote_rate is not None else None, "flip": args.flip, "seed": args.seed, "train_on": args.train_on,
        "model": cfg.model.name, "system_prompt": cfg.model.system_prompt,
        "sampling": dataclasses.asdict(cfg.sampling), "trainer": dataclasses.asdict(tcfg),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "setup_seconds": round(time.monotonic() - sim.started, 2),
        "rounds": [], "final": None, "examples": [], "total_seconds": None,
    }
    who = (f"{args.voters} voters" if args.vote_rate is None else
           f"vote rate {args.vote_rate} from a crowd of {args.crowd} (dissent {args.dissent}, late {args.late})")
    print(f"simulate: taste {args.taste!r}, {args.rounds} rounds x {args.replies} replies, {who}, "
          f"flip {args.flip}, model {cfg.model.name}, data {cfg.data_dir}", flush=True)


async def _clean_up(sim: _Sim) -> None:
    if sim.policy is not None:
        sim.policy.close()
    await sim.store.close()
    if sim.tmp is not None:
        sim.tmp.cleanup()


# -- the phases -------------------------------------------------------------------


async def _base_eval(sim: _Sim, extra: list[str]) -> None:
    """The base model on the extra evaluation prompts (no votes: nothing here is trained on)."""
    row, _ = await _one_round(sim, "base-eval", extra, train=False, vote=False)
    sim.results["base_eval"] = row
    print_row(row)


async def _rounds(sim: _Sim, round1: list[str]) -> tuple[list[Asked], list[Asked]]:
    """The training rounds; returns what round 1 and the last round asked. The JSON is
    rewritten after every round."""
    args = sim.args
    first_asked: list[Asked] = []
    for number in range(1, args.rounds + 1):
        _maybe_change_taste(sim, number)
        prompts = round1 if number == 1 else sample_prompts(sim.rng, sim.prompts, args.replies)
        row, asked = await _one_round(sim, number, prompts, train=True)
        if number == 1:
            first_asked = asked
            await _add_reply_stats(sim, row, asked)     # the base's own numbers, to compare the final ones with
        sim.results["rounds"].append(row)
        print_row(row)
        write_json(sim.json_path, sim.results)
    return first_asked, asked


def _maybe_change_taste(sim: _Sim, number: int) -> None:
    """``--taste-after ROUND:TASTE``: from round ROUND on the people like TASTE."""
    if sim.args.taste_after:
        when, _, spec = sim.args.taste_after.partition(":")
        if number == int(when):
            sim.taste = sim.voters.taste = parse_taste(spec)
            print(f"round {number}: the people's taste is now {spec!r}", flush=True)


async def _final_eval(sim: _Sim, first_asked: list[Asked], extra: list[str]) -> list[Asked]:
    """The last version on round 1's prompts and the extra ones (votes, no training)."""
    row, asked = await _one_round(sim, "final", [a.prompt for a in first_asked] + extra, train=False)
    await _add_reply_stats(sim, row, asked)
    sim.results["final"] = row
    sim.results["eval"] = same_prompt_eval(sim.results["rounds"][0], sim.results.get("base_eval"), row, sim.taste)
    print_row(row)
    return asked


async def _report(sim: _Sim, first_asked: list[Asked], last_asked: list[Asked]) -> dict:
    """The before/after examples and the totals; the JSON, the plot and the summary."""
    results = sim.results
    results["examples"] = examples(first_asked, last_asked, sim.taste, same_prompts=not sim.args.no_eval)
    results["total_seconds"] = round(time.monotonic() - sim.started, 2)
    results["store_counts"] = await sim.store.counts()
    results["png"] = str(sim.png_path)
    write_json(sim.json_path, results)
    plot(results, sim.png_path)
    print_summary(results)
    print(f"wrote {sim.json_path} and {sim.png_path}", flush=True)
    return results


# -- one round ----------------------------------------------------------------------


async def _one_round(sim: _Sim, number, prompt_list: list[str], *, train: bool,
                     vote: bool = True) -> tuple[dict, list[Asked]]:
    """Ask ``prompt_list``, vote on the replies and measure them; with ``train`` one trainer
    round and the hot-swap. Returns the round's row and what was asked."""
    args, core = sim.args, sim.core
    t0 = time.monotonic()
    serving = sim.policy.active_version
    asked = []
    for i in range(0, len(prompt_list), args.replies):      # one batch (and queue) at a time
        asked += await ask_all(core, prompt_list[i:i + args.replies], f"r{number}-{i}")
    gen_s = time.monotonic() - t0
    n_late = await cast(core, sim.late) if vote else 0        # last round's late votes come in now
    n_votes, sim.late = await vote_all(core, asked, sim.voters) if vote else (0, sim.late)
    row = {"round": number, "serving_version": serving, "serving_kl": await version_kl(sim.store, serving),
           **await measure(core, sim.store, asked, sim.taste), "n_votes": n_votes, "n_late_votes": n_late,
           "generate_seconds": round(gen_s, 2)}
    row["kl"] = None
    row["train"] = None
    if train:
        row["train"] = await _train_and_swap(sim)
        row["kl"] = row["train"]["kl"]
    row["version_after"] = sim.policy.active_version
    row["seconds"] = round(time.monotonic() - t0, 2)
    return row, asked


async def _train_and_swap(sim: _Sim) -> dict:
    """One trainer round on every rated reply, then the hot-swap; the row's ``train`` part."""
    from trainer.rollback import check_rollback
    from trainer.round import run_round

    t1 = time.monotonic()
    rollback = await check_rollback(sim.store, sim.tcfg)      # as the trainer's loop does before a round
    if rollback is not None:
        print(f"auto-rollback: {rollback.message()}", flush=True)
    res = await run_round(sim.store, sim.cfg, sim.tcfg, sim.learner, use_all=True)
    await sim.core.sync_version()
    v = await sim.store.get_version(res.version) if res.version is not None else None
    m = v.metrics if v else {}
    return {"status": res.status, "version": res.version, "kl": res.kl, "loss": res.loss,
            "n_replies": res.n_replies, "mean_reward": res.mean_reward, "reason": res.reason,
            "train_kl": m.get("train_kl"), "clip_frac": m.get("clip_frac"), "steps": m.get("steps"),
            "kl_coef_last": m.get("kl_coef_last"),
            "kl_coef_peak": m.get("kl_coef_peak"), "kl_steps_over": m.get("kl_steps_over"),
            "probe_repetition": m.get("probe_repetition"),
            "probe_empty_share": m.get("probe_empty_share"),
            "probe_spam_share": m.get("probe_spam_share"), "n_degenerate": m.get("n_degenerate"),
            "probe_nll": m.get("probe_nll"), "probe_base_nll": m.get("probe_base_nll"),
            "probe_words": m.get("probe_words"), "probe_base_words": m.get("probe_base_words"),
            "start": m.get("start"), "n_explored": m.get("n_explored"),
            "auto_rollback": rollback.message() if rollback else None,
            "reward_model": {k: v for k, v in m.items() if k.startswith("rm_")},
            "seconds": round(res.seconds, 2), "timings": res.timings,
            "wall_seconds": round(time.monotonic() - t1, 2)}


async def _add_reply_stats(sim: _Sim, row: dict, asked: list[Asked]) -> None:
    """The served version's own numbers on its replies (reply_stats) added to ``row``."""
    t0 = time.monotonic()
    records = [await sim.store.get_reply(a.reply_id) for a in asked if a.reply_id is not None]
    version = await sim.store.get_version(row["serving_version"])
    row.update(await asyncio.to_thread(reply_stats, sim.learner, version, records))
    row["reply_stats_seconds"] = round(time.monotonic() - t0, 2)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    process.setup_logging(logging.INFO if args.verbose else logging.WARNING)
    try:
        return asyncio.run(run(args))
    except ConfigError as e:         # a bad --config or setting: one line, exit 2, as the bot and the trainer
        raise SystemExit(process.fail(f"config error: {e}")) from None
