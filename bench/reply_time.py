"""Benchmark: reply time of the serving policy on the configured model (default: SmolLM2-135M).

    .venv/bin/python bench/reply_time.py [--config reactlearn.toml] [--replies 5] [--batch 16]

Goes through the real serving path (Policy.from_config → generate_many with the chat
template), one reply at a time and then one batch, and prints and saves seconds and
tokens/s to bench/out/reply_time.json. Numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bot import process  # noqa: E402

process.quiet_threads()      # before torch loads (bot/process.py says why)

from bot.config import load_config  # noqa: E402
from bot.policy import Policy  # noqa: E402
from bot.policy_types import Turn  # noqa: E402

PROMPT = "Hello, who are you?"


async def measure(policy: Policy, replies: int, batch: int) -> dict:
    prompt = policy.build_prompt([Turn("user", PROMPT)])
    singles = []
    for _ in range(replies):
        t0 = time.perf_counter()
        [gen] = await policy.generate_many([prompt])
        singles.append((time.perf_counter() - t0, len(gen.output_ids)))
    t0 = time.perf_counter()
    gens = await policy.generate_many([prompt] * batch)
    batch_s = time.perf_counter() - t0
    batch_tokens = sum(len(g.output_ids) for g in gens)
    return {
        "single_seconds_median": statistics.median(s for s, _ in singles),
        "single_tokens_median": statistics.median(n for _, n in singles),
        "single_tokens_per_s": sum(n for _, n in singles) / sum(s for s, _ in singles),
        "batch": batch, "batch_seconds": batch_s, "batch_tokens": batch_tokens,
        "batch_tokens_per_s": batch_tokens / batch_s,
        "example": gens[0].text,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path)
    ap.add_argument("--replies", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    cfg = load_config(args.config)
    cfg.serving.queue_size = cfg.serving.batch_size = max(args.batch, 1)
    t0 = time.perf_counter()
    policy = Policy.from_config(cfg)
    load_s = time.perf_counter() - t0
    try:
        result = asyncio.run(measure(policy, args.replies, args.batch))
    finally:
        policy.close()
    result = {"model": cfg.model.name, "max_new_tokens": cfg.sampling.max_new_tokens, "load_seconds": load_s,
              "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(), "python": platform.python_version(),
              **result}
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "reply_time.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    for k, v in result.items():
        print(f"{k:>24}: {v:.2f}" if isinstance(v, float) else f"{k:>24}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
