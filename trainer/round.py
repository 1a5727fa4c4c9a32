"""One training round, top to bottom.

    learner = Learner(cfg, tcfg)                      # caches the base model between rounds
    result = await run_round(store, cfg, tcfg, learner, use_all=True)
    print(result.summary())                           # "v7 published: 143 rated replies, ..."

1. data      the newest ``window`` rated replies whose votes have settled (every rated
             reply for a train request or ``use_all``); fewer than 2 → skipped.
2. model     a trainable copy of the base: the ACTIVE version's LoRA adapter (continue
             training, with its AdamW moments when ``keep_optimizer``), a fresh adapter
             when v0 is active, or full weights when ``full_finetune``.
             Reference = the adapter switched off (= the base model).
3. train     epochs × shuffled minibatches: recompute log π_θ of the recorded tokens at
             each reply's own temperature, the reference without grad, PPO-clip + KL
             loss (trainer/loss.py; the KL exact over the vocabulary by default),
             backward, clip the grad norm, AdamW step.
             A NaN/inf anywhere, or the stop event, aborts: nothing is published.
4. gates     probe prompts: KL to the base, empty/looping replies, finite loss.
5. publish   atomic folder + registry row + activate, or a "rejected" row with the reason.

Heavy work runs in ``asyncio.to_thread`` so the event loop (heartbeats, signals) keeps
going. The round is recorded in the store's ``rounds`` table whatever happens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bot.config import Config
from bot.policy import VersionError
from bot.store import Store
from trainer.config import TrainerConfig
from trainer.data import Example, make_examples
from trainer.gates import Interrupted
from trainer.learner import Learner, NonFinite
from trainer.optim_state import read_version_optimizer
from trainer.publish import prune, publish, reject

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    status: str                    # "published" | "rejected" | "skipped" | "failed"
    version: int | None = None     # the new version (published or rejected)
    n_replies: int = 0
    n_degenerate: int = 0          # replies counted as disliked for being spam or loops (punish_degenerate)
    mean_reward: float | None = None
    kl: float | None = None        # probe KL(candidate ‖ base), nats per token
    loss: float | None = None      # mean loss over the last epoch
    reason: str = ""
    seconds: float = 0.0
    parent: int | None = None
    interrupted: bool = False      # the stop event ended the round
    last_reply_id: int | None = None   # newest reply the round learned from
    timings: dict = field(default_factory=dict)   # seconds per phase: model, train, gates, publish

    def summary(self) -> str:
        if self.status == "published":
            degenerate = f" ({self.n_degenerate} degenerate, counted as disliked)" if self.n_degenerate else ""
            return (f"v{self.version} published: {self.n_replies} rated replies{degenerate}, "
                    f"mean reward {self.mean_reward:+.2f}, KL {self.kl:.2g}")
        if self.status == "rejected":
            return f"v{self.version} rejected: {self.reason}"
        if self.status == "skipped":
            return f"no round: {self.reason}"
        return f"round failed: {self.reason}"


# -- the round ------------------------------------------------------------------


async def run_round(store: Store, cfg: Config, tcfg: TrainerConfig, learner: Learner, *,
                    request_id: int | None = None, use_all: bool = False,
                    stop: threading.Event | None = None,
                    before_rename=None) -> RoundResult:
    """Run one round and record it. Never raises for a failed round: see RoundResult.status."""
    started = time.monotonic()
    stop = stop or threading.Event()
    parent = await store.active_version()
    round_id = await store.start_round(request_id, parent)
    examples: list[Example] = []

    async def finish(result: RoundResult) -> RoundResult:
        result.seconds = time.monotonic() - started
        result.parent = parent
        result.last_reply_id = max((e.reply_id for e in examples), default=None)
        await store.finish_round(round_id, status=result.status, version=result.version,
                                 n_replies=result.n_replies, mean_reward=result.mean_reward, kl=result.kl,
                                 loss=result.loss, reason=result.reason)
        (log.info if result.status in ("published", "skipped") else log.warning)(
            "%s (%.1fs)", result.summary(), result.seconds)
        return result

    # 1. data: settled rated replies → examples with advantages
    settled_before = time.time() if (use_all or request_id is not None) else time.time() - tcfg.settle_seconds
    replies = await store.rated_replies(settled_before, limit=tcfg.window)
    examples = make_examples(replies, tcfg.baseline, punish_degenerate=tcfg.punish_degenerate,
                             max_repetition=tcfg.max_repetition)
    if len(examples) < 2:
        return await finish(RoundResult("skipped", n_replies=len(examples),
                                        reason=f"{len(examples)} settled rated replies; need at least 2"))
    n = len(examples)
    mean_reward = sum(e.reward for e in examples) / n
    if max(abs(e.advantage) for e in examples) < 1e-6:
        return await finish(RoundResult("skipped", n_replies=n, mean_reward=mean_reward,
                                        reason=f"all {n} rated replies have the same reward ({mean_reward:+.2f}); "
                                               f"nothing to learn with the '{tcfg.baseline}' baseline"))
    seed = tcfg.seed + parent
    n_degenerate = sum(1 for e in examples if e.degenerate)
    log.info("round: %d rated replies (ids %d..%d), mean reward %+.2f, from v%d", n, examples[0].reply_id,
             examples[-1].reply_id, mean_reward, parent)
    if n_degenerate:
        log.info("round: %d degenerate replies counted as disliked (%s)", n_degenerate,
                 ", ".join(sorted({e.degenerate.split(" (")[0] for e in examples if e.degenerate})))

    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[name] = round(now - clock, 3)
        clock = now

    try:
        # 2. model: continue the active version (reference = adapter off / base copy)
        start = await store.get_version(parent)
        model, kind, reference, note = await asyncio.to_thread(learner.candidate, start, seed, tcfg)
        opt_state = None
        if kind == "lora" and tcfg.keep_optimizer and note.startswith("continuing"):
            opt_state, why = await asyncio.to_thread(read_version_optimizer, Path(start.path))
            note += ", its optimizer state" if opt_state else f", a fresh optimizer ({why})"
        log.info("candidate: %s, %s", kind, note)
        lap("model")
        # 3. train
        stats = await asyncio.to_thread(learner.train, model, reference, examples, seed=seed, stop=stop,
                                        tcfg=tcfg, desc=f"round from v{parent}", opt_state=opt_state)
        lap("train")
        # 4. gates
        report = await asyncio.to_thread(learner.gates, model, reference, stats.loss, stop, cfg, tcfg)
        lap("gates")
    except Interrupted as e:
        return await finish(RoundResult("failed", n_replies=n, mean_reward=mean_reward,
                                        reason=f"interrupted ({e})", interrupted=True))
    except (NonFinite, VersionError) as e:
        return await finish(RoundResult("failed", n_replies=n, mean_reward=mean_reward, reason=str(e)))
    except Exception as e:  # noqa: BLE001 - a broken round must not kill the trainer loop
        log.exception("round failed")
        return await finish(RoundResult("failed", n_replies=n, mean_reward=mean_reward,
                                        reason=f"{type(e).__name__}: {e}"))
    if stop.is_set():
        return await finish(RoundResult("failed", n_replies=n, mean_reward=mean_reward, loss=stats.loss,
                                        reason="interrupted (before publishing)", interrupted=True))
    if await store.active_version() != parent:
        return await finish(RoundResult("failed", n_replies=n, mean_reward=mean_reward, loss=stats.loss,
                                        reason=f"the active version changed from v{parent} during the round "
                                               "(a rollback?); not publishing over it"))

    # 5. publish or reject
    version = await store.next_version_id()
    metrics = {"n_replies": n, "n_degenerate": n_degenerate, "mean_reward": mean_reward,
               "last_reply_id": max(e.reply_id for e in examples),
               "loss": stats.loss, "train_kl": stats.kl, "pg": stats.pg, "clip_frac": stats.clip_frac,
               "first_ratio": stats.first_ratio, "grad_norm": stats.grad_norm, "steps": stats.steps,
               "kind": kind, "start": note, "seconds": timings, **report.as_metrics()}
    result = RoundResult("published" if report.passed else "rejected", version=version, n_replies=n,
                         n_degenerate=n_degenerate, mean_reward=mean_reward, kl=report.kl, loss=stats.loss,
                         reason=report.reason, timings=timings)
    if not report.passed:
        metrics.pop("last_reply_id")   # last_trained_reply_id() counts published rounds only
        metrics["candidate_last_reply_id"] = max(e.reply_id for e in examples)
        await reject(store, version=version, parent=parent, reason=report.reason, metrics=metrics)
        return await finish(result)
    meta = {"base_model": cfg.model.name, "trainer": asdict(tcfg), "reply_ids": [e.reply_id for e in examples]}
    try:
        await publish(store, cfg.versions_dir, version=version, parent=parent, model=model, kind=kind, meta=meta,
                      metrics=metrics, before_rename=before_rename, optimizer=stats.optimizer)
    except Exception as e:  # noqa: BLE001
        log.exception("publishing v%d failed", version)
        return await finish(RoundResult("failed", n_replies=n, mean_reward=mean_reward, kl=report.kl,
                                        loss=stats.loss, reason=f"publishing failed: {type(e).__name__}: {e}"))
    await prune(store, cfg.versions_dir, tcfg.keep_versions)
    lap("publish")
    return await finish(result)
