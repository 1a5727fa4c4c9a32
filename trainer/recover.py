"""What a trainer that died mid-round left in the store, settled at the next start.

A round gets its ``rounds`` row when it starts (with the train request it serves, the last
of those served together) and its outcome when it ends; then its requests get theirs. A
version's registry row names the round that made it (``metrics.round_id``). So a trainer
killed after the registry commit (the version is published and active) but before the round
or its requests were marked has not failed, and is not reported as failed:

- a round left "running" whose version is registered ends as that version did (published
  or rejected), with the version's numbers;
- any other round left "running" ends "failed" (the trainer stopped during it);
- requests left "running" get the outcome of the round that served them: "done" with its
  summary when it published, was rejected or had nothing to learn, "failed" otherwise (a
  crash may be caused by the request, so it is not retried blindly: ask again with /retrain).

Call it at start, while holding the trainer lock, before any new round; and after a loop
pass that a store outage (or another disk error) cut short, with the reason and note of that
(``trainer/__main__.py``): such a pass leaves its round and requests "running" the same way.
"""

from __future__ import annotations

import logging

from bot.store import Store, Version

log = logging.getLogger(__name__)

CRASHED = "the trainer stopped unexpectedly during this round"
RECOVERED = " (the trainer stopped before it reported this; recorded at its next start)"


async def settle_unfinished(store: Store, reason: str = CRASHED, note: str = RECOVERED) -> None:
    """Finish the rounds and train requests left "running" (see the module doc): ``reason`` is
    what a round that did not get as far as a version failed of, ``note`` is added to the
    summary of one that did."""
    made_by = _versions_by_round(await store.versions())
    for r in await store.rounds():
        v = made_by.get(r["id"])
        if r["status"] == "running" and v is not None:
            m = v.metrics
            await store.finish_round(r["id"], status=v.status, version=v.id, n_replies=_num(m.get("n_replies"), 0),
                                     mean_reward=_num(m.get("mean_reward")), kl=_num(m.get("probe_kl")),
                                     loss=_num(m.get("loss")), reason=v.reason)
            log.warning("round #%d had %s v%d before it was recorded; recorded as %s", r["id"], v.status, v.id,
                        v.status)
    if n := await store.fail_unfinished_rounds(reason):
        log.warning("%d round(s) left running; marked failed: %s", n, reason)
    running = await store.train_requests("running")
    if not running:
        return
    last = max(req["id"] for req in running)       # the requests served together name the last of them
    served_by = next((r for r in reversed(await store.rounds()) if r["request_id"] == last), None)
    status, result = _outcome(served_by, made_by, reason, note)
    for req in running:
        await store.set_request_status(req["id"], status, result)
        (log.info if status == "done" else log.warning)(
            "request #%d was left running; marked %s: %s", req["id"], status, result)


def _versions_by_round(versions: list[Version]) -> dict[int, Version]:
    out = {}
    for v in versions:
        rid = v.metrics.get("round_id") if isinstance(v.metrics, dict) else None
        if isinstance(rid, int) and not isinstance(rid, bool):
            out[rid] = v
    return out


def _num(value, default=None):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _outcome(r: dict | None, made_by: dict[int, Version], reason: str, note: str) -> tuple[str, str]:
    """(request status, result text) for the round ``r`` that served a request (None: it never started)."""
    if r is None or r["status"] == "failed":
        reason = r["reason"] if r is not None and r["reason"] else reason
        return "failed", f"round failed: {reason}; ask again with /retrain"
    if r["status"] == "skipped":
        return "done", f"no round: {r['reason']}"
    v = made_by.get(r["id"])
    if r["status"] == "rejected":
        return "done", f"v{r['version']} rejected: {r['reason']}" + note
    metrics = v.metrics if v is not None else {}
    kl = f", KL {r['kl']:.2g}" if r["kl"] is not None else ""
    reward = f", mean reward {r['mean_reward']:+.2f}" if r["mean_reward"] is not None else ""
    explored = f" + {metrics['n_explored']} explored samples" if _num(metrics.get("n_explored"), 0) else ""
    return "done", f"v{r['version']} published: {r['n_replies']} rated replies{explored}{reward}{kl}" + note
