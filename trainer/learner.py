"""The learner: the base model, the candidate built from the active version, and its training.

    learner = Learner(cfg, tcfg)            # loads the base model once, keeps it between rounds
    model, kind, reference, note = learner.candidate(active_version, seed)
    stats = learner.train(model, reference, examples, seed=seed, stop=stop)   # epochs × minibatches
    report = learner.gates(model, reference, stats.loss, stop)

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

from bot.config import Config
from bot.models import load_model_and_tokenizer
from bot.policy import VersionError, read_verified_version
from bot.store import Version
from trainer.config import TrainerConfig
from trainer.data import Example, collate, minibatches, reference_logits, reply_logits, tempered
from trainer.gates import GateReport, Interrupted, run_gates
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
