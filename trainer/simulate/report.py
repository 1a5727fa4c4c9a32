"""The simulation's output: per-round lines, the summary, simulate.json and the learning-curve PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .people import Asked
from .tastes import Taste

N_EXAMPLES = 5


def _fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_row(row: dict) -> None:
    train = row.get("train") or {}
    trained = (f"train {train['status']}" + (f" v{train['version']}" if train.get("version") is not None else "")
               + f" KL {_fmt(train.get('kl'), '.4f')}"
               + (f", {train['n_degenerate']} degenerate" if train.get("n_degenerate") else "")) if train else "eval only"
    print(f"round {row['round']!s:>5}: v{row['serving_version']} like-rate {row['like_rate']:.2f}  "
          f"reward {_fmt(row['mean_reward'], '+.2f')}  words {row['mean_words']:.1f}  "
          f"emoji-spam {row['symbol_spam_share']:.2f}  "
          f"KL(v{row['serving_version']}) {_fmt(row['serving_kl'], '.4f')}  | {trained}  "
          f"| {row['seconds']:.0f}s (gen {row['generate_seconds']:.0f}s)", flush=True)
    if row.get("served_kl") is not None:
        print(f"         on these {row['n_replies']} replies: KL(v{row['serving_version']} ‖ base) "
              f"{row['served_kl']:.4f} nats/token, base-model NLL {row['base_nll']:.3f} nats/token", flush=True)
    if train.get("reason"):
        print(f"         reason: {train['reason']}", flush=True)


def same_prompt_eval(first: dict, base_extra: dict | None, final: dict, taste: Taste) -> dict:
    """Base model against the last version on the same prompts: round 1's (answered by v0 in
    round 1) plus the extra ones (answered by v0 before round 1), both judged by ``taste``
    (the taste at the end, should it have changed during the run)."""
    before = first["replies"] + (base_extra["replies"] if base_extra else [])
    after = final["replies"]
    rate = lambda rows: sum(taste.liked(r["text"]) for r in rows) / max(1, len(rows))   # noqa: E731
    return {"prompts": len(after), "base_version": first["serving_version"], "base_like_rate": rate(before),
            "final_version": final["serving_version"], "final_like_rate": rate(after),
            "same_prompts": [r["prompt"] for r in before] == [r["prompt"] for r in after]}


def examples(before: list[Asked], after: list[Asked], taste: Taste, same_prompts: bool) -> list[dict]:
    """Before/after reply pairs: the same prompts when the final evaluation ran."""
    out = []
    for b, a in list(zip(before, after))[:N_EXAMPLES]:
        item = {"prompt": b.prompt, "before": b.sent_text, "before_liked": taste.liked(b.sent_text),
                "after": a.sent_text, "after_liked": taste.liked(a.sent_text)}
        if not same_prompts:
            item["after_prompt"] = a.prompt
        out.append(item)
    return out


def write_json(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def curve_points(results: dict) -> tuple[list, list, list, list]:
    """(x, like-rate) and (x, KL) against training rounds done before the replies were written."""
    rows = results["rounds"] + ([results["final"]] if results.get("final") else [])
    xs = list(range(len(rows)))
    likes = [r["like_rate"] for r in rows]
    kl_x, kls = [0], [0.0]
    for i, r in enumerate(results["rounds"], start=1):
        t = r.get("train") or {}
        if t.get("kl") is not None:
            kl_x.append(i)
            kls.append(t["kl"])
    return xs, likes, kl_x, kls


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, likes, kl_x, kls = curve_points(results)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(xs, likes, "o-", color="tab:blue", label="like-rate (before flips)")
    rewards = [r["mean_reward"] for r in results["rounds"] + ([results["final"]] if results.get("final") else [])]
    ax.plot(xs, [(r + 1) / 2 if r is not None else None for r in rewards], ".:", color="tab:cyan",
            label="share of up votes (after flips)")
    if results.get("final"):
        ev = results.get("eval") or {}
        label = f"evaluation on the same {ev.get('prompts', '')} prompts: base vs last version"
        ax.plot([0, xs[-1]], [ev.get("base_like_rate", likes[0]), likes[-1]], "*", color="tab:purple",
                markersize=13, label=label)
    ax.set_xlabel("training rounds done before the replies")
    ax.set_ylabel("like-rate")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(kl_x, kls, "s--", color="tab:red", label="KL to base (nats/token, probe)")
    ax2.set_ylabel("KL to base (nats/token)")
    ax2.set_ylim(0, max(0.1, max(kls) * 1.2))
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], loc="upper left", fontsize=8)
    ax.set_title(f"taste {results['taste']}: {results['replies']} replies x {len(results['rounds'])} rounds, "
                 f"{_who(results)}, flip {results['flip']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _who(results: dict) -> str:
    if results.get("vote_rate") is None:
        return f"{results['voters']} voters"
    return f"vote rate {results['vote_rate']}, crowd {results['crowd']}, dissent {results['dissent']}"


def print_summary(results: dict) -> None:
    rows = results["rounds"]
    first, last = rows[0], results.get("final") or rows[-1]
    kl = last.get("serving_kl")        # of the version that wrote the last replies (a rejected candidate's is not)
    print(f"\nlike-rate {first['like_rate']:.2f} (round 1, v{first['serving_version']}) -> {last['like_rate']:.2f} "
          f"(round {last['round']}, v{last['serving_version']}); KL to base: probes {_fmt(kl, '.4f')}, "
          f"served replies {_fmt(last.get('served_kl'), '.4f')}; base-model NLL of the replies "
          f"{_fmt(first.get('base_nll'), '.2f')} -> {_fmt(last.get('base_nll'), '.2f')}; "
          f"words {first['mean_words']:.1f} -> {last['mean_words']:.1f}; replies with emoji spam "
          f"{first['symbol_spam_share']:.2f} -> {last['symbol_spam_share']:.2f}; {results['total_seconds']:.0f}s in all")
    ev = results.get("eval")
    if ev:
        print(f"same {ev['prompts']} prompts: like-rate {ev['base_like_rate']:.2f} (v{ev['base_version']}) -> "
              f"{ev['final_like_rate']:.2f} (v{ev['final_version']})")
    for e in results["examples"]:
        print(f"\nQ: {e['prompt']}\n  before ({'liked' if e['before_liked'] else 'not liked'}): {e['before']}\n"
              f"  after  ({'liked' if e['after_liked'] else 'not liked'}): {e['after']}")

