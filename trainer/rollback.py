"""Auto-rollback: a version people like significantly less than its parent is rolled back.

    decision = await check_rollback(store, tcfg)     # None, or the Decision it acted on

The test is one-sided, on the share of rated replies that were liked (reward > 0), each
version's replies counted while it served: H0 p_active >= p_parent against H1 p_active <
p_parent, with the pooled two-proportion z statistic

    z = (p_a - p_p) / sqrt(p (1 - p) (1/n_a + 1/n_p)),   p = pooled share,   p-value = Φ(z)

It runs only when both versions have at least ``rollback_min_rated`` rated replies, and
rolls back when the p-value is below ``rollback_p``. A rolled-back version is remembered
(state key ``auto_rollback:vN``) so that an admin who activates it again on purpose is not
overruled by the same numbers. The decision is logged with its numbers, and posted where
results go (a finished train request from "auto-rollback", in the channel of the version's
newest rated reply).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass

from bot.store import Store
from trainer.config import TrainerConfig

log = logging.getLogger(__name__)

REQUESTED_BY = "auto-rollback"


@dataclass
class Decision:
    version: int
    parent: int
    n_version: int
    like_version: float
    n_parent: int
    like_parent: float
    z: float
    p_value: float

    def message(self) -> str:
        return (f"rolled back from v{self.version} to v{self.parent}: v{self.version} was liked "
                f"{self.like_version:.0%} of {self.n_version} rated replies against v{self.parent}'s "
                f"{self.like_parent:.0%} of {self.n_parent} (one-sided z-test: z = {self.z:.2f}, "
                f"p = {self.p_value:.3g})")


def one_sided_p(n_a: int, like_a: float, n_p: int, like_p: float) -> tuple[float, float]:
    """(z, p-value) of H1 "a is liked less than p" for two shares of sizes n_a and n_p."""
    pooled = (like_a * n_a + like_p * n_p) / (n_a + n_p)
    var = pooled * (1 - pooled) * (1 / n_a + 1 / n_p)
    if var <= 0:
        return 0.0, 1.0              # everyone liked (or disliked) both: no evidence either way
    z = (like_a - like_p) / math.sqrt(var)
    return z, 0.5 * math.erfc(-z / math.sqrt(2))      # Φ(z)


async def check_rollback(store: Store, tcfg: TrainerConfig) -> Decision | None:
    """Roll the active version back to its parent when the test says so; the decision or None."""
    if not tcfg.auto_rollback:
        return None
    active = await store.get_version(await store.active_version())
    if active is None or active.id == 0 or active.parent is None:
        return None
    if await store.get_state(f"auto_rollback:v{active.id}") is not None:
        return None                   # rolled back once already; re-activated by hand since
    rated = await store.rating_by_version()
    (n_a, like_a), (n_p, like_p) = rated.get(active.id, (0, None)), rated.get(active.parent, (0, None))
    if min(n_a, n_p) < tcfg.rollback_min_rated:
        return None
    z, p = one_sided_p(n_a, like_a, n_p, like_p)
    if p >= tcfg.rollback_p:
        return None
    d = Decision(active.id, active.parent, n_a, like_a, n_p, like_p, z, p)
    await store.activate(active.parent)
    await store.set_state(f"auto_rollback:v{active.id}", json.dumps({**asdict(d), "at": time.time()}))
    log.warning("auto-rollback: %s", d.message())
    where = await store.newest_rated_channel(active.id)
    if where is not None:
        rid = await store.add_train_request(*where, REQUESTED_BY)
        await store.set_request_status(rid, "done", d.message())
    return d
