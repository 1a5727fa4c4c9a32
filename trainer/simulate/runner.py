"""The whole simulation: ``run`` (the rounds, the evaluation, the outputs) and ``main``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from .cli import build_parser, check_args, make_configs
from .metrics import measure, reply_stats, version_kl
from .people import Asked, ask_all, eval_extra_prompts, load_prompts, sample_prompts, vote_all
from .report import examples, plot, print_row, print_summary, same_prompt_eval, write_json
from .tastes import parse_taste

log = logging.getLogger("trainer.simulate")


async def run(args) -> dict:
    """The whole simulation; returns (and writes) the results dict."""
    import torch

    from bot.chat import ChatCore
    from bot.policy import Policy
    from bot.store import Store
    from trainer.learner import Learner
    from trainer.round import run_round

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


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))

