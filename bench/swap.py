"""Hot-swap under load: 20 versions activated while people keep talking; no reply may fail.

    python -m bench.swap [--swaps 20] [--talkers 4] [--baseline-seconds 10] [--poll-seconds S] [--config X] ...

The bot side runs as in production: ``ChatCore.run_background`` polls the registry every
``serving.poll_seconds`` (``--poll-seconds`` overrides it) and ``sync_version`` installs and
activates a new version; ``--talkers`` simulated people talk through ``ChatCore.on_message``
the whole time. The trainer side is reduced to its last step: the LoRA version folders are
written beforehand (as a round writes them), and each swap registers one as published and
active through a second connection to the database, as the trainer process would.

Per swap: activation → swapped (``Policy.activate`` returned; includes waiting for the next
poll and the install), swapped → first reply with the new version, and activation → first reply
recorded with the new version (the reply row is written just before it is sent). The next
swap starts when a message sent after this swap has been answered.

Counted: failed replies (error answers, exceptions, no answer; must be 0), busy answers,
stale replies (asked after a swap finished, answered by an older version; must be 0), and
the resident memory before and after the swaps. The baseline beside it, in the same run:
the same people for ``--baseline-seconds`` before the first swap (reply latency and
replies/min without swaps).
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench import common, workload

NAME = "swap"


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--swaps", type=int, default=20, help="versions activated one after the other (20)")
    ap.add_argument("--talkers", type=int, default=4, help="people talking the whole time (4)")
    ap.add_argument("--baseline-seconds", type=float, default=10.0, help="talking without swaps first (10)")
    ap.add_argument("--poll-seconds", type=float, default=None, help="serving.poll_seconds (default: the config's)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up on a swap after this many seconds (300)")
    return ap


def note_activations(policy) -> dict[int, float]:
    """version → perf_counter when ``policy.activate`` returned for it (the swap). Wraps the
    instance's method: polling ``active_version`` from the event loop would notice late
    whenever the install had held the loop up."""
    seen: dict[int, float] = {}
    activate = policy.activate

    def noted(version: int) -> None:
        activate(version)
        seen.setdefault(version, time.perf_counter())

    policy.activate = noted
    return seen


async def one_swap(pv, policy, people, trainer_store, seen: dict[int, float], timeout: float) -> dict:
    activated = await workload.register(trainer_store, pv)
    swapped_ok = await common.wait_for(lambda: pv.version in seen, timeout)
    swapped = seen.get(pv.version, time.perf_counter())
    answered_ok = await common.wait_for(
        lambda: any(o.started > swapped for o in people.outcomes[-4 * people.n:]), timeout)
    return {"version": pv.version, "activated": activated, "swapped": swapped if swapped_ok else None,
            "answered": answered_ok, "rss_mib": common.rss_mib()}


def per_swap(swaps: list[dict], outcomes, rows: dict) -> list[dict]:
    """Activation → swapped → first reply recorded with the version, per swap."""
    out = []
    for s in swaps:
        firsts = [o.sent for o in outcomes if o.kind == "reply" and o.sent is not None
                  and rows[o.reply_id][0] == s["version"]]
        first = min(firsts) if firsts else None
        out.append({"version": s["version"],
                    "to_swapped_s": common.rnd(s["swapped"] - s["activated"], 4) if s["swapped"] else None,
                    "swapped_to_first_reply_s": common.rnd(first - s["swapped"], 4) if first and s["swapped"] else None,
                    "to_first_reply_s": common.rnd(first - s["activated"], 4) if first else None,
                    "replies": len(firsts), "rss_mib": s["rss_mib"]})
    return out


def stale(swaps: list[dict], outcomes, rows: dict) -> int:
    """Replies asked after swap k finished but answered by a version older than k's."""
    n = 0
    for o in outcomes:
        if o.kind != "reply":
            continue
        done = [s["version"] for s in swaps if s["swapped"] is not None and s["swapped"] < o.started]
        if done and rows[o.reply_id][0] < max(done):
            n += 1
    return n


def phase(outcomes, since: float, until: float) -> dict:
    replies = [o for o in outcomes if o.kind == "reply" and since <= o.started < until]
    span = max(until - since, 1e-9)
    return {"replies": len(replies), "replies_per_min": common.rnd(60 * len(replies) / span, 1),
            "latency_s": common.stats([o.latency for o in replies]), "seconds": common.rnd(span, 2)}


async def talk_and_swap(args, cfg, policy, core, store, pvs) -> dict:
    from bot.store import Store

    trainer_store = await Store.open(cfg.db_path)
    seen = note_activations(policy)
    background = asyncio.create_task(core.run_background({}))
    people = workload.People(core, args.talkers, tag="swap").start()
    try:
        t0 = time.perf_counter()
        await asyncio.sleep(args.baseline_seconds)
        t1, rss_before = time.perf_counter(), common.rss_mib()
        swaps = [await one_swap(pv, policy, people, trainer_store, seen, args.timeout) for pv in pvs]
        t2 = time.perf_counter()
    finally:
        await people.stop()
        background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await trainer_store.close()
    rows = await workload.reply_rows(store, people.outcomes)
    outs = people.outcomes
    return {"swaps": swaps, "per_swap": per_swap(swaps, outs, rows), "stale": stale(swaps, outs, rows),
            "baseline": phase(outs, t0, t1), "during": phase(outs, t1, t2), "rss_before": rss_before,
            "rss_after": common.rss_mib(), "outcomes": outs, "rows": rows}


