"""The /status picture: how each version was liked, with its uncertainty, and how well the
reward model predicted the votes.

    path = await asyncio.to_thread(draw_status_chart, versions, ratings, data_dir / "status.png")

Top: each published version's like-rate (share of its rated replies with reward > 0, counted
while it served) with a 95% Wilson interval, in the order the versions were made; the active
one is marked. Bottom: the reward model published with each version, tested on the votes it
had not seen (held-out AUC and accuracy, from the version's metrics). Written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from bot.store import Version

Z95 = 1.959964


def wilson(n: int, share: float, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share observed on ``n`` trials: (low, high)."""
    if n <= 0:
        return 0.0, 1.0
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def draw_status_chart(versions: list[Version], ratings: dict[int, tuple[int, float | None]], active: int,
                      path: Path) -> Path:
    """Draw the chart (blocking) and write it to ``path`` as a PNG; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in versions if v.status == "published"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[2, 1])
    xs, rates, lows, highs, labels = [], [], [], [], []
    for i, v in enumerate(shown):
        n, rate = ratings.get(v.id, (0, None))
        labels.append(f"v{v.id}")
        if n and rate is not None:
            lo, hi = wilson(n, rate)
            xs.append(i), rates.append(rate), lows.append(rate - lo), highs.append(hi - rate)
            top.annotate(f"{n}", (i, hi), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
    top.errorbar(xs, rates, yerr=[lows, highs], fmt="o", capsize=3, color="tab:blue",
                 label="like-rate (95% interval; rated replies above)")
    if active in [v.id for v in shown]:
        top.axvline([v.id for v in shown].index(active), color="tab:green", alpha=0.3, lw=6, label="active")
    top.set_ylim(0, 1)
    top.set_ylabel("like-rate")
    top.grid(alpha=0.3)
    top.legend(fontsize=7, loc="upper left")
    _reward_model_panel(bottom, shown)
    bottom.set_xticks(range(len(shown)), labels, fontsize=7, rotation=45 if len(shown) > 12 else 0)
    bottom.set_xlabel("version (oldest first)")
    fig.suptitle("How each version is liked", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def _reward_model_panel(ax, shown: list[Version]) -> None:
    """The reward model's held-out AUC and accuracy per version (where it had new votes to be tested on)."""
    for key, label, style in (("rm_heldout_auc", "reward model AUC (held-out votes)", "s-"),
                              ("rm_heldout_accuracy", "reward model accuracy (held-out)", "^--")):
        pts = [(i, v.metrics.get(key)) for i, v in enumerate(shown) if v.metrics.get(key) is not None]
        if pts:
            ax.plot([i for i, _ in pts], [y for _, y in pts], style, label=label, markersize=4)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, 1)
    ax.set_ylabel("reward model")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.text(0.5, 0.5, "no reward model tested on new votes yet", ha="center", va="center",
                transform=ax.transAxes, fontsize=8, color="grey")
