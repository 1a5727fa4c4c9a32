"""AdamW's moments carried from one version to the next, as safetensors beside the adapter.

    flat = export_adam(model, opt)            # {"<param>.exp_avg": …, "<param>.exp_avg_sq": …, "<param>.step": …}
    note = import_adam(model, opt, flat)      # '' when loaded; otherwise why the optimizer starts fresh

Why one would want it: a round is only 8 optimizer steps on 32 noisy ratings. A fresh Adam
normalises each coordinate by the few gradients it has seen, so its first step is lr·sign(g)
for every weight, noise or not. With the moments of earlier rounds a step is about
lr·(mean gradient / its spread). This is what one long training run does (nanoGPT keeps the
optimizer in its checkpoint); here the "run" is spread over versions, so the state travels
with each version, and a rollback continues from the rolled-back version's own optimizer.

Measured (docs/LEARNING.md): it did not help. The momentum carried into the next round made
the KL to the base grow faster (v5: 0.069 vs 0.059 on `?`, 0.091 vs 0.068 on `!`), so
``trainer.keep_optimizer`` is off by default.

Only LoRA versions carry it (a full fine-tune's state would be twice the model's size).
Anything that does not fit (another rank, a missing or tampered file) means a fresh optimizer,
said in the round's ``start`` note; it never fails a round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bot import versions
from bot.versions import OPTIMIZER_FILE
_KEYS = ("exp_avg", "exp_avg_sq", "step")


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def export_adam(model, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name (empty before any step)."""
    flat: dict[str, torch.Tensor] = {}
    for name, p in _trainable(model).items():
        state = opt.state.get(p, {})
        if not all(k in state for k in _KEYS):
            continue
        for k in _KEYS:
            value = state[k]
            value = value if torch.is_tensor(value) else torch.tensor(float(value))
            flat[f"{name}.{k}"] = value.detach().to("cpu", torch.float32).contiguous().clone()
    return flat


def import_adam(model, opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> str:
    """Load ``flat`` into ``opt`` (before its first step), all or nothing. Returns '' when loaded,
    otherwise the reason the optimizer starts fresh."""
    params = _trainable(model)
    staged = {}
    for name, p in params.items():
        try:
            m, v, step = (flat[f"{name}.{k}"] for k in _KEYS)
        except KeyError:
            return f"no optimizer state for {name}"
        if m.shape != p.shape or v.shape != p.shape or step.numel() != 1:
            return f"optimizer state for {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}"
        if not (torch.isfinite(m).all() and torch.isfinite(v).all() and (v >= 0).all()):
            return f"optimizer state for {name} is not finite"
        staged[p] = {"step": step.reshape(()).to(torch.float32).clone(), "exp_avg": m.to(p).clone(),
                     "exp_avg_sq": v.to(p).clone()}
    if len(flat) != len(_KEYS) * len(params):
        return f"optimizer state has {len(flat)} tensors for {len(params)} parameters"
    opt.state.update(staged)
    return ""


def read_optimizer(folder: Path, sha256: str | None, model) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The optimizer state saved in a version folder for the trainable ``model``, checked against
    its sha256 from meta.json; a file bigger than that model's state can be is refused unread.
    Returns (state or None, why not)."""
    return versions.read_side_file(folder, OPTIMIZER_FILE, sha256, versions.max_optimizer_bytes(model))


def read_version_optimizer(folder: Path, model) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The optimizer state of the version in ``folder`` for the trainable ``model``, checked
    against the sha256 its meta.json records. Returns (state or None, why not)."""
    return versions.read_version_side_file(folder, OPTIMIZER_FILE, versions.max_optimizer_bytes(model))
