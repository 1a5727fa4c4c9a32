"""The learner: the base model, the candidate built from the active version, and its training.

    learner = Learner(cfg, tcfg)            # loads the base model once, keeps it between rounds
    cand = learner.candidate(active_version, seed)   # Candidate(model, kind, reference, note)
    stats = learner.train(cand.model, cand.reference, examples, seed=seed, stop=stop)   # epochs × minibatches
    report = learner.gates(cand.model, cand.reference, stats.loss, stop)

All blocking; ``trainer/round.py`` calls these through ``asyncio.to_thread`` and decides what
to publish. The loss itself is ``trainer/loss.py``; the batches ``trainer/data.py``.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from bot import process, versions
from bot.config import Config
from bot.models import load_model_and_tokenizer
from bot.policy_types import VersionError
from bot.store import Version
from trainer.config import TrainerConfig
from trainer.data import Example, collate, minibatches, reference_logits, reply_logits, tempered
from trainer.gates import GateReport, Interrupted, probe_baseline, run_gates
from trainer.kl_control import KLControl
from trainer.loss import full_kl, pg_loss, token_logprobs
from trainer.optim_state import export_adam, import_adam

log = logging.getLogger(__name__)


class NonFinite(Exception):
    """A loss, gradient or weight became NaN/inf; the round is abandoned."""


@dataclass
class TrainStats:
    loss: float
    kl: float                      # KL to the reference along the training replies (the penalty's own number)
    pg: float
    clip_frac: float
    first_ratio: float             # mean π_θ/π_behaviour at the first step: ≈1 for fresh replies
    grad_norm: float
    steps: int
    history: list[dict] = field(default_factory=list)   # per-epoch means
    optimizer: dict = field(default_factory=dict, repr=False)   # AdamW state to publish (optim_state.py)
    offpolicy_mean: float = 0.0    # mean |log p_trainer - log p_recorded| per token before the first step
    offpolicy_max: float = 0.0     # its max
    is_truncated: float = 0.0      # share of tokens whose importance weight hit trainer.is_cap
    kl_coef_last: float = 0.0      # the KL penalty's weight the last step used (trainer/kl_control.py)
    kl_coef_peak: float = 0.0      # its largest value in the round
    kl_steps_over: int = 0         # steps whose KL to the base was over the round's target


@dataclass
class Candidate:
    """What a round trains: the model, its kind, the KL reference and how it started."""

    model: object                  # a PeftModel (LoRA) or a full copy of the base
    kind: str                      # "lora" | "full"
    reference: object | None       # None: the LoRA model with its adapter off; else the frozen base
    note: str                      # "continuing v3 (lora)", "fresh from the base model", ...


def _same_shape(saved, lora) -> bool:
    """Do two LoraConfigs build adapters of the same shape (so weights carry over)?"""
    return (saved.r, saved.lora_alpha, set(saved.target_modules)) == (lora.r, lora.lora_alpha,
                                                                       set(lora.target_modules))


def _gather(cache: dict[int, torch.Tensor], idx: list[int], like: torch.Tensor) -> torch.Tensor:
    """Per-reply cached logprobs [t] → the batch's padded [B, T] (zeros at padding)."""
    out = torch.zeros_like(like)
    for row, i in enumerate(idx):
        out[row, :len(cache[i])] = cache[i]
    return out


