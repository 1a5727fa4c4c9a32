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
import copy
import logging
import math
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bot.config import Config
from bot.models import load_model_and_tokenizer
from bot.policy import VersionError, read_verified_version
from bot.store import Store, Version
from trainer.config import TrainerConfig
from trainer.data import Example, collate, make_examples, minibatches, reference_logits, reply_logits, tempered
from trainer.gates import GateReport, Interrupted, run_gates
from trainer.loss import full_kl, pg_loss, token_logprobs
from trainer.optim_state import export_adam, import_adam, read_version_optimizer
from trainer.publish import prune, publish, reject

log = logging.getLogger(__name__)


class NonFinite(Exception):
    """A loss, gradient or weight became NaN/inf; the round is abandoned."""


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


@dataclass
class TrainStats:
    loss: float
    kl: float                      # k3 estimate on the training tokens (the penalty's own number)
    pg: float
    clip_frac: float
    first_ratio: float             # mean π_θ/π_behaviour at the first step: ≈1 for fresh replies
    grad_norm: float
    steps: int
    history: list[dict] = field(default_factory=list)   # per-epoch means
    optimizer: dict = field(default_factory=dict, repr=False)   # AdamW state to publish (optim_state.py)


def _finite(x: float) -> bool:
    return math.isfinite(x)


