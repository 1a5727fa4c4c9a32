"""Exploration: the trainer's own samples, scored by the reward model, learned with RLOO.

    samples = sample(model, tokenizer, prompts, k, cfg.sampling)     # k replies per prompt, exact logprobs
    examples = rloo_examples(samples, rewards, k)                     # leave-one-out advantages

Why: with sparse votes a taste that shows in one reply of twenty is seen liked once in a
round, if at all. Sampling k replies for each recent prompt from the candidate (the active
version, before any step) shows the reward model more of what the policy could say; the
leave-one-out baseline (RLOO: each sample against the mean of the other k − 1 of its
prompt) pushes up the replies the reward model likes better than their siblings. These
samples are on-policy for the fp32 candidate, so their behaviour logprobs are exact and
their importance weights 1.

Scale: the rewards are 2·P(👍) − 1 in [-1, 1], like a vote. The advantages are divided by
their std over the round's samples (as GRPO and TRL's ``scale_rewards`` do): for a rare
taste the reward model's P(👍) is small everywhere, and only the differences matter. Then
they are multiplied by the reward model's ``trust`` (trainer/reward_model.py: 0 when its
cross-validated AUC is at chance, 1 from 0.75), so that a model fitted to random votes
moves the policy little instead of having its noise amplified.

(A first version capped the scale-up at 4× instead of using the trust; for a taste liked in
3% of replies the reward model's spread was ~0.005 and the cap left the exploration
advantages at ±0.04: nothing to learn from. docs/LEARNING.md has that run.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bot.torch_engine import sample_batch
from trainer.data import Example

CHUNK = 16              # sequences per generate call (bounds the logits kept for logprobs)


@dataclass
class Sample:
    group: int                 # which prompt (index into the prompts given to ``sample``)
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    text: str

    def as_example(self, temperature: float, reply_id: int = -1, reward: float = 0.0,
                   advantage: float = 0.0) -> Example:
        """The sample as a training example (a negative id: it is not a stored reply)."""
        return Example(reply_id=reply_id, prompt_ids=self.prompt_ids, output_ids=self.output_ids,
                       behaviour_logp=self.logprobs, temperature=temperature, reward=reward, advantage=advantage)


def sample(model, tokenizer, prompts: Sequence[list[int]], k: int, *, temperature: float, top_p: float,
           max_new_tokens: int, seed: int) -> list[Sample]:
    """``k`` replies to each prompt from ``model`` (blocking, seeded), in prompt order."""
    rows = [(g, p) for g, p in enumerate(prompts) for _ in range(k)]
    out: list[Sample] = []
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for i in range(0, len(rows), CHUNK):
                chunk = rows[i:i + CHUNK]
                got = sample_batch(model, tokenizer, [p for _, p in chunk], temperature=temperature, top_p=top_p,
                                   max_new_tokens=max_new_tokens)
                for (g, p), (ids, logp) in zip(chunk, got):
                    text_ids = ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids
                    out.append(Sample(g, list(p), ids, logp, tokenizer.decode(text_ids, skip_special_tokens=True)))
    finally:
        model.train(was_training)
    return out


def rloo_advantages(rewards: torch.Tensor, groups: Sequence[int], weight: float = 1.0) -> torch.Tensor:
    """Leave-one-out advantages [N]: r_i − mean of the others in i's group, divided by their
    std over all of them, times ``weight``. A group of one gets 0; all equal: all 0."""
    adv = torch.zeros_like(rewards)
    groups_t = torch.tensor(list(groups))
    for g in groups_t.unique():
        idx = (groups_t == g).nonzero().squeeze(-1)
        k = len(idx)
        if k < 2:
            continue
        r = rewards[idx]
        adv[idx] = r - (r.sum() - r) / (k - 1)
    std = float(adv.std(correction=0)) if len(adv) > 1 else 0.0
    return adv * (weight / std) if std > 1e-8 else torch.zeros_like(adv)


def rloo_examples(samples: Sequence[Sample], rewards: torch.Tensor, temperature: float,
                  weight: float = 1.0) -> list[Example]:
    """Samples with their rewards [N] → training examples with RLOO advantages (times
    ``weight``). The examples get negative reply ids (they are not stored replies)."""
    adv = rloo_advantages(rewards, [s.group for s in samples], weight)
    return [s.as_example(temperature, reply_id=-(i + 1), reward=float(r), advantage=float(a))
            for i, (s, r, a) in enumerate(zip(samples, rewards.tolist(), adv.tolist()))]