def _offpolicy_gap(proximal: dict[int, torch.Tensor], examples: list[Example], cap: float) -> dict[str, float]:
    """How far the recorded (serving engine's) logprobs are from the trainer's recomputation
    before the first step: mean and max |log ratio| per token, and the share of tokens whose
    importance weight the cap truncates."""
    gaps = [proximal[i] - torch.tensor(e.behaviour_logp[:len(proximal[i])]) for i, e in enumerate(examples)]
    d = torch.cat(gaps) if gaps else torch.zeros(1)
    return {"offpolicy_mean": float(d.abs().mean()), "offpolicy_max": float(d.abs().max()),
            "is_truncated": float((d > math.log(cap)).float().mean())}


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
        self.reward_model = None       # the newest fitted reward model (trainer/reward_model.py)
        self._probe_baselines: dict = {}   # gate settings → the base's own probe replies (trainer/gates.py)
        self._features = None

    # -- the base model -------------------------------------------------------

    def load(self) -> None:
        """Load the base model once (blocking). Training is always float32 on CPU."""
        if self.base is not None:
            return
        process.set_torch_threads(self.tcfg.threads or self.cfg.model.threads)
        model, tokenizer = load_model_and_tokenizer(self.cfg.model.name, Path(self.cfg.model.cache_dir).expanduser(),
                                                    "float32")
        for p in model.parameters():
            p.requires_grad_(False)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.base, self.tokenizer = model.eval(), tokenizer

    def features(self):
        """The reward model's features of replies under the frozen base, cached by reply id."""
        from trainer.reward_model import FeatureCache

        self.load()
        if self._features is None:
            self._features = FeatureCache(self.base, self.tokenizer.pad_token_id)
        return self._features

    # -- the candidate ----------------------------------------------------------

    @staticmethod
    def _lora_config(t: TrainerConfig):
        from peft import LoraConfig

        return LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                          target_modules=list(t.target_modules), bias="none", task_type="CAUSAL_LM")

    def candidate(self, start: Version | None, seed: int, tcfg: TrainerConfig | None = None) -> "Candidate":
        """A trainable model continuing from ``start`` (the active version; None/0 = base).

        LoRA: the active version's adapter when it has this config's shape, else a fresh one
        (the reference is the adapter switched off). Full fine-tune: the active weights (a
        LoRA version is merged in first); the reference is the frozen base."""
        t = tcfg or self.tcfg
        self.load()
        files, note = None, "fresh from the base model"
        if start is not None and start.id != 0:
            if not start.path or not start.sha256:
                raise VersionError(f"active v{start.id} has no files in the registry")
            files = versions.read_verified(Path(start.path), start.sha256, version=start.id,
                                           root=self.cfg.versions_dir, max_bytes=versions.max_weights_bytes(self.base))
            note = f"continuing v{start.id} ({files.kind})"
        model = copy.deepcopy(self.base)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if t.full_finetune:
                return Candidate(self._full_from(model, files, start), "full", self.base, note)
            lora = self._lora_config(t)
            if files is not None and files.kind == "full":
                files, note = None, f"fresh adapter: v{start.id} is a full fine-tune, LoRA starts from base"
            elif files is not None and not _same_shape(versions.adapter_config(files.path), lora):
                files, note = None, f"fresh adapter: v{start.id}'s rank/alpha/targets differ from the config"
            from peft import get_peft_model

            model = get_peft_model(model, lora)
            if files is not None:
                versions.set_adapter_weights(model, files.state, "default", f"v{start.id}")
            return Candidate(model, "lora", None, note)

    @staticmethod
    def _full_from(model, files: versions.VersionFiles | None, start: Version | None):
        """``model`` (a copy of the base) with the active version's weights, all trainable."""
        if files is not None and files.kind == "full":
            versions.load_full_weights(model, files.state, f"v{start.id}")
        elif files is not None:          # fold the active adapter into the weights, go on from there
            model = versions.add_adapter(model, files, "default", f"v{start.id}").merge_and_unload()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

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
        opt = self._optimizer(model, params, t, opt_state)
        gen = torch.Generator().manual_seed(seed)
        mean_reward = sum(e.reward for e in examples) / len(examples)
        ref_cache: dict[int, torch.Tensor] = {}    # example index → reference logprobs [t]: base is frozen
        prox_cache = self._proximal(model, examples, pad, t.minibatch_size)   # the anchor before any step
        bar = self._bar(t.epochs * math.ceil(len(examples) / t.minibatch_size), desc)
        history: list[dict] = []
        control = KLControl(t.kl_coef, t.kl_target_share * t.max_kl if t.kl_estimator == "full" else 0.0)
        first_ratio, grad_norm, step = float("nan"), float("nan"), 0
        model.train()
        try:
            for epoch in range(t.epochs):
                sums = {"loss": 0.0, "kl": 0.0, "pg": 0.0, "clip_frac": 0.0}
                for idx in minibatches(len(examples), t.minibatch_size, gen):
                    where = f"epoch {epoch + 1}, step {step + 1}"
                    if stop.is_set():
                        raise Interrupted(f"stopped at {where}")
                    batch = collate([examples[i] for i in idx], pad)                   # [B, P+T] …
                    proximal = _gather(prox_cache, idx, batch.behaviour_logp)        # [B, T]
                    out = self._step(model, reference, batch, idx, (ref_cache, proximal), opt, params, t, where,
                                     control.coef)
                    control.update(out["kl"])
                    if step == 0:
                        first_ratio = out["ratio_mean"]
                    step, grad_norm = step + 1, out["grad_norm"]
                    n = len(idx) / len(examples)          # weight minibatches by size for the epoch mean
                    for key in sums:
                        sums[key] += out[key] * n
                    bar.set_postfix(loss=f"{out['loss']:.4f}", kl=f"{out['kl']:.4f}", reward=f"{mean_reward:+.2f}",
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
                          kl_coef_last=control.base * control.last, kl_coef_peak=control.base * control.peak,
                          kl_steps_over=control.steps_over,
                          optimizer=export_adam(model, opt) if t.keep_optimizer and not t.full_finetune else {},
                          **_offpolicy_gap(prox_cache, examples, t.is_cap))

    @staticmethod
    def _optimizer(model, params: list, t: TrainerConfig, opt_state: dict | None) -> torch.optim.AdamW:
        """AdamW over ``params``; continues ``opt_state`` (the parent's moments) when it fits."""
        opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        if opt_state:
            why = import_adam(model, opt, opt_state)
            if why:
                log.warning("optimizer: starting fresh (%s)", why)
            else:
                log.info("optimizer: continuing the parent's AdamW state")
        return opt

    def _step(self, model, reference, batch, idx: list[int], caches: tuple[dict, torch.Tensor], opt, params: list,
              t: TrainerConfig, where: str, kl_coef: float) -> dict[str, float]:
        """One minibatch: forward, loss, backward, clip the grad norm, AdamW step, with the KL
        penalty weighted ``kl_coef`` (the round's controller, trainer/kl_control.py).

        ``caches``: the reference logprobs cache and this batch's proximal logprobs [B, T].
        A NaN/inf loss, gradient norm or weight raises NonFinite (``where`` names the step).
        Returns the step's loss, kl, pg, clip_frac (what the epoch sums add up), ratio_mean
        and grad_norm, as floats."""
        ref_cache, proximal = caches
        new_logp, ref_logp, kl_tokens = self._logprobs(model, reference, batch, idx, ref_cache, t.kl_estimator)
        parts = pg_loss(new_logp, batch.behaviour_logp, ref_logp, batch.advantages, batch.mask,
                        clip_eps=t.clip_eps, kl_coef=kl_coef, kl_tokens=kl_tokens, proximal_logp=proximal,
                        is_cap=t.is_cap)
        loss = float(parts.loss.detach())
        if not _finite(loss):
            raise NonFinite(f"loss is {loss} at {where}")
        opt.zero_grad(set_to_none=True)
        parts.loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
        if not _finite(grad_norm):
            raise NonFinite(f"gradient norm is {grad_norm} at {where}")
        opt.step()
        if not all(bool(torch.isfinite(p).all()) for p in params):
            raise NonFinite(f"weights became non-finite at {where}")
        return {"loss": loss, "kl": float(parts.kl), "pg": float(parts.pg), "clip_frac": float(parts.clip_frac),
                "ratio_mean": float(parts.ratio_mean), "grad_norm": grad_norm}

    def _logprobs(self, model, reference, batch, idx: list[int], ref_cache: dict, kl_estimator: str):
        """(log π_θ [B, T] with grad, log π_ref [B, T], KL per position [B, T] with grad or None)
        of the batch's reply tokens. ``kl_estimator == "full"``: the exact KL over the vocabulary;
        otherwise None (the loss uses k3) and the reference logprobs come from ``ref_cache``."""
        if kl_estimator == "full":
            new_all = torch.log_softmax(tempered(reply_logits(model, batch), batch.temperature), -1)
            ref_all = self._reference_all(model, reference, batch)            # [B, T, V]
            new_logp = new_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)  # [B, T], grad
            ref_logp = ref_all.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
            return new_logp, ref_logp, full_kl(new_all, ref_all)              # [B, T], grad
        ref_logp = self._reference_logp(model, reference, batch, idx, ref_cache)   # [B, T]
        new_logp = token_logprobs(tempered(reply_logits(model, batch), batch.temperature),
                                  batch.targets)                           # [B, T], grad
        return new_logp, ref_logp, None

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
        return _gather(cache, idx, batch.behaviour_logp)

    @torch.no_grad()
    def _proximal(self, model, examples: list[Example], pad: int, chunk: int) -> dict[int, torch.Tensor]:
        """log π of every reply's tokens under the candidate before its first step, in fp32
        (the decoupled-PPO anchor, trainer/loss.py): example index → [t]."""
        was_training = model.training
        model.eval()
        cache: dict[int, torch.Tensor] = {}
        for start in range(0, len(examples), chunk):
            idx = list(range(start, min(start + chunk, len(examples))))
            batch = collate([examples[i] for i in idx], pad)
            logp = token_logprobs(tempered(reply_logits(model, batch), batch.temperature), batch.targets)
            for row, i in enumerate(idx):
                cache[i] = logp[row, :int(batch.mask[row].sum())].clone()
        model.train(was_training)
        return cache

    def gates(self, model, reference, loss: float, stop: threading.Event, cfg: Config | None = None,
              tcfg: TrainerConfig | None = None) -> GateReport:
        """Probe the candidate with the serving settings of ``cfg`` (blocking)."""
        cfg, t = cfg or self.cfg, tcfg or self.tcfg
        s = cfg.sampling
        settings = dict(system_prompt=cfg.model.system_prompt, temperature=s.temperature, top_p=s.top_p)
        key = (tuple(settings.values()), t.probe_max_new_tokens, t.seed)
        if key not in self._probe_baselines:      # the base is frozen: its own probe replies once per setting
            self._probe_baselines[key] = probe_baseline(model, reference, self.tokenizer, tcfg=t, stop=stop,
                                                        **settings)
        return run_gates(model, reference, self.tokenizer, tcfg=t, loss=loss, stop=stop,
                         baseline=self._probe_baselines[key], **settings)