class Learner:
    """Holds the base model and tokenizer across rounds; builds and trains candidates.

    ``progress``: show a tqdm bar on stderr (None = only when stderr is a terminal)."""

    def __init__(self, cfg: Config, tcfg: TrainerConfig, progress: bool | None = None):
        self.cfg, self.tcfg = cfg, tcfg
        self.progress = progress
        self.base = None
        self.tokenizer = None

    # -- the base model -------------------------------------------------------

    def load(self) -> None:
        """Load the base model once (blocking). Training is always float32 on CPU."""
        if self.base is not None:
            return
        threads = self.tcfg.threads or self.cfg.model.threads
        if threads:
            torch.set_num_threads(threads)
        model, tokenizer = load_model_and_tokenizer(self.cfg.model.name, Path(self.cfg.model.cache_dir).expanduser(),
                                                    "float32")
        for p in model.parameters():
            p.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.base, self.tokenizer = model.eval(), tokenizer

    # -- the candidate ----------------------------------------------------------

    @staticmethod
    def _lora_config(t: TrainerConfig):
        from peft import LoraConfig

        return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM")

    def candidate(self, start: Version | None, seed: int, tcfg: TrainerConfig | None = None):
        """A trainable model continuing from ``start`` (the active version; None/0 = base).

        Returns (model, kind, reference, note): reference is None for LoRA (run the model
        with its adapter disabled) or the frozen base for a full fine-tune."""
        from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

        t = tcfg or self.tcfg
        self.load()
        kind = "full" if t.full_finetune else "lora"
        state, start_kind, note = None, None, "fresh from the base model"
        if start is not None and start.id != 0:
            if not start.path or not start.sha256:
                raise VersionError(f"active v{start.id} has no files in the registry")
            start_kind, state = read_verified_version(Path(start.path), start.sha256)
            note = f"continuing v{start.id} ({start_kind})"
        model = copy.deepcopy(self.base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if kind == "lora":
                lora = self._lora_config(t)
                if start_kind == "lora":
                    saved = LoraConfig.from_pretrained(start.path)
                    if (saved.r, saved.lora_alpha, set(saved.target_modules)) != (
                            lora.r, lora.lora_alpha, set(lora.target_modules)):
                        start_kind, note = None, (f"fresh adapter: v{start.id}'s rank/alpha/targets differ from "
                                                  "the config")
                elif start_kind == "full":
                    start_kind, note = None, f"fresh adapter: v{start.id} is a full fine-tune, LoRA starts from base"
                model = get_peft_model(model, lora)
                if start_kind == "lora":
                    result = set_peft_model_state_dict(model, state)
                    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
                    if bad:
                        raise VersionError(f"v{start.id}'s adapter does not fit the base model ({bad[:3]})")
                reference = None
            else:
                if start_kind == "full":
                    missing, unexpected = model.load_state_dict(state, strict=False)
                    if unexpected or [k for k in missing if "lm_head" not in k]:
                        raise VersionError(f"v{start.id}'s weights do not fit the base model")
                    model.tie_weights()
                elif start_kind == "lora":   # fold the active adapter into the weights, go on from there
                    peft_model = get_peft_model(model, LoraConfig.from_pretrained(start.path))
                    set_peft_model_state_dict(peft_model, state)
                    model = peft_model.merge_and_unload()
                for p in model.parameters():
                    p.requires_grad_(True)
                reference = self.base
        return model, kind, reference, note

    # -- training ---------------------------------------------------------------

    def _bar(self, total: int, desc: str):
        disable = (not sys.stderr.isatty()) if self.progress is None else (not self.progress)
        return tqdm(total=total, desc=desc, file=sys.stderr, disable=disable, dynamic_ncols=True, leave=True)

    def train(self, model, reference, examples: list[Example], *, seed: int, stop: threading.Event,
              tcfg: TrainerConfig | None = None, desc: str = "round", opt_state: dict | None = None) -> TrainStats:
        """Epochs × shuffled minibatches of the clipped policy-gradient loss (blocking).

        ``opt_state``: the parent version's AdamW moments (trainer/optim_state.py), loaded
        before the first step when they fit."""
        t = tcfg or self.tcfg
        pad = self.tokenizer.pad_token_id
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("the candidate has no trainable parameters")
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        if opt_state:
            why = import_adam(model, opt, opt_state)
            if why:
                log.warning("optimizer: starting fresh (%s)", why)
            else:
                log.info("optimizer: continuing the parent's AdamW state")
        gen = torch.Generator().manual_seed(seed)
        mean_reward = sum(e.reward for e in examples) / len(examples)
        ref_cache: dict[int, torch.Tensor] = {}    # example index → reference logprobs [t]: base is frozen
        steps_per_epoch = math.ceil(len(examples) / t.minibatch_size)
        bar = self._bar(t.epochs * steps_per_epoch, desc)
        history: list[dict] = []
        first_ratio, grad_norm, step = float("nan"), float("nan"), 0
        model.train()
        try:
            for epoch in range(t.epochs):
                sums = {"loss": 0.0, "kl": 0.0, "pg": 0.0, "clip_frac": 0.0}
                for idx in minibatches(len(examples), t.minibatch_size, gen):
                    if stop.is_set():
                        raise Interrupted(f"stopped at epoch {epoch + 1}, step {step + 1}")
                    batch = collate([examples[i] for i in idx], pad)                   # [B, P+T] …
                    if t.kl_estimator == "full":
                        new_all = torch.log_softmax(tempered(reply_logits(model, batch), batch.temperature), -1)
                        ref_all = self._reference_all(model, reference, batch)            # [B, T, V]
                        new_logp = new_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)  # [B, T], grad
                        ref_logp = ref_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
                        kl_tokens = full_kl(new_all, ref_all)                              # [B, T], grad
                        del ref_all
                    else:
                        ref_logp = self._reference_logp(model, reference, batch, idx, ref_cache)   # [B, T]
                        new_logp = token_logprobs(tempered(reply_logits(model, batch), batch.temperature),
                                                  batch.targets)                           # [B, T], grad
                        kl_tokens = None
                    parts = pg_loss(new_logp, batch.behaviour_logp, ref_logp, batch.advantages, batch.mask,
                                    clip_eps=t.clip_eps, kl_coef=t.kl_coef, kl_tokens=kl_tokens)
                    loss = float(parts.loss.detach())
                    if not _finite(loss):
                        raise NonFinite(f"loss is {loss} at epoch {epoch + 1}, step {step + 1}")
                    opt.zero_grad(set_to_none=True)
                    parts.loss.backward()
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
                    if not _finite(grad_norm):
                        raise NonFinite(f"gradient norm is {grad_norm} at epoch {epoch + 1}, step {step + 1}")
                    opt.step()
                    if not all(bool(torch.isfinite(p).all()) for p in params):
                        raise NonFinite(f"weights became non-finite at epoch {epoch + 1}, step {step + 1}")
                    if step == 0:
                        first_ratio = float(parts.ratio_mean)
                    step += 1
                    n = len(idx) / len(examples)          # weight minibatches by size for the epoch mean
                    sums["loss"] += loss * n
                    sums["kl"] += float(parts.kl) * n
                    sums["pg"] += float(parts.pg) * n
                    sums["clip_frac"] += float(parts.clip_frac) * n
                    bar.set_postfix(loss=f"{loss:.4f}", kl=f"{float(parts.kl):.4f}", reward=f"{mean_reward:+.2f}",
                                    refresh=False)
                    bar.update(1)
                history.append({"epoch": epoch + 1, **sums})
                log.debug("epoch %d/%d: loss %.4f, KL %.4f, clip %.2f", epoch + 1, t.epochs, sums["loss"],
                          sums["kl"], sums["clip_frac"])
        finally:
            bar.close()
            model.eval()
        last = history[-1]
        return TrainStats(loss=last["loss"], kl=last["kl"], pg=last["pg"], clip_frac=last["clip_frac"],
                          first_ratio=first_ratio, grad_norm=grad_norm, steps=step, history=history,
                          optimizer=export_adam(model, opt) if t.keep_optimizer and not t.full_finetune else {})

    @torch.no_grad()
    def _reference_all(self, model, reference, batch) -> torch.Tensor:
        """log π_ref over the whole vocabulary at every reply position [B, T, V] (not cached:
        [T, V] floats per reply would not fit for a window of hundreds)."""
        return torch.log_softmax(tempered(reference_logits(model, reference, batch), batch.temperature), -1)

    @torch.no_grad()
    def _reference_logp(self, model, reference, batch, idx: list[int], cache: dict) -> torch.Tensor:
        """log π_ref of the batch's reply tokens [B, T], computed once per reply and cached."""
        missing = [i for i in idx if i not in cache]
        if missing:
            logits = reference_logits(model, reference, batch)
            logp = token_logprobs(tempered(logits, batch.temperature), batch.targets)    # [B, T]
            for row, i in enumerate(idx):
                cache[i] = logp[row, :int(batch.mask[row].sum())].clone()
        out = torch.zeros_like(batch.behaviour_logp)
        for row, i in enumerate(idx):
            out[row, :len(cache[i])] = cache[i]
        return out

    def gates(self, model, reference, loss: float, stop: threading.Event, cfg: Config | None = None,
              tcfg: TrainerConfig | None = None) -> GateReport:
        """Probe the candidate with the serving settings of ``cfg`` (blocking)."""
        cfg = cfg or self.cfg
        s = cfg.sampling
        return run_gates(model, reference, self.tokenizer, system_prompt=cfg.model.system_prompt,
                         temperature=s.temperature, top_p=s.top_p, tcfg=tcfg or self.tcfg, loss=loss, stop=stop)


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
