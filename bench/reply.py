"""Reply speed: one reply, and 16 at once, for the product's policy beside plain transformers.

    python -m bench.reply [--runs 10] [--warmup 1] [--concurrent 16] [--concurrent-runs 3]
                          [--config reactlearn.toml] [--engine ctranslate2|torch] [--new-tokens 48] ...

The product: ``Policy.from_config`` → ``generate(turns)`` (the chat template and the system
prompt, the queue, the worker thread, logprobs), as the chat core calls it. Time to first
token comes from ``generate(turns, on_partial=callback)`` where the policy's ``generate``
takes ``on_partial`` (the first call of the callback, on the event loop); otherwise it is
reported as not available. Tokens are the ones actually generated (a reply may end early).

The baseline, in the same process and the same run: plain transformers ``model.generate``
in float32 on the same model folder, the same prompt token ids and sampling settings,
forced to exactly ``--new-tokens`` new tokens (``min_new_tokens``); its first token is timed
with a transformers streamer. 16 at once: 16 concurrent ``generate`` calls on the policy
(batched by its worker as configured: ``serving.batch_size``) against one plain batched
``generate`` of the same 16 prompts.

Policy and plain runs alternate, so a change in the machine's load hits both.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import time

from bench import common, workload

NAME = "reply"
PROMPT = "Hello, who are you?"


def turn(text: str):
    from bot.policy_types import Turn

    return Turn("user", text)


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--runs", type=int, default=10, help="single replies per side (10)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed replies per side first (1)")
    ap.add_argument("--concurrent", type=int, default=16, help="requests at once (16)")
    ap.add_argument("--concurrent-runs", type=int, default=3, help="rounds of --concurrent requests per side (3)")
    return ap


def takes_on_partial(policy) -> bool:
    try:
        return "on_partial" in inspect.signature(policy.generate).parameters
    except (TypeError, ValueError):
        return False


async def policy_reply(policy, turns, partial: bool) -> dict:
    """One ``policy.generate``; seconds, ttft (None without on_partial), tokens, partial calls."""
    calls: list[float] = []
    t0 = time.perf_counter()
    if partial:
        gen = await policy.generate(turns, on_partial=lambda text: calls.append(time.perf_counter()))
    else:
        gen = await policy.generate(turns)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ttft": calls[0] - t0 if calls else None, "tokens": len(gen.output_ids),
            "partials": len(calls), "text": gen.text}


def side(runs: list[dict]) -> dict:
    secs, toks = [r["seconds"] for r in runs], [r["tokens"] for r in runs]
    return {"runs": len(runs), "ttft_s": common.stats([r["ttft"] for r in runs]), "total_s": common.stats(secs),
            "tokens": common.stats(toks, 2), "tokens_per_s": common.rnd(sum(toks) / sum(secs), 2),
            "ms_per_token": common.rnd(1000 * sum(secs) / max(sum(toks), 1), 2)}


def speedup(pol: dict, plain: dict) -> dict:
    """>1: the policy is faster. Times: plain / policy; rates: policy / plain."""
    return {"tokens_per_s": common.ratio(pol["tokens_per_s"], plain["tokens_per_s"]),
            "ms_per_token": common.ratio(plain["ms_per_token"], pol["ms_per_token"]),
            "ttft_p50": common.ratio(plain["ttft_s"]["p50"], pol["ttft_s"]["p50"]),
            "ttft_p95": common.ratio(plain["ttft_s"]["p95"], pol["ttft_s"]["p95"]),
            "total_p50": common.ratio(plain["total_s"]["p50"], pol["total_s"]["p50"]),
            "total_p95": common.ratio(plain["total_s"]["p95"], pol["total_s"]["p95"])}


async def singles(args, policy, plain, prompt_ids, partial: bool) -> dict:
    turns = [turn(PROMPT)]
    kw = dict(temperature=args.temperature, top_p=args.top_p, new_tokens=args.new_tokens)
    for _ in range(args.warmup):
        await policy_reply(policy, turns, partial)
        plain.generate([prompt_ids], **kw)
    pol, base = [], []
    for _ in range(args.runs):
        pol.append(await policy_reply(policy, turns, partial))
        base.append(plain.generate([prompt_ids], **kw))
    p, b = side(pol), side(base)
    return {"policy": {**p, "partial_calls_per_reply": common.rnd(sum(r["partials"] for r in pol) / len(pol), 2)},
            "plain": b, "speedup": speedup(p, b), "example": pol[-1]["text"]}


async def at_once(args, policy, plain, partial: bool) -> dict:
    texts = common.prompts(args.concurrent)
    ids = [policy.build_prompt([turn(t)]) for t in texts]
    kw = dict(temperature=args.temperature, top_p=args.top_p, new_tokens=args.new_tokens)
    walls, answered, per_request, base = [], [], [], []
    for _ in range(args.concurrent_runs):
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(policy_reply(policy, [turn(t)], partial) for t in texts))
        walls.append((time.perf_counter() - t0, sum(r["tokens"] for r in runs)))
        answered.append(len(runs))
        per_request += runs
        base.append(plain.generate(ids, **kw))
    pol_tps = sum(n for _, n in walls) / sum(s for s, _ in walls)
    plain_tps = sum(b["tokens"] for b in base) / sum(b["seconds"] for b in base)
    return {
        "requests": args.concurrent, "runs": args.concurrent_runs, "answered": answered,
        "policy": {"tokens_per_s": common.rnd(pol_tps, 2), "wall_s": common.stats([s for s, _ in walls]),
                   "tokens": sum(n for _, n in walls), "per_request_ttft_s": common.stats([r["ttft"] for r in per_request]),
                   "per_request_total_s": common.stats([r["seconds"] for r in per_request])},
        "plain": {"tokens_per_s": common.rnd(plain_tps, 2), "wall_s": common.stats([b["seconds"] for b in base]),
                  "tokens": sum(b["tokens"] for b in base), "ttft_s": common.stats([b["ttft"] for b in base])},
        "speedup": {"tokens_per_s": common.ratio(pol_tps, plain_tps)},
    }


async def run(args) -> dict:
    from bot.policy import Policy

    cfg = common.bench_config(args, common.temp_dir(NAME))
    cfg.serving.queue_size = max(cfg.serving.queue_size, args.concurrent)   # 16 at once must not be "busy"
    plain = workload.Plain(cfg)                  # first: see workload.Plain
    t0 = time.perf_counter()
    Policy.from_config(cfg).close()              # a fresh data dir: the engine's one-time preparation included
    first_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    policy = Policy.from_config(cfg)             # the same data dir again: a later start
    policy_load = time.perf_counter() - t0
    try:
        partial = takes_on_partial(policy)
        prompt_ids = policy.build_prompt([turn(PROMPT)])
        one = await singles(args, policy, plain, prompt_ids, partial)
        many = await at_once(args, policy, plain, partial)
        engine = common.engine_in_use(policy)
    finally:
        policy.close()
    forced = args.new_tokens
    return {
        "settings": {**common.settings(cfg), "engine_in_use": engine, "plain_torch_threads": plain.threads},
        "prompt": PROMPT, "prompt_tokens": len(prompt_ids), "ttft_available": partial,
        "load_s": {"policy_first": common.rnd(first_load), "policy": common.rnd(policy_load),
                   "plain": common.rnd(plain.load_s)},
        "single": one, "concurrent": many,
        "checks": {
            "every policy reply has tokens": one["policy"]["tokens"]["n"] == args.runs and
                                             (one["policy"]["tokens"]["max"] or 0) >= 1,
            "plain baseline made exactly --new-tokens per reply": one["plain"]["tokens"]["p50"] == forced and
                                                                   one["plain"]["tokens"]["max"] == forced,
            "every concurrent request answered": many["answered"] == [args.concurrent] * args.concurrent_runs,
            "ttft measured where on_partial exists": (not partial) or one["policy"]["ttft_s"]["n"] == args.runs,
        },
    }


def markdown(d: dict) -> str:
    s, c = d["single"], d["concurrent"]
    p, b, x = s["policy"], s["plain"], s["speedup"]
    na = "" if d["ttft_available"] else " (policy: generate has no on_partial)"
    rows = [
        [f"time to first token p50, s{na}", p["ttft_s"]["p50"], b["ttft_s"]["p50"], x["ttft_p50"]],
        ["time to first token p95, s", p["ttft_s"]["p95"], b["ttft_s"]["p95"], x["ttft_p95"]],
        ["whole reply p50, s", p["total_s"]["p50"], b["total_s"]["p50"], x["total_p50"]],
        ["whole reply p95, s", p["total_s"]["p95"], b["total_s"]["p95"], x["total_p95"]],
        ["tokens per reply (mean)", p["tokens"]["mean"], b["tokens"]["mean"], None],
        ["tokens/s", p["tokens_per_s"], b["tokens_per_s"], x["tokens_per_s"]],
        ["ms per token", p["ms_per_token"], b["ms_per_token"], x["ms_per_token"]],
    ]
    crow = [
        [f"{c['requests']} at once: total tokens/s", c["policy"]["tokens_per_s"], c["plain"]["tokens_per_s"],
         c["speedup"]["tokens_per_s"]],
        [f"{c['requests']} at once: wall p50, s", c["policy"]["wall_s"]["p50"], c["plain"]["wall_s"]["p50"],
         common.ratio(c["plain"]["wall_s"]["p50"], c["policy"]["wall_s"]["p50"])],
        ["per request: first token p50, s", c["policy"]["per_request_ttft_s"]["p50"], c["plain"]["ttft_s"]["p50"], None],
        ["per request: whole reply p95, s", c["policy"]["per_request_total_s"]["p95"], c["plain"]["wall_s"]["p95"], None],
        ["model load, fresh data dir, s", d["load_s"]["policy_first"], d["load_s"]["plain"],
         common.ratio(d["load_s"]["plain"], d["load_s"]["policy_first"])],
        ["model load, later start, s", d["load_s"]["policy"], d["load_s"]["plain"],
         common.ratio(d["load_s"]["plain"], d["load_s"]["policy"])],
    ]
    st = d["settings"]
    return "\n".join([
        common.header(NAME, "reply speed, the policy vs plain transformers generate", d),
        f"Model {st['model']} ({st['dtype']}), temperature {st['sampling']['temperature']}, top-p "
        f"{st['sampling']['top_p']}, up to {st['sampling']['max_new_tokens']} new tokens (plain: exactly that many), "
        f"serving.batch_size {st['serving']['batch_size']}; prompt {d['prompt_tokens']} tokens; {s['policy']['runs']} "
        f"single runs and {c['runs']} × {c['requests']} at once per side, alternating.\n",
        common.table(["one reply", "policy", "plain generate fp32", "speedup (>1: policy faster)"], rows),
        "",
        common.table(["at once", "policy", "plain batched generate", "speedup"], crow),
        "",
        "Whole-reply times compare replies of different lengths when the policy stops early; tokens/s and ms per "
        "token do not. Plain first token at once = the batch's first step. Model load: the plain one is "
        "loaded first (cold file cache); the policy's fresh-data-dir load includes what its engine prepares once "
        "(CTranslate2: the conversion), the later start reuses it.",
        "",
        f"Example reply: {s['example']!r}",
    ])


def main(argv: list[str] | None = None) -> int:
    return common.main(NAME, build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