async def run(args) -> dict:
    from bot.chat import ChatCore
    from bot.policy import Policy
    from bot.policy_types import Turn
    from bot.store import Store

    cfg = common.bench_config(args, common.temp_dir(NAME))
    if args.poll_seconds is not None:
        cfg.serving.poll_seconds = args.poll_seconds
    cfg.serving.queue_size = max(cfg.serving.queue_size, args.talkers)
    pvs = workload.prepare_versions(cfg, args.swaps, seed=args.seed)
    policy = Policy.from_config(cfg)
    store = await Store.open(cfg.db_path)
    try:
        core = ChatCore(cfg, store, policy)
        await policy.generate([Turn("user", "warm up")])
        r = await talk_and_swap(args, cfg, policy, core, store, pvs)
        engine = common.engine_in_use(policy)
    finally:
        await store.close()
        policy.close()
    outs = r["outcomes"]
    failed = [o for o in outs if o.kind in ("error", "exception", "none")]
    ps = r["per_swap"]
    return {
        "settings": {**common.settings(cfg), "engine_in_use": engine},
        "swaps": len(ps), "people": args.talkers, "messages": len(outs),
        "replies": sum(o.kind == "reply" for o in outs), "failed_replies": len(failed),
        "failed_details": sorted({o.detail for o in failed})[:5], "busy": sum(o.kind == "busy" for o in outs),
        "stale_version_replies": r["stale"],
        "activation_to_first_reply_s": common.stats([s["to_first_reply_s"] for s in ps]),
        "activation_to_swapped_s": common.stats([s["to_swapped_s"] for s in ps]),
        "swapped_to_first_reply_s": common.stats([s["swapped_to_first_reply_s"] for s in ps]),
        "baseline_no_swaps": r["baseline"], "during_swaps": r["during"],
        "latency_ratio_p95": common.ratio(r["during"]["latency_s"]["p95"], r["baseline"]["latency_s"]["p95"]),
        "rss_mib": {"before_swaps": r["rss_before"], "after_swaps": r["rss_after"],
                    "versions_loaded_at_end": policy_loaded(policy)},
        "per_swap": ps,
        "checks": {
            "no failed replies": not failed,
            "every swap activated": all(s["swapped"] is not None for s in r["swaps"]),
            "every swap answered by its version": all(s["replies"] > 0 for s in ps),
            "no stale-version replies": r["stale"] == 0,
            "every reply is in the store": len(r["rows"]) == sum(o.kind == "reply" for o in outs),
        },
    }


def policy_loaded(policy) -> int | None:
    """How many versions (the base included) the policy holds; read from its private map (no
    public accessor yet), None when it has none."""
    loaded = getattr(policy, "_loaded", None)
    return len(loaded) if loaded is not None else None


def markdown(d: dict) -> str:
    a, b = d["during_swaps"], d["baseline_no_swaps"]
    rows = [
        ["replies/min", a["replies_per_min"], b["replies_per_min"], common.ratio(a["replies_per_min"],
                                                                                 b["replies_per_min"])],
        ["reply latency p50, s", a["latency_s"]["p50"], b["latency_s"]["p50"],
         common.ratio(a["latency_s"]["p50"], b["latency_s"]["p50"])],
        ["reply latency p95, s", a["latency_s"]["p95"], b["latency_s"]["p95"], d["latency_ratio_p95"]],
        ["replies", a["replies"], b["replies"], None],
    ]
    x, y, z = d["activation_to_first_reply_s"], d["activation_to_swapped_s"], d["swapped_to_first_reply_s"]
    srows = [["activation → first reply on the new version, s", x["p50"], x["p95"], x["max"]],
             ["activation → swapped (incl. the poll wait), s", y["p50"], y["p95"], y["max"]],
             ["swapped → first reply, s", z["p50"], z["p95"], z["max"]]]
    rss = d["rss_mib"]
    st = d["settings"]
    return "\n".join([
        common.header(NAME, f"{d['swaps']} hot-swaps under load ({d['people']} people talking)", d),
        f"**Failed replies: {d['failed_replies']}** (busy {d['busy']}, stale-version {d['stale_version_replies']}) of "
        f"{d['messages']} messages; serving.poll_seconds {st['serving']['poll_seconds']}.\n",
        common.table(["per swap", "p50", "p95", "max"], srows),
        "",
        common.table(["", "during swaps", "before (no swaps)", "ratio"], rows),
        "",
        f"Resident memory: {rss['before_swaps']} MiB before the swaps, {rss['after_swaps']} MiB after "
        f"({rss['versions_loaded_at_end']} versions loaded at the end, the base included).",
    ])


def main(argv: list[str] | None = None) -> int:
    return common.main(NAME, build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
