"""Benchmark: how learnable is a taste? One round's taste margin per unit of KL.

    .venv/bin/python bench/taste_screen.py --taste 'regex:!' --taste 'regex:\\?' [--train 32 --held-out 96]
                                           [--new-tokens 64] [--threads 1] [--set key=value ...]

A simulation (``python -m trainer.simulate``) answers "does the bot learn this taste?" in
about 35 minutes. This answers a narrower question in about 5 (plus 3 per taste): after
ONE round of the real trainer (``Learner.train``, the [trainer] defaults plus the
simulations' ``lr=1e-3, kl_coef=0.1``) on ``--train`` base-model replies labelled by the
taste (+1 liked, -1 not, no noise), how far has the model moved toward the taste on
``--held-out`` other base-model replies, per unit of KL to the base?

    margin = mean Δ log p(liked reply) − mean Δ log p(disliked reply)
             (Δ = candidate − base, summed over the reply's tokens; held-out replies)
    KL     = mean per-token KL(candidate ‖ base), exact over the vocabulary, along the
             held-out replies (the number the publishing gate bounds)
    score  = margin / sqrt(KL)

For a small step the margin grows with the step and the KL with its square, so the score
does not depend on the learning rate: it is how much taste a unit of the KL budget buys.
A policy that only re-weighted the base's own replies would need a margin of
ln(odds after / odds before) to go from one like-rate to another (0.25 → 0.75 is
ln 9 ≈ 2.2); the score says how dear each nat of that margin is.

The replies are sampled once by the bot's own Policy (so prompts, tokens and behaviour
logprobs are what the trainer sees) and shared by every taste. Results are printed and
saved to bench/out/taste_screen.json. One round on 32 replies is a small sample: read
differences of 2x and more, not 20%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import parse_overrides  # noqa: E402
from bot import process  # noqa: E402

process.quiet_threads()      # before torch loads (bot/process.py says why)

SIM_TRAINER = {"lr": 1e-3, "kl_coef": 0.1}            # the simulations' flags in docs/LEARNING.md


async def sample_replies(cfg, prompts: list[str], batch: int):
    """The bot's own policy answers each prompt once (seeded); returns Generations."""
    from bot.policy import Policy
    from bot.policy_types import Turn

    policy = Policy.from_config(cfg)
    try:
        gens = []
        for i in range(0, len(prompts), batch):
            gens += await policy.generate_many([policy.build_prompt([Turn("user", p)]) for p in prompts[i:i + batch]])
        return gens
    finally:
        policy.close()


def screen(learner, tcfg, taste, train_gens, held_gens) -> dict:
    """One round on ``train_gens`` labelled by ``taste``; the shift it causes on ``held_gens``."""
    import torch

    from trainer.data import Example
    from trainer.loss import advantages
    from trainer.simulate.metrics import reply_shift

    rewards = [1.0 if taste.liked(g.text) else -1.0 for g in train_gens]
    held_liked = [taste.liked(g.text) for g in held_gens]
    row = {"taste": taste.spec, "train_liked": sum(r > 0 for r in rewards), "train": len(rewards),
           "held_out_liked": sum(held_liked), "held_out": len(held_gens)}
    if len(set(rewards)) < 2 or len(set(held_liked)) < 2:
        row["skipped"] = "every reply has the same label in the training or the held-out set: nothing to measure"
        return row
    adv = advantages(torch.tensor(rewards), tcfg.baseline).tolist()
    examples = [Example(i, g.prompt_ids, g.output_ids, g.logprobs, g.temperature, r, a)
                for i, (g, r, a) in enumerate(zip(train_gens, rewards, adv))]
    cand = learner.candidate(None, tcfg.seed, tcfg)
    model, reference = cand.model, cand.reference
    t0 = time.perf_counter()
    stats = learner.train(model, reference, examples, seed=tcfg.seed, stop=threading.Event(), tcfg=tcfg,
                          desc=taste.spec[:30])
    train_s = time.perf_counter() - t0
    held = [Example(i, g.prompt_ids, g.output_ids, g.logprobs, g.temperature, 0.0) for i, g in enumerate(held_gens)]
    shift = reply_shift(model, reference, held, learner.tokenizer.pad_token_id, chunk=16)
    deltas, kl = shift["delta_logp"], sum(shift["kl"]) / max(sum(shift["tokens"]), 1.0)
    liked = [d for d, ok in zip(deltas, held_liked) if ok]
    disliked = [d for d, ok in zip(deltas, held_liked) if not ok]
    margin = sum(liked) / len(liked) - sum(disliked) / len(disliked)
    row.update({"margin": round(margin, 4), "kl": round(kl, 5),
                "score": round(margin / math.sqrt(kl), 3) if kl > 0 else None,
                "delta_logp_liked": round(sum(liked) / len(liked), 4),
                "delta_logp_disliked": round(sum(disliked) / len(disliked), 4),
                "train_kl": round(stats.kl, 5), "steps": stats.steps, "train_seconds": round(train_s, 1)})
    return row


