"""Resident memory: the bot's policy with the model and three loaded versions, beside plain transformers + peft.

    python -m bench.memory [--versions 3] [--config X] ...

Each side runs in a fresh Python process (so one side's allocations do not count for the
other), one after the other, and reports its resident set size (VmRSS) after each stage:

    bot     import bot.policy (torch, transformers) → Policy.from_config → one reply →
            install_version + activate of each LoRA version → one reply on the last one
    plain   import torch, transformers, peft → the model in float32 → one plain generate →
            peft PeftModel.from_pretrained / load_adapter of each version → one generate on the last

and its peak (ru_maxrss). The versions (``--versions``, 3 by default: the policy keeps the
active version, the previous one and one being swapped in) are written first, the way the
trainer writes them. Replies are up to ``--new-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench import common

NAME = "memory"
MARK = "BENCH_MEMORY_JSON "
STAGES = ["start", "imports", "model loaded", "after one reply"]


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--versions", type=int, default=3, help="LoRA versions loaded (3)")
    ap.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per side before giving up (1800)")
    ap.add_argument("--child", choices=["bot", "plain"], help=argparse.SUPPRESS)
    ap.add_argument("--data-dir", help=argparse.SUPPRESS)
    ap.add_argument("--versions-json", help=argparse.SUPPRESS)
    return ap


# -- the two sides, each in its own process ----------------------------------------------------

async def bot_side(args, cfg, pvs, info: dict) -> list[tuple[str, float]]:
    out = [("start", common.rss_mib())]
    from bot.policy import Policy
    from bot.policy_types import Turn

    out.append(("imports", common.rss_mib()))
    policy = Policy.from_config(cfg)
    out.append(("model loaded", common.rss_mib()))
    info["engine_in_use"] = common.engine_in_use(policy)
    try:
        await policy.generate([Turn("user", "Hello, who are you?")])
        out.append(("after one reply", common.rss_mib()))
        for i, pv in enumerate(pvs, 1):
            await policy.install_version(pv["version"], pv["path"], pv["sha256"])
            policy.activate(pv["version"])
            out.append((f"+ {i} version{'s' if i > 1 else ''}", common.rss_mib()))
        await policy.generate([Turn("user", "Hello, who are you?")])
        out.append(("one reply on the last version", common.rss_mib()))
    finally:
        policy.close()
    return out


def plain_side(args, cfg, pvs) -> list[tuple[str, float]]:
    out = [("start", common.rss_mib())]
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from bench import workload

    out.append(("imports", common.rss_mib()))
    model, tok = workload.load_plain(cfg)
    out.append(("model loaded", common.rss_mib()))
    text = tok.apply_chat_template([{"role": "user", "content": "Hello, who are you?"}], add_generation_prompt=True,
                                   tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    kw = dict(temperature=args.temperature, top_p=args.top_p, new_tokens=args.new_tokens, first_token=False)
    workload.plain_generate(model, tok, [ids], **kw)
    out.append(("after one reply", common.rss_mib()))
    from peft import PeftModel

    pm = None
    for i, pv in enumerate(pvs, 1):
        name = f"v{pv['version']}"
        if pm is None:
            pm = PeftModel.from_pretrained(model, pv["path"], adapter_name=name)
        else:
            pm.load_adapter(pv["path"], adapter_name=name)
        pm.set_adapter(name)
        out.append((f"+ {i} version{'s' if i > 1 else ''}", common.rss_mib()))
    workload.plain_generate(pm if pm is not None else model, tok, [ids], **kw)
    out.append(("one reply on the last version", common.rss_mib()))
    return out


def child(args) -> int:
    import asyncio

    from pathlib import Path

    cfg = common.bench_config(args, Path(args.data_dir))
    pvs = json.loads(args.versions_json)
    t0, info = time.perf_counter(), {}
    stages = asyncio.run(bot_side(args, cfg, pvs, info)) if args.child == "bot" else plain_side(args, cfg, pvs)
    extra = {"seconds": round(time.perf_counter() - t0, 2), "peak_mib": common.peak_rss_mib()}
    if args.child == "bot":
        extra["settings"] = {**common.settings(cfg), **info}
    print(MARK + json.dumps({"stages": stages, **extra}), flush=True)
    return 0


# -- the parent ---------------------------------------------------------------------------------

def common_flags(args) -> list[str]:
    flags = ["--temperature", str(args.temperature), "--top-p", str(args.top_p), "--new-tokens", str(args.new_tokens),
             "--threads", str(args.threads), "--log-level", args.log_level, "--seed", str(args.seed)]
    if args.config is not None:
        flags += ["--config", str(args.config)]
    if args.engine is not None:
        flags += ["--engine", args.engine]
    return flags


def spawn(args, side: str, data_dir, pvs) -> dict:
    cmd = [sys.executable, "-m", "bench.memory", *common_flags(args), "--child", side, "--data-dir", str(data_dir),
           "--versions-json", json.dumps(pvs)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        return {"error": f"the {side} side exited with {proc.returncode}", "stages": []}
    return json.loads(lines[-1][len(MARK):])


async def run(args) -> dict:
    from bench import workload

    if args.child:
        raise SystemExit("internal: --child runs through main()")
    data_dir = common.temp_dir(NAME)
    cfg = common.bench_config(args, data_dir)
    pvs = [vars(pv) for pv in workload.prepare_versions(cfg, args.versions, seed=args.seed)]
    bot = spawn(args, "bot", data_dir, pvs)
    plain = spawn(args, "plain", data_dir, pvs)
    b, p = dict(bot["stages"]), dict(plain["stages"])
    names = list(dict.fromkeys([s for s, _ in bot["stages"]] + [s for s, _ in plain["stages"]]))
    stages = [{"stage": n, "bot_mib": b.get(n), "plain_mib": p.get(n), "ratio": common.ratio(b.get(n), p.get(n))}
              for n in names]
    last = f"+ {args.versions} version{'s' if args.versions > 1 else ''}"
    return {
        "settings": {**bot.get("settings", common.settings(cfg))}, "versions": args.versions, "stages": stages,
        "bot_peak_mib": bot.get("peak_mib"), "plain_peak_mib": plain.get("peak_mib"),
        "bot_with_versions_mib": b.get(last), "plain_with_versions_mib": p.get(last),
        "errors": [x["error"] for x in (bot, plain) if "error" in x],
        "checks": {"both sides ran": "error" not in bot and "error" not in plain,
                   "every version loaded on both sides": last in b and last in p},
    }


def markdown(d: dict) -> str:
    rows = [[s["stage"], s["bot_mib"], s["plain_mib"], s["ratio"]] for s in d["stages"]]
    rows.append(["peak (ru_maxrss)", d["bot_peak_mib"], d["plain_peak_mib"],
                 common.ratio(d["bot_peak_mib"], d["plain_peak_mib"])])
    st = d["settings"]
    return "\n".join([
        common.header(NAME, "resident memory, MiB", d),
        f"Model {st.get('model')} ({st.get('dtype')}), {d['versions']} LoRA versions; each side in a fresh process.\n",
        common.table(["stage", "bot (Policy)", "plain transformers + peft", "ratio"], rows),
        "" if not d["errors"] else "\nErrors: " + "; ".join(d["errors"]),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.child:
        args = parser.parse_args(argv)
        from bot import process

        process.setup_logging(args.log_level)
        process.set_torch_threads(args.threads)
        return child(args)
    return common.main(NAME, parser, run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
