"""Load: 1, 4 and 16 simulated people talking to the bot, through the real ChatCore.on_message.

    python -m bench.load [--people 1,4,16] [--duration 60] [--baseline-runs 2] [--config X] ...

Each person sends a message (a mention, so the core answers; not rate limited), waits for
the reply, and sends the next, for ``--duration`` seconds; replies in flight at the end are
waited for and counted, and the elapsed time runs until the last one. The store is a real
SQLite file in a temp folder; the policy is ``Policy.from_config``. Per level:

    replies/min        replies sent / elapsed
    latency p50, p95   message in → reply sent (the reply is recorded just before it is sent)
    max queue depth    the policy's waiting requests (``Policy.waiting``), sampled every 5 ms
    busy, errors       "busy, try again" answers; error answers and exceptions
    tokens/s           generated tokens of all replies (from the store) / elapsed

The baseline beside each level, in the same run just before it: plain transformers batched
``generate`` of N prompts (N = the level, the prompts the people send first), exactly
``--new-tokens`` tokens each, ``--baseline-runs`` times: what N people would get if each
round of their messages were one plain batch (replies/min = N / batch seconds × 60,
latency = batch seconds).
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench import common, workload

NAME = "load"


def people_levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--people takes comma-separated counts like 1,4,16, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise SystemExit("--people: each level must be at least 1")
    return levels


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--people", type=people_levels, default=[1, 4, 16], help="levels, comma-separated (1,4,16)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level (60)")
    ap.add_argument("--baseline-runs", type=int, default=2, help="plain batches per level (2)")
    ap.add_argument("--stream", type=float, default=None, metavar="SECONDS",
                    help="pass ChatCore.on_message a stream with this min_interval (replies shown as they are "
                         "written) and report the time to the first text; default: whole replies via send")
    return ap


def baseline(plain, policy, n: int, args) -> dict:
    from bot.policy_types import Turn

    texts = common.prompts(n)
    ids = [policy.build_prompt([Turn("user", t, f"Person{i}")]) for i, t in enumerate(texts)]
    runs = [plain.generate(ids, temperature=args.temperature, top_p=args.top_p, new_tokens=args.new_tokens,
                           first_token=False) for _ in range(args.baseline_runs)]
    secs = [r["seconds"] for r in runs]
    return {"batch_s": common.stats(secs), "replies_per_min": common.rnd(60 * n * len(runs) / sum(secs), 1),
            "tokens_per_s": common.rnd(sum(r["tokens"] for r in runs) / sum(secs), 2)}


async def level(core, policy, store, plain, n: int, args) -> dict:
    base = baseline(plain, policy, n, args)
    monitor = workload.DepthMonitor(policy).start()
    people = workload.People(core, n, tag=f"n{n}", stream=args.stream).start()
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    await people.stop()
    elapsed = time.perf_counter() - t0
    depth = await monitor.stop()
    rows = await workload.reply_rows(store, people.outcomes)
    replies = [o for o in people.outcomes if o.kind == "reply"]
    tokens = sum(rows[o.reply_id][1] for o in replies)
    errors = people.count("error") + people.count("exception") + people.count("none")
    rpm = 60 * len(replies) / elapsed
    tps = tokens / elapsed
    return {
        "people": n, "elapsed_s": common.rnd(elapsed, 2), "messages": len(people.outcomes), "replies": len(replies),
        "recorded": len(rows), "replies_per_min": common.rnd(rpm, 1),
        "latency_s": common.stats([o.latency for o in replies]), "max_queue_depth": depth,
        "first_text_s": common.stats([o.first_text_latency for o in replies]),
        "busy": people.count("busy"), "errors": errors, "tokens": tokens, "tokens_per_s": common.rnd(tps, 2),
        "error_details": sorted({o.detail for o in people.outcomes if o.kind in ("error", "exception", "none")})[:5],
        "plain": base,
        "ratio": {"replies_per_min": common.ratio(rpm, base["replies_per_min"]),
                  "tokens_per_s": common.ratio(tps, base["tokens_per_s"]),
                  "latency_p50": common.ratio(base["batch_s"]["p50"],
                                              common.percentile([o.latency for o in replies], 50))},
    }


async def run(args) -> dict:
    from bot.chat import ChatCore
    from bot.policy import Policy
    from bot.policy_types import Turn
    from bot.store import Store

    cfg = common.bench_config(args, common.temp_dir(NAME))
    cfg.serving.queue_size = max(cfg.serving.queue_size, max(args.people))   # one message in flight per person
    plain = workload.Plain(cfg)
    policy = Policy.from_config(cfg)
    store = await Store.open(cfg.db_path)
    try:
        core = ChatCore(cfg, store, policy)
        await policy.generate([Turn("user", "warm up")])
        levels = [await level(core, policy, store, plain, n, args) for n in args.people]
        engine = common.engine_in_use(policy)
    finally:
        await store.close()
        policy.close()
    return {
        "settings": {**common.settings(cfg), "engine_in_use": engine, "plain_torch_threads": plain.threads},
        "duration_s": args.duration, "stream": args.stream, "levels": levels,
        "checks": {
            "no error answers": all(lv["errors"] == 0 for lv in levels),
            "every level got replies": all(lv["replies"] > 0 for lv in levels),
            "every reply is in the store": all(lv["recorded"] == lv["replies"] for lv in levels),
            "no busy answers (queue_size >= people)": all(lv["busy"] == 0 for lv in levels),
        },
    }


def markdown(d: dict) -> str:
    rows = [[lv["people"], lv["replies_per_min"], lv["plain"]["replies_per_min"], lv["ratio"]["replies_per_min"],
             lv["latency_s"]["p50"], lv["latency_s"]["p95"], lv["first_text_s"]["p50"], lv["plain"]["batch_s"]["p50"],
             lv["max_queue_depth"],
             lv["busy"], lv["errors"], lv["tokens_per_s"], lv["plain"]["tokens_per_s"], lv["ratio"]["tokens_per_s"]]
            for lv in d["levels"]]
    st = d["settings"]
    return "\n".join([
        common.header(NAME, "simulated people through ChatCore.on_message", d),
        f"{d['duration_s']:g} s per level; up to {st['sampling']['max_new_tokens']} new tokens (plain: exactly), "
        f"temperature {st['sampling']['temperature']}, top-p {st['sampling']['top_p']}, serving.batch_size "
        f"{st['serving']['batch_size']}, queue_size {st['serving']['queue_size']}.\n",
        common.table(["people", "replies/min", "plain replies/min", "ratio", "latency p50 s", "latency p95 s",
                      "first text p50 s", "plain batch s", "max queue", "busy", "errors", "tokens/s", "plain tokens/s", "ratio"], rows),
        "",
        ("Streaming: replies shown as written (min_interval %gs); first text = stream.start. " % d["stream"]
         if d["stream"] is not None else "Whole replies through send (no stream): first text n/a. ") +
        "Plain = back-to-back plain batched generate of N prompts (N = people), the ideal batching of one round "
        "of messages, without the store, the queue or logprobs.",
    ])


def main(argv: list[str] | None = None) -> int:
    return common.main(NAME, build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
