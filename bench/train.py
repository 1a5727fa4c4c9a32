"""Training: one round of the real trainer on --replies rated replies; rated replies per second.

    python -m bench.train [--replies 256] [--baseline-steps 4] [--set key=value ...] [--progress] [--config X] ...

The bot's own policy samples ``--replies`` replies to everyday prompts (``generate_many`` in
batches of 16, the benchmark's sampling settings), so prompts, tokens and behaviour logprobs
are what the trainer sees in production; each gets a seeded random 👍 or 👎 in a temp store.
Then one round (``run_round(..., use_all=True)``) runs end to end with the config's
[trainer] settings (``--set`` overrides them): candidate, epochs × minibatches, gates,
publish. (This is bench/round_time.py's approach; that script now runs this.) Note
``trainer.window`` (256 by default) caps the replies one round learns from.

Reported: the round's wall time and phases, rated replies per second of the round and of
its training phase, seconds per optimizer step. The baseline beside it, in the same run:
a plain peft LoRA training step (the same LoRA shape, the same minibatches of the same
replies, plain cross-entropy on the reply tokens, AdamW), ``--baseline-steps`` timed steps
after one untimed: what the same number of steps would cost without the policy-gradient
loss, the KL reference pass and the gates.
"""

from __future__ import annotations

import asyncio
import copy
import random
import sys
import time
from dataclasses import asdict

from bench import common

NAME = "train"


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--replies", type=int, default=256, help="rated replies sampled and voted on (256)")
    ap.add_argument("--baseline-steps", type=int, default=4, help="timed plain LoRA steps (4)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override [trainer] settings")
    ap.add_argument("--progress", action="store_true", help="show the training progress bar")
    return ap


async def sample(cfg, n: int, batch: int = 16):
    """The policy's replies to n prompts, and the engine it ran on. torch's thread count is put
    back afterwards: the trainer runs in its own process, where no serving engine changed it."""
    import torch

    from bot.policy import Policy
    from bot.policy_types import Turn

    threads = torch.get_num_threads()
    policy = Policy.from_config(cfg)
    try:
        engine = common.engine_in_use(policy)
        prompts = [policy.build_prompt([Turn("user", p)]) for p in common.prompts(n)]
        gens = []
        for i in range(0, n, batch):
            gens += await policy.generate_many(prompts[i:i + batch])
        return gens, engine
    finally:
        policy.close()
        torch.set_num_threads(threads)


