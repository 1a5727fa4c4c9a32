"""Event-loop lag: how late a 10 ms sleep wakes while replies generate and while a version loads.

    python -m bench.lag [--duration 10] [--talkers 4] [--installs 3] [--config X] ...

A task on the bot's event loop sleeps 10 ms in a loop and records how late it wakes (a late
wake is a late heartbeat, a late Discord/Slack event, a late reply). Its p50/p95/p99/max are
reported per phase, each beside its plain counterpart from the same run:

    idle                        nothing else runs (the floor)
    plain generate in a thread  plain transformers batched generate of --talkers prompts via asyncio.to_thread
    policy replies              --talkers simulated people through ChatCore.on_message
    plain adapter load          peft ``load_adapter`` of each version folder via asyncio.to_thread
    version install             a LoRA version registered active, then ``ChatCore.sync_version``
                                (read + sha256 + parse in a thread, install by the policy, activate)
    install while replying      the same, --installs more times, while the people keep talking

The LoRA versions are written the way the trainer writes them (``Learner.candidate`` +
``trainer.publish.stage``/``commit``, lora_B set to small seeded noise), before the phases.
"""

from __future__ import annotations

import asyncio
import copy
import sys
import time

from bench import common, workload

NAME = "lag"


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--duration", type=float, default=10.0, help="seconds of the idle and generating phases (10)")
    ap.add_argument("--talkers", type=int, default=4, help="people talking / plain batch size (4)")
    ap.add_argument("--installs", type=int, default=3, help="version installs per install phase (3)")
    ap.add_argument("--interval", type=float, default=0.010, help="the probe's sleep (0.010 s)")
    return ap


class Phases:
    """Runs phases one after the other, noting each one's window on the probe."""

    def __init__(self, probe: workload.LagProbe):
        self.probe = probe
        self.rows: dict[str, dict] = {}

    def add(self, name: str, windows: list[tuple[float, float]], **extra) -> None:
        """The probe's wakes in ``windows``, each stretched by two sleeps: the first wake after a
        short window still carries the delay the window caused."""
        tail = 2 * self.probe.interval
        lags = [x for t0, t1 in windows for x in self.probe.between(t0, t1 + tail)]
        ms = common.stats([1000 * x for x in lags], 2)
        self.rows[name] = {"lag_ms": ms, "seconds": common.rnd(sum(t1 - t0 for t0, t1 in windows), 3), **extra}


async def plain_phase(plain, ids, args) -> tuple[float, float]:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.duration:
        await asyncio.to_thread(plain.generate, ids, temperature=args.temperature, top_p=args.top_p,
                                new_tokens=args.new_tokens, first_token=False)
    return t0, time.perf_counter()


async def installs(core, policy, store, pvs) -> tuple[list[tuple[float, float]], list[float], list[bool]]:
    windows, secs, ok = [], [], []
    for pv in pvs:
        t0 = time.perf_counter()
        await workload.register(store, pv)
        await core.sync_version()
        t1 = time.perf_counter()
        windows.append((t0, t1))
        secs.append(t1 - t0)
        ok.append(policy.active_version == pv.version)
        await asyncio.sleep(0.2)           # let the loop settle between installs
    return windows, secs, ok


async def plain_loads(plain_model, pvs) -> tuple[list[tuple[float, float]], list[float]]:
    from peft import PeftModel

    windows, secs, model = [], [], None
    for pv in pvs:
        t0 = time.perf_counter()
        if model is None:
            model = await asyncio.to_thread(PeftModel.from_pretrained, plain_model, pv.path, f"v{pv.version}")
        else:
            await asyncio.to_thread(model.load_adapter, pv.path, f"v{pv.version}")
        t1 = time.perf_counter()
        windows.append((t0, t1))
        secs.append(t1 - t0)
        await asyncio.sleep(0.2)
    return windows, secs


