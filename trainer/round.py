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
2b. explore  (``reward_model``) fit the reward model on every vote so far (trainer/
             reward_model.py; first its predecessor is tested on the votes it never saw),
             sample ``explore_samples`` replies for each of the ``explore_prompts`` newest
             prompts from the candidate, score them, RLOO advantages (trainer/explore.py).
3. train     epochs × shuffled minibatches: recompute log π_θ of the recorded tokens at
             each reply's own temperature, the reference without grad, PPO-clip + KL
             loss (trainer/loss.py; the KL exact over the vocabulary by default, its weight
             raised while the KL is over the round's budget: trainer/kl_control.py),
             backward, clip the grad norm, AdamW step; over the voted replies and the
             explored samples together.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from bot.config import Config
from bot.policy_types import VersionError
from bot.store import Store
from trainer.config import TrainerConfig
from bot import versions
from trainer.data import Example, make_examples
from trainer.explore import rloo_examples, sample
from trainer.fluency import degenerate
from trainer.influence import distinct_voters, min_voters, weigh
from trainer.gates import GateReport, Interrupted
from trainer.learner import Candidate, Learner, NonFinite, TrainStats
from trainer.optim_state import read_version_optimizer
from trainer.publish import prune, publish, reject
from trainer.reward_model import RewardModel, fit_on_votes, trust

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
    n_explored: int = 0            # the trainer's own samples learned from (reward model, RLOO)
    reward_model: dict = field(default_factory=dict)   # its report: held-out AUC/accuracy, votes, ...
    timings: dict = field(default_factory=dict)   # seconds per phase: model, train, gates, publish

    def summary(self) -> str:
        if self.status == "published":
            degenerate = f" ({self.n_degenerate} degenerate, counted as disliked)" if self.n_degenerate else ""
            explored = f" + {self.n_explored} explored samples" if self.n_explored else ""
            return (f"v{self.version} published: {self.n_replies} rated replies{degenerate}{explored}, "
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
    r = _Round(store, cfg, tcfg, learner, stop, parent=parent, round_id=await store.start_round(request_id, parent),
               started=started)
    skipped = await _data(r, all_rated=use_all or request_id is not None)     # 1. data
    if skipped:
        return await r.finish(skipped)
    try:
        cand, opt_state = await _model(r)            # 2. model
        no_signal = await _explore(r, cand)          # 2b. explore
        if no_signal:
            return await r.finish(no_signal)
        stats = await _train(r, cand, opt_state)     # 3. train
        report = await _gates(r, cand, stats)        # 4. gates
    except Interrupted as e:
        return await r.finish(r.failed(f"interrupted ({e})", interrupted=True))
    except (NonFinite, VersionError) as e:
        return await r.finish(r.failed(str(e)))
    except Exception as e:  # noqa: BLE001 - a broken round must not kill the trainer loop
        log.exception("round failed")
        return await r.finish(r.failed(f"{type(e).__name__}: {e}"))
    unpublishable = await _before_publishing(r, stats)
    if unpublishable:
        return await r.finish(unpublishable)
    return await r.finish(await _publish(r, cand, stats, report, before_rename))   # 5. publish or reject


@dataclass
class _Round:
    """What the phases of one round share; ``finish`` records the round whatever happened."""

    store: Store
    cfg: Config
    tcfg: TrainerConfig
    learner: Learner
    stop: threading.Event
    parent: int                    # the active version the round starts from
    round_id: int                  # its row in the store's ``rounds`` table
    started: float                 # time.monotonic() at the start
    examples: list[Example] = field(default_factory=list)       # the voted replies
    explored: list[Example] = field(default_factory=list)       # the trainer's own samples
    reward_model: RewardModel | None = None
    rm_report: dict = field(default_factory=dict)
    mean_reward: float | None = None
    n_degenerate: int = 0
    timings: dict[str, float] = field(default_factory=dict)   # seconds per phase: model, train, gates, publish
    clock: float = 0.0             # when the phase being timed began

    @property
    def seed(self) -> int:
        return self.tcfg.seed + self.parent

    def lap(self, name: str) -> None:
        """The phase ``name`` ends now, and the next one begins."""
        now = time.monotonic()
        self.timings[name] = round(now - self.clock, 3)
        self.clock = now

    def failed(self, reason: str, **fields) -> RoundResult:
        return RoundResult("failed", n_replies=len(self.examples), mean_reward=self.mean_reward, reason=reason,
                           **fields)

    async def finish(self, result: RoundResult) -> RoundResult:
        """Fill in the round's totals, record it in the ``rounds`` table, log its summary."""
        result.seconds = time.monotonic() - self.started
        result.parent = self.parent
        result.last_reply_id = max((e.reply_id for e in self.examples), default=None)
        result.n_explored, result.reward_model = len(self.explored), self.rm_report
        await self.store.finish_round(self.round_id, status=result.status, version=result.version,
                                      n_replies=result.n_replies, mean_reward=result.mean_reward, kl=result.kl,
                                      loss=result.loss, reason=result.reason)
        (log.info if result.status in ("published", "skipped") else log.warning)(
            "%s (%.1fs)", result.summary(), result.seconds)
        return result


async def _data(r: _Round, *, all_rated: bool) -> RoundResult | None:
    """1. data: settled rated replies → examples with advantages; a "skipped" result when
    there is nothing to learn. ``all_rated``: don't wait for votes to settle."""
    t = r.tcfg
    settled_before = time.time() if all_rated else time.time() - t.settle_seconds
    replies = await r.store.rated_replies(settled_before, limit=t.window)
    votes = await r.store.user_votes([x.id for x in replies])
    voters, need = distinct_voters(replies, votes), min_voters(t.max_user_share)
    if voters is not None and voters < need:
        return RoundResult("skipped", n_replies=len(replies),
                           reason=f"{voters} distinct voters on {len(replies)} settled rated replies; with "
                                  f"trainer.max_user_share = {t.max_user_share:g} a round needs at least {need}, "
                                  "so that no one steers it alone")
    r.examples = examples = make_examples(replies, t.baseline, punish_degenerate=t.punish_degenerate,
                                          max_repetition=t.max_repetition,
                                          weights=weigh(replies, votes, t.max_user_share))
    n = len(examples)
    if n < 2:
        return RoundResult("skipped", n_replies=n, reason=f"{n} settled rated replies; need at least 2")
    r.mean_reward = sum(e.reward for e in examples) / n
    if max(abs(e.advantage) for e in examples) < 1e-6 and not t.reward_model:
        return RoundResult("skipped", n_replies=n, mean_reward=r.mean_reward,
                           reason=f"all {n} rated replies have the same reward ({r.mean_reward:+.2f}); "
                                  f"nothing to learn with the '{t.baseline}' baseline")
    r.n_degenerate = sum(1 for e in examples if e.degenerate)
    log.info("round: %d rated replies (ids %d..%d), mean reward %+.2f, from v%d", n, examples[0].reply_id,
             examples[-1].reply_id, r.mean_reward, r.parent)
    if r.n_degenerate:
        log.info("round: %d degenerate replies counted as disliked (%s)", r.n_degenerate,
                 ", ".join(sorted({e.degenerate.split(" (")[0] for e in examples if e.degenerate})))
    return None


async def _model(r: _Round) -> tuple[Candidate, dict | None]:
    """2. model: continue the active version (reference = adapter off / base copy), and its
    AdamW moments when ``keep_optimizer`` kept them."""
    r.clock = time.monotonic()     # the phase timings start here
    start = await r.store.get_version(r.parent)
    cand = await asyncio.to_thread(r.learner.candidate, start, r.seed, r.tcfg)
    opt_state = None
    if cand.kind == "lora" and r.tcfg.keep_optimizer and cand.note.startswith("continuing"):
        opt_state, why = await asyncio.to_thread(read_version_optimizer, Path(start.path), cand.model)
        kept = ", its optimizer state" if opt_state else f", a fresh optimizer ({why})"
        cand = replace(cand, note=cand.note + kept)
    log.info("candidate: %s, %s", cand.kind, cand.note)
    r.lap("model")
    return cand, opt_state


async def _explore(r: _Round, cand: Candidate) -> RoundResult | None:
    """2b. explore (``reward_model``): the reward model on every vote so far, then the
    candidate's own samples scored by it (``r.explored``). A "skipped" result when neither
    the votes nor the samples carry a signal."""
    t = r.tcfg
    if t.reward_model:
        replies = await r.store.rated_replies(time.time(), limit=t.reward_model_window)
        weights = weigh(replies, await r.store.user_votes([x.id for x in replies]), t.max_user_share)
        previous = r.learner.reward_model or await asyncio.to_thread(
            _saved_reward_model, await r.store.get_version(r.parent), versions.max_reward_model_bytes(r.learner.base))
        r.reward_model, r.rm_report = await asyncio.to_thread(fit_on_votes, r.learner.features(), replies, previous,
                                                              t.reward_model_l2, weights)
        log.info("reward model: %s", ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in r.rm_report.items()))
        r.rm_report["rm_trust"] = weight = trust(r.rm_report.get("rm_cv_auc"))
        if r.reward_model is not None:
            r.learner.reward_model = r.reward_model
        if r.reward_model is not None and weight > 0:
            prompts = await r.store.recent_prompts(t.explore_prompts)
            r.explored = await asyncio.to_thread(_explored, r, cand, prompts, weight)
        elif r.reward_model is not None:    # its samples would get zero advantages: save the time
            log.info("reward model: not trusted yet (cross-validated AUC %s), no exploration this round",
                     r.rm_report.get("rm_cv_auc"))
    r.lap("explore")
    if max(abs(e.advantage) for e in r.examples + r.explored) < 1e-6:
        n = len(r.examples)
        why = ("the reward model is off" if not t.reward_model else
               f"no reward model could be fitted ({r.rm_report['rm_skipped']})" if "rm_skipped" in r.rm_report else
               f"the reward model is not trusted yet (cross-validated AUC {r.rm_report.get('rm_cv_auc')})")
        return RoundResult("skipped", n_replies=n, mean_reward=r.mean_reward,
                           reason=f"all {n} rated replies have the same reward ({r.mean_reward:+.2f}) and {why}; "
                                  f"nothing to learn with the '{t.baseline}' baseline")
    return None


def _explored(r: _Round, cand: Candidate, prompts: list[list[int]], weight: float) -> list[Example]:
    """The candidate's samples for ``prompts``, rewarded by the reward model (a degenerate
    one counts as disliked, like a voted one) → RLOO examples with the model's trust
    ``weight`` (blocking)."""
    s, t, tok = r.cfg.sampling, r.tcfg, r.learner.tokenizer
    samples = sample(cand.model, tok, prompts, t.explore_samples, temperature=s.temperature, top_p=s.top_p,
                     max_new_tokens=s.max_new_tokens, seed=r.seed)
    samples = [x for x in samples if x.output_ids]
    if not samples:
        return []
    p = r.reward_model.predict(r.learner.features().of([x.as_example(s.temperature) for x in samples]))
    rewards = torch.tensor([-1.0 if t.punish_degenerate and degenerate(x.text, t.max_repetition) else 2 * q - 1
                            for x, q in zip(samples, p.tolist())])
    log.info("explored %d samples for %d prompts: reward model mean %.3f, min %.3f, max %.3f; trust %.2f",
             len(samples), len(prompts), float(p.mean()), float(p.min()), float(p.max()), weight)
    return rloo_examples(samples, rewards, s.temperature, weight)


def _saved_reward_model(version, limit: int) -> RewardModel | None:
    """The reward model published with ``version`` (None for v0, or when it has none/a bad one,
    or one over ``limit`` bytes)."""
    if version is None or not version.path:
        return None
    state, why = versions.read_version_side_file(Path(version.path), versions.REWARD_MODEL_FILE, limit)
    if state is None:
        log.info("reward model: none saved with v%d (%s)", version.id, why)
        return None
    try:
        return RewardModel.from_state(state)
    except ValueError as e:
        log.warning("reward model saved with v%d is unusable (%s)", version.id, e)
        return None


async def _train(r: _Round, cand: Candidate, opt_state: dict | None) -> TrainStats:
    """3. train: epochs × minibatches (trainer/learner.py); NaN/inf or the stop event raise."""
    stats = await asyncio.to_thread(r.learner.train, cand.model, cand.reference, r.examples + r.explored, seed=r.seed,
                                    stop=r.stop, tcfg=r.tcfg, desc=f"round from v{r.parent}", opt_state=opt_state)
    r.lap("train")
    return stats


async def _gates(r: _Round, cand: Candidate, stats: TrainStats) -> GateReport:
    """4. gates: the candidate on probe prompts (trainer/gates.py)."""
    report = await asyncio.to_thread(r.learner.gates, cand.model, cand.reference, stats.loss, r.stop, r.cfg, r.tcfg)
    r.lap("gates")
    return report


async def _before_publishing(r: _Round, stats: TrainStats) -> RoundResult | None:
    """A "failed" result when the round must not publish: the stop event, or a rollback meanwhile."""
    if r.stop.is_set():
        return r.failed("interrupted (before publishing)", loss=stats.loss, interrupted=True)
    if await r.store.active_version() != r.parent:
        return r.failed(f"the active version changed from v{r.parent} during the round "
                        "(a rollback?); not publishing over it", loss=stats.loss)
    return None


async def _publish(r: _Round, cand: Candidate, stats: TrainStats, report: GateReport, before_rename) -> RoundResult:
    """5. publish: atomic folder + registry row + activate, or a "rejected" row with the reason."""
    version = await r.store.next_version_id()
    metrics = _metrics(r, cand, stats, report)
    result = RoundResult("published" if report.passed else "rejected", version=version, n_replies=len(r.examples),
                         n_degenerate=r.n_degenerate, mean_reward=r.mean_reward, kl=report.kl, loss=stats.loss,
                         reason=report.reason, timings=r.timings)
    if not report.passed:
        # last_trained_reply_id() counts published rounds only
        metrics["candidate_last_reply_id"] = metrics.pop("last_reply_id")
        await reject(r.store, version=version, parent=r.parent, reason=report.reason, metrics=metrics)
        return result
    meta = {"base_model": r.cfg.model.name, "trainer": asdict(r.tcfg), "reply_ids": [e.reply_id for e in r.examples]}
    try:
        await publish(r.store, r.cfg.versions_dir, version=version, parent=r.parent, model=cand.model, kind=cand.kind,
                      meta=meta, metrics=metrics, before_rename=before_rename,
                      side={versions.OPTIMIZER_FILE: stats.optimizer,
                            versions.REWARD_MODEL_FILE: r.reward_model.state() if r.reward_model else {}})
    except Exception as e:  # noqa: BLE001
        log.exception("publishing v%d failed", version)
        return r.failed(f"publishing failed: {type(e).__name__}: {e}", kl=report.kl, loss=stats.loss)
    await prune(r.store, r.cfg.versions_dir, r.tcfg.keep_versions)
    r.lap("publish")
    return result


def _metrics(r: _Round, cand: Candidate, stats: TrainStats, report: GateReport) -> dict:
    """What the version's registry row says about the round that made it."""
    return {"n_replies": len(r.examples), "n_degenerate": r.n_degenerate, "mean_reward": r.mean_reward,
            "last_reply_id": max(e.reply_id for e in r.examples),
            "loss": stats.loss, "train_kl": stats.kl, "pg": stats.pg, "clip_frac": stats.clip_frac,
            "first_ratio": stats.first_ratio, "grad_norm": stats.grad_norm, "steps": stats.steps,
            "offpolicy_mean": stats.offpolicy_mean, "offpolicy_max": stats.offpolicy_max,
            "is_truncated": stats.is_truncated, "kl_coef_last": stats.kl_coef_last,
            "kl_coef_peak": stats.kl_coef_peak, "kl_steps_over": stats.kl_steps_over,
            "n_explored": len(r.explored), **r.rm_report, "round_id": r.round_id,   # trainer/recover.py
            "kind": cand.kind, "start": cand.note, "seconds": r.timings, **report.as_metrics()}