def plain_steps(learner, tcfg, gens, steps: int, seed: int) -> dict:
    """Seconds per plain LoRA cross-entropy step on the round's minibatches (one untimed first)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from trainer.data import Example, collate, minibatches

    lora = LoraConfig(r=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
                      target_modules=list(tcfg.target_modules), bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(copy.deepcopy(learner.base), lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tcfg.lr)
    examples = [Example(i, g.prompt_ids, g.output_ids, g.logprobs, g.temperature, 0.0) for i, g in enumerate(gens)]
    order = minibatches(len(examples), tcfg.minibatch_size, torch.Generator().manual_seed(seed))
    order = (order * (steps + 2))[:steps + 1]
    model.train()
    times = []
    for k, idx in enumerate(order):
        batch = collate([examples[i] for i in idx], learner.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        T = batch.targets.shape[1]
        labels = torch.full_like(batch.input_ids, -100)
        labels[:, -T:] = torch.where(batch.mask.bool(), batch.targets, torch.full_like(batch.targets, -100))
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k:
            times.append(time.perf_counter() - t0)
    return {"steps": len(times), "seconds_per_step": common.stats(times)}


async def run(args) -> dict:
    from bot.store import Store
    from trainer.config import load_trainer_config
    from trainer.learner import Learner
    from trainer.round import run_round

    cfg = common.bench_config(args, common.temp_dir(NAME))
    cfg.trainer = {**cfg.trainer, **common.parse_overrides(args.set)}
    tcfg = load_trainer_config(cfg)
    store = await Store.open(cfg.db_path)
    try:
        t0 = time.perf_counter()
        gens, engine = await sample(cfg, args.replies)
        sample_s = time.perf_counter() - t0
        rng = random.Random(args.seed)
        for i, g in enumerate(gens):
            rid = await store.add_reply("bench", "c", None, g.version, g.text, g.prompt_ids, g.output_ids, g.logprobs,
                                        g.temperature, g.top_p, g.max_new_tokens)
            liked = rng.random() < 0.5
            # eight people share the votes: trainer.max_user_share (0.2) needs five in a round
            await store.set_vote(rid, f"u{i % 8}", "\N{THUMBS UP SIGN}" if liked else "\N{THUMBS DOWN SIGN}",
                                 1.0 if liked else -1.0)
        learner = Learner(cfg, tcfg, progress=args.progress)
        t0 = time.perf_counter()
        learner.load()
        load_s = time.perf_counter() - t0
        result = await run_round(store, cfg, tcfg, learner, use_all=True)
        plain = plain_steps(learner, tcfg, gens[-tcfg.window:], args.baseline_steps, tcfg.seed)
    finally:
        await store.close()
    return summarize(args, cfg, tcfg, gens, result, plain, sample_s, load_s, engine)


def summarize(args, cfg, tcfg, gens, result, plain, sample_s, load_s, engine) -> dict:
    n = result.n_replies
    trained = n + result.n_explored          # the voted replies and the trainer's own samples
    steps = tcfg.epochs * -(-trained // tcfg.minibatch_size) if trained else 0
    train_s = result.timings.get("train")
    per_step = train_s / steps if train_s and steps else None
    plain_step = plain["seconds_per_step"]["p50"]
    plain_round_train = plain_step * steps if plain_step and steps else None
    out_lens = [len(g.output_ids) for g in gens]
    return {
        "settings": {**common.settings(cfg), "engine_in_use": engine, "trainer": asdict(tcfg)},
        "replies_sampled": len(gens), "sampling_s": common.rnd(sample_s, 2), "trainer_load_s": common.rnd(load_s, 2),
        "reply_tokens": common.stats(out_lens, 2),
        "round": {"status": result.status, "summary": result.summary(), "replies": n,
                  "explored_samples": result.n_explored, "seconds": common.rnd(result.seconds, 2),
                  "phases": {k: common.rnd(v, 2) for k, v in result.timings.items()}, "optimizer_steps": steps,
                  "seconds_per_step": common.rnd(per_step, 3), "loss": result.loss, "kl": result.kl,
                  "rated_replies_per_s": common.rnd(n / result.seconds, 3) if result.seconds else None,
                  "train_replies_per_s": common.rnd(n / train_s, 3) if train_s else None},
        "plain": {**plain, "train_s_for_the_same_steps": common.rnd(plain_round_train, 2),
                  "train_replies_per_s": common.rnd(n / plain_round_train, 3) if plain_round_train else None},
        "ratio": {"seconds_per_step (round / plain)": common.ratio(per_step, plain_step)},
        "checks": {
            "the round ran to a verdict": result.status in ("published", "rejected"),
            "the round used every rated reply (up to the window)": n == min(len(gens), tcfg.window),
            "the baseline ran its steps": plain["steps"] == args.baseline_steps,
        },
    }


def markdown(d: dict) -> str:
    r, p = d["round"], d["plain"]
    rows = [
        ["wall time of the round, s", r["seconds"], None, None],
        ["training phase, s", r["phases"].get("train"), p["train_s_for_the_same_steps"],
         common.ratio(r["phases"].get("train"), p["train_s_for_the_same_steps"])],
        ["seconds per optimizer step", r["seconds_per_step"], p["seconds_per_step"]["p50"],
         d["ratio"]["seconds_per_step (round / plain)"]],
        ["rated replies per second (whole round)", r["rated_replies_per_s"], None, None],
        ["rated replies per second (training phase)", r["train_replies_per_s"], p["train_replies_per_s"],
         common.ratio(p["train_replies_per_s"], r["train_replies_per_s"])],
    ]
    t = d["settings"]["trainer"]
    phases = ", ".join(f"{k} {v} s" for k, v in r["phases"].items())
    return "\n".join([
        common.header(NAME, f"a training round on {r['replies']} rated replies", d),
        f"{r['summary']} — {r['optimizer_steps']} steps ({t['epochs']} epochs × minibatches of {t['minibatch_size']}), "
        f"LoRA r={t['lora_rank']}, kl_estimator {t['kl_estimator']}; phases: {phases}. Replies: mean "
        f"{d['reply_tokens']['mean']} tokens, sampled in {d['sampling_s']} s.\n",
        common.table(["", "round", "plain LoRA cross-entropy", "cost vs plain (>1: the round is slower)"], rows),
        "",
        "Plain = the same LoRA shape and minibatches, plain cross-entropy + AdamW, no KL reference pass, no gates; "
        f"{p['steps']} timed steps, scaled to the round's step count.",
    ])


def main(argv: list[str] | None = None) -> int:
    return common.main(NAME, build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