async def run_phases(args, cfg, plain, policy, core, store, pvs) -> tuple[dict, dict]:
    from bot.policy_types import Turn

    probe = workload.LagProbe(args.interval).start()
    ph = Phases(probe)
    k = args.installs
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    ph.add("idle", [(t0, time.perf_counter())])
    ids = [policy.build_prompt([Turn("user", t, f"Person{i}")]) for i, t in enumerate(common.prompts(args.talkers))]
    ph.add("plain generate in a thread", [await plain_phase(plain, ids, args)], batch=args.talkers)
    people = workload.People(core, args.talkers, tag="gen").start()
    t0 = time.perf_counter()
    await asyncio.sleep(args.duration)
    ph.add("policy replies", [(t0, time.perf_counter())], people=args.talkers)
    await people.stop()
    windows, secs = await plain_loads(copy.deepcopy(plain.model), pvs[:k])
    ph.add("plain adapter load", windows, load_s=common.stats(secs))
    windows, secs, ok1 = await installs(core, policy, store, pvs[:k])
    ph.add("version install", windows, install_s=common.stats(secs))
    talking = workload.People(core, args.talkers, tag="swap").start()
    await asyncio.sleep(min(1.0, args.duration))
    windows, secs, ok2 = await installs(core, policy, store, pvs[k:2 * k])
    ph.add("install while replying", windows, install_s=common.stats(secs), people=args.talkers)
    await talking.stop()
    await probe.stop()
    outcomes = people.outcomes + talking.outcomes
    counts = {"replies": sum(o.kind == "reply" for o in outcomes),
              "failed": sum(o.kind in ("error", "exception", "none") for o in outcomes),
              "busy": sum(o.kind == "busy" for o in outcomes), "installed": ok1 + ok2}
    return ph.rows, counts


async def run(args) -> dict:
    from bot.chat import ChatCore
    from bot.policy import Policy
    from bot.policy_types import Turn
    from bot.store import Store

    cfg = common.bench_config(args, common.temp_dir(NAME))
    cfg.serving.queue_size = max(cfg.serving.queue_size, args.talkers)
    pvs = workload.prepare_versions(cfg, 2 * args.installs, seed=args.seed)
    plain = workload.Plain(cfg)
    policy = Policy.from_config(cfg)
    store = await Store.open(cfg.db_path)
    try:
        core = ChatCore(cfg, store, policy)
        await policy.generate([Turn("user", "warm up")])
        rows, counts = await run_phases(args, cfg, plain, policy, core, store, pvs)
        engine = common.engine_in_use(policy)
    finally:
        await store.close()
        policy.close()
    p99 = {name: r["lag_ms"]["p99"] for name, r in rows.items()}
    return {
        "settings": {**common.settings(cfg), "engine_in_use": engine, "plain_torch_threads": plain.threads},
        "interval_ms": 1000 * args.interval, "phases": rows, "counts": counts,
        "ratio_p99": {"policy replies / plain generate": common.ratio(p99["policy replies"],
                                                                      p99["plain generate in a thread"]),
                      "version install / plain adapter load": common.ratio(p99["version install"],
                                                                           p99["plain adapter load"])},
        "checks": {"every version installed and activated": all(counts["installed"]),
                   "no failed replies": counts["failed"] == 0,
                   "the probe woke in every phase": all(r["lag_ms"]["n"] > 0 for r in rows.values())},
    }


def markdown(d: dict) -> str:
    ph = d["phases"]

    def row(name, plain_name):
        a, b = ph[name]["lag_ms"], ph[plain_name]["lag_ms"] if plain_name else None
        return [name, a["n"], a["p50"], a["p95"], a["p99"], a["max"], plain_name or "", None if b is None else b["p99"],
                None if b is None else common.ratio(a["p99"], b["p99"])]

    rows = [row("idle", None), row("policy replies", "plain generate in a thread"),
            row("version install", "plain adapter load"), row("install while replying", "plain adapter load")]
    inst = ph["version install"]["install_s"]
    return "\n".join([
        common.header(NAME, f"event-loop lag (a {d['interval_ms']:g} ms sleep, how late it wakes)", d),
        common.table(["phase", "samples", "p50 ms", "p95 ms", "p99 ms", "max ms", "plain counterpart",
                      "plain p99 ms", "p99 ratio (<1: product better)"], rows),
        "",
        f"Version install (register → ChatCore.sync_version done): p50 {inst['p50']} s, max {inst['max']} s; plain "
        f"peft load_adapter p50 {ph['plain adapter load']['load_s']['p50']} s. Idle p99 "
        f"{ph['idle']['lag_ms']['p99']} ms. Replies during the phases: {d['counts']['replies']}, failed "
        f"{d['counts']['failed']}, busy {d['counts']['busy']}.",
    ])


def main(argv: list[str] | None = None) -> int:
    return common.main(NAME, build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