async def run(args) -> dict:
    import torch

    from bot.config import Config, build, validate
    from trainer.config import load_trainer_config
    from trainer.learner import Learner
    from trainer.simulate.people import load_prompts
    from trainer.simulate.tastes import parse_taste

    tastes = [parse_taste(t) for t in args.taste]       # a bad taste fails before any model loads
    process.set_torch_threads(args.threads)
    torch.manual_seed(args.seed)
    prompts = load_prompts()
    random.Random(args.seed).shuffle(prompts)
    n = args.train + args.held_out
    if n > len(prompts):
        raise SystemExit(f"--train + --held-out = {n}, but trainer/prompts.txt has {len(prompts)} prompts")
    overrides = {**SIM_TRAINER, **parse_overrides(args.set)}
    model_section = {"name": args.model}
    if args.cache_dir:
        model_section["cache_dir"] = str(args.cache_dir)
    cfg = validate(build(Config, {"model": model_section, "sampling": {"max_new_tokens": args.new_tokens},
                                  "serving": {"batch_size": 32, "queue_size": 64}, "trainer": overrides}))
    tcfg = load_trainer_config(cfg)

    t0 = time.perf_counter()
    gens = await sample_replies(cfg, prompts[:n], 32)
    sample_s = time.perf_counter() - t0
    print(f"sampled {len(gens)} base replies in {sample_s:.0f}s", flush=True)
    learner = Learner(cfg, tcfg, progress=args.progress)
    learner.load()
    rows = []
    for taste in tastes:
        row = screen(learner, tcfg, taste, gens[:args.train], gens[args.train:])
        rows.append(row)
        if "skipped" in row:
            print(f"{taste.spec}: skipped ({row['skipped']})", flush=True)
        else:
            print(f"{taste.spec}: liked {row['train_liked']}/{row['train']} (train), "
                  f"{row['held_out_liked']}/{row['held_out']} (held out); margin {row['margin']:+.3f}, "
                  f"KL {row['kl']:.4f}, score {row['score']:.2f}", flush=True)
    return {
        "benchmark": "taste_screen",
        "model": cfg.model.name,
        "sampling": asdict(cfg.sampling),
        "trainer_config": asdict(tcfg),
        "seed": args.seed,
        "sampling_seconds": round(sample_s, 1),
        "tastes": rows,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--taste", action="append", required=True,
                    help="short | regex:PATTERN | python:module:function (repeat for several)")
    ap.add_argument("--train", type=int, default=32, help="labelled replies the round learns from")
    ap.add_argument("--held-out", type=int, default=96, help="other replies the shift is measured on")
    ap.add_argument("--new-tokens", type=int, default=64, help="max tokens per sampled reply")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="default", help="model.name (a model folder, or 'default')")
    ap.add_argument("--cache-dir", type=Path, default=None, help="model.cache_dir (default: the config default)")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help=f"override [trainer] settings (defaults plus {SIM_TRAINER})")
    ap.add_argument("--progress", action="store_true", help="show the training progress bar")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "taste_screen.json")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    data = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
