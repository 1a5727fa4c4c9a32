"""Rated replies → padded token batches for the policy-gradient loss. Pure: no I/O, no model.

Layout of one batch (B replies, P = longest prompt, T = longest reply):

    input_ids  [B, P + T]   prompt left-padded to P, then the reply right-padded to T
                            (exactly how the bot's batched generate laid the prompt out)
    attention  [B, P + T]   1 on real prompt and reply tokens
    positions  [B, P + T]   cumsum(attention) - 1, as generate computes them, so the
                            recomputed logprobs equal the recorded ones for an unchanged model
    targets    [B, T]       the sampled reply tokens (pad where the reply is shorter)
    mask       [B, T]       1 on real reply tokens
    behaviour  [B, T]       recorded log p(token) at sampling time (0 on padding)
    temperature[B]          each reply's own sampling temperature
    advantages [B]          trainer.loss.advantages over the round's rewards

Because every reply starts at column P, the logits that predict the reply are the last
T + 1 positions minus the final one: ``model(..., logits_to_keep=T + 1).logits[:, :-1]``
is [B, T, V] and lines up with ``targets``. See :func:`reply_logits`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from bot.store import ReplyRecord
from trainer.fluency import degenerate
from trainer.loss import advantages as compute_advantages

DEGENERATE_REWARD = -1.0   # what a degenerate reply counts as with punish_degenerate (a thumbs-down)


@dataclass
class Example:
    """One rated reply, ready to batch."""

    reply_id: int
    prompt_ids: list[int]
    output_ids: list[int]
    behaviour_logp: list[float]
    temperature: float
    reward: float
    advantage: float = 0.0
    degenerate: str = ""      # why the reply was judged degenerate ('' when it was not)
    weight: float = 1.0       # its voters' capped share (trainer/influence.py); scales the advantage


@dataclass
class Batch:
    input_ids: Tensor        # [B, P+T] long
    attention_mask: Tensor   # [B, P+T] long
    position_ids: Tensor     # [B, P+T] long
    targets: Tensor          # [B, T]   long
    mask: Tensor             # [B, T]   float 0/1
    behaviour_logp: Tensor   # [B, T]   float32
    temperature: Tensor      # [B]      float32
    advantages: Tensor       # [B]      float32
    rewards: Tensor          # [B]      float32
    reply_ids: list[int]

    @property
    def reply_len(self) -> int:
        return self.targets.shape[1]


def usable(r: ReplyRecord) -> str:
    """Why a reply cannot be learned from ('' when it can)."""
    if r.reward is None:
        return "no votes"
    if not r.output_ids:
        return "no sampled tokens"
    if len(r.logprobs) != len(r.output_ids):
        return f"{len(r.logprobs)} logprobs for {len(r.output_ids)} tokens"
    if not r.prompt_ids:
        return "empty prompt"
    if not (r.temperature and r.temperature > 0):
        return f"temperature {r.temperature}"
    if not all(math.isfinite(x) for x in r.logprobs):
        return "non-finite logprobs"
    return ""


def make_examples(replies: Sequence[ReplyRecord], baseline: str = "mean", *, punish_degenerate: bool = False,
                  max_repetition: float = 0.5, weights: dict | None = None) -> list[Example]:
    """Usable replies → examples with advantages computed over all of them together.

    The baseline is taken over the whole round (not per minibatch), so a minibatch of
    only liked replies still pushes the liked ones up by how much better than average
    they were.

    With ``punish_degenerate`` a reply that is emoji/symbol spam or a word loop
    (trainer/fluency.py) counts as disliked (reward DEGENERATE_REWARD) whatever its votes:
    people who like enthusiasm may like "Bella! 🌾🌼🌍🌪🌪…" too, and learning from that
    vote teaches the model to spam.

    ``weights``: reply id → ``trainer.influence.Weighted`` (the capped reward and weight);
    each advantage is then taken against the weighted mean and multiplied by its weight."""
    kept = [r for r in replies if not usable(r) and (weights is None or r.id in weights)]
    if not kept:
        return []
    why = [degenerate(r.text, max_repetition) if punish_degenerate else "" for r in kept]
    reward_of = (lambda r: float(r.reward)) if weights is None else (lambda r: weights[r.id].reward)  # noqa: E731
    w = torch.tensor([1.0 if weights is None else weights[r.id].weight for r in kept])            # [N]
    rewards = torch.tensor([DEGENERATE_REWARD if y else reward_of(r) for r, y in zip(kept, why)],
                           dtype=torch.float32)                                     # [N]
    if weights is None:
        adv = compute_advantages(rewards, baseline)                                 # [N]
    else:   # the same baselines, with each reply counted by its weight
        centred = rewards - (w * rewards).sum() / w.sum()
        adv = {"none": rewards, "mean": centred}.get(baseline)
        if adv is None:
            std = ((w * centred ** 2).sum() / w.sum()).sqrt()
            adv = centred / (std + 1e-6)
        adv = adv * w
    return [Example(reply_id=r.id, prompt_ids=list(r.prompt_ids), output_ids=list(r.output_ids),
                    behaviour_logp=list(r.logprobs), temperature=float(r.temperature), reward=float(rw),
                    advantage=float(a), degenerate=y, weight=float(wi))
            for r, rw, a, y, wi in zip(kept, rewards.tolist(), adv.tolist(), why, w.tolist())]


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Pad examples into one batch (layout in the module docstring)."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    B = len(examples)
    P = max(len(e.prompt_ids) for e in examples)
    T = max(len(e.output_ids) for e in examples)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    targets = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    behaviour = torch.zeros((B, T), dtype=torch.float32)
    for i, e in enumerate(examples):
        p, t = len(e.prompt_ids), len(e.output_ids)
        input_ids[i, P - p:P] = torch.tensor(e.prompt_ids, dtype=torch.long)
        input_ids[i, P:P + t] = torch.tensor(e.output_ids, dtype=torch.long)
        attention[i, P - p:P + t] = 1
        targets[i, :t] = torch.tensor(e.output_ids, dtype=torch.long)
        mask[i, :t] = 1.0
        behaviour[i, :t] = torch.tensor(e.behaviour_logp, dtype=torch.float32)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)                  # [B, P+T]
    return Batch(input_ids=input_ids, attention_mask=attention, position_ids=positions, targets=targets,
                 mask=mask, behaviour_logp=behaviour,
                 temperature=torch.tensor([e.temperature for e in examples], dtype=torch.float32),
                 advantages=torch.tensor([e.advantage for e in examples], dtype=torch.float32),
                 rewards=torch.tensor([e.reward for e in examples], dtype=torch.float32),
                 reply_ids=[e.reply_id for e in examples])


def reply_logits(model, batch: Batch) -> Tensor:
    """Logits that predict each reply token: [B, T, V] (the caller picks grad or no_grad)."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.reply_len + 1, use_cache=False)
    return out.logits[:, :-1]                                            # [B, T, V]


def reference_logits(model, reference, batch: Batch) -> Tensor:
    """``reply_logits`` of the reference policy: ``reference`` when it is a separate model (full
    fine-tuning), otherwise ``model`` with its LoRA adapter switched off. No grad."""
    with torch.no_grad():
        if reference is not None:
            return reply_logits(reference, batch)
        with model.disable_adapter():
            return reply_logits(model, batch)


def tempered(logits: Tensor, temperature: Tensor) -> Tensor:
    """Divide each row's logits by that reply's sampling temperature: [B, T, V] / [B] → [B, T, V]."""
    return logits.float() / temperature.to(logits.device).view(-1, 1, 1)


def minibatches(n: int, size: int, generator: torch.Generator) -> list[list[int]]:
    """A shuffled split of range(n) into chunks of at most ``size`` indices."""
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i:i + size] for i in range(0, n, size)]
