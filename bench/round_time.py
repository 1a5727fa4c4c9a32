"""Benchmark: one training round on the real default model with the default [trainer] settings.

Usage:
    .venv/bin/python bench/round_time.py [--replies 32] [--new-tokens 64] [--threads N] [--set key=value ...]

The bot's own Policy samples ``--replies`` replies (up to ``--new-tokens`` tokens each) to
everyday prompts with the default sampling settings, so prompts, tokens and behaviour
logprobs are exactly what the trainer sees in production; each gets a random 👍/👎
(seeded). Then one round (``run_round(..., use_all=True)``) runs end to end: candidate
model, training, gates, publish. Results are printed and saved to bench/out/round_time.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.common import parse_overrides  # noqa: E402
from bot import process  # noqa: E402

process.quiet_threads()      # before torch loads (bot/process.py says why)

PROMPTS = [
    "Hey, how is your day going so far?", "Any tips for waking up less groggy?", "What should I cook tonight?",
    "Can you explain what a black hole is?", "Recommend a board game for four people.",
    "What's a good way to unwind after work?", "How do I keep my houseplants alive?",
    "Tell me something interesting about octopuses.", "Coffee or tea, and why?",
    "What's the best way to learn a new language?", "Give me a fun weekend plan.",
    "How can I be more productive in the morning?",
]



async def run(args) -> dict:
    import torch

    from bot.config import Config, build, validate
    from bot.policy import Policy
    from bot.policy_types import Turn
    from bot.store import Store
    from trainer.config import load_trainer_config
    from trainer.learner import Learner
    from trainer.round import run_round

    process.set_torch_threads(args.threads)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="reactlearn-bench-"))
    overrides = parse_overrides(args.set)
    cfg = validate(build(Config, {"data_dir": str(tmp), "model": {"name": "default", "cache_dir": str(args.cache_dir)},
                                  "sampling": {"max_new_tokens": args.new_tokens}, "trainer": overrides}))
    tcfg = load_trainer_config(cfg)
    store = await Store.open(cfg.db_path)

    t0 = time.perf_counter()
    policy = Policy.from_config(cfg)
    load_bot = time.perf_counter() - t0
    t0 = time.perf_counter()
    prompts = [policy.build_prompt([Turn("user", PROMPTS[i % len(PROMPTS)])]) for i in range(args.replies)]
    gens = []
    for i in range(0, len(prompts), 8):
        gens += await policy.generate_many(prompts[i:i + 8])
    sample_s = time.perf_counter() - t0
    policy.close()
    rng = random.Random(0)
    for g in gens:
        rid = await store.add_reply("bench", "c", None, g.version, g.text, g.prompt_ids, g.output_ids, g.logprobs,
                                    g.temperature, g.top_p, g.max_new_tokens)
        await store.set_vote(rid, "u", "\N{THUMBS UP SIGN}", rng.choice([1.0, -1.0]))

    learner = Learner(cfg, tcfg, progress=True)
    t0 = time.perf_counter()
    learner.load()
    load_trainer = time.perf_counter() - t0
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    await store.close()
    shutil.rmtree(tmp, ignore_errors=True)

    out_lens = [len(g.output_ids) for g in gens]
    prompt_lens = [len(g.prompt_ids) for g in gens]
    steps = tcfg.epochs * -(-len(gens) // tcfg.minibatch_size)
    return {
        "benchmark": "round_time",
        "model": "SmolLM2-135M-Instruct (default)",
        "replies": len(gens),
        "reply_tokens": {"mean": sum(out_lens) / len(out_lens), "min": min(out_lens), "max": max(out_lens)},
        "prompt_tokens": {"mean": sum(prompt_lens) / len(prompt_lens), "min": min(prompt_lens),
                          "max": max(prompt_lens)},
        "round": {"status": result.status, "summary": result.summary(), "seconds": round(result.seconds, 2),
                  "phases": result.timings, "optimizer_steps": steps,
                  "seconds_per_step": round(result.timings.get("train", float("nan")) / steps, 3),
                  "loss": result.loss, "kl": result.kl},
        "trainer_load_seconds": round(load_trainer, 2),
        "bot_load_seconds": round(load_bot, 2),
        "sampling_seconds_for_replies": round(sample_s, 2),
        "trainer_config": asdict(tcfg),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replies", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64, help="max tokens per sampled reply")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "reactlearn")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override [trainer] settings")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "out" / "round_time.json")
    args = ap.parse_args()
    process.setup_logging("INFO")
    data = asyncio.run(run(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: data[k] for k in ("replies", "reply_tokens", "prompt_tokens", "round")}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
