"""A round's KL budget: the KL penalty grows while the policy is past its target.

    control = KLControl(coef=tcfg.kl_coef, target=tcfg.kl_target_share * tcfg.max_kl)
    for batch in minibatches:
        parts = pg_loss(..., kl_coef=control.coef)
        control.update(float(parts.kl))       # the exact KL to the base at this batch's tokens

Why: the gate refuses a candidate whose KL to the base is over ``max_kl``, but a fixed
penalty does not keep a policy under it. In the simulations with the product's window
(every rated reply so far is learned from again each round) the KL grew by 0.05-0.1 a
round from round 5 on and ended at 0.46 (docs/LEARNING.md). Learning toward what people
like while staying close to the base is a constrained problem (maximise reward subject to
KL ≤ target); its Lagrange multiplier is the penalty's weight, and dual ascent raises it
while the constraint is broken and lowers it again when it holds. So after every step the
weight is multiplied by exp(clip(KL / target − 1, −1, 1)): ×2.7 per step while the KL is
twice the target or more, ×0.37 per step at zero KL, and never below ``kl_coef`` (the
controller only adds pressure; under the target the penalty is the configured one) nor
above ``MAX_SCALE`` × ``kl_coef``. It starts from ``kl_coef`` each round (no state between
versions): a round that starts over the target (an older version, a different
``max_kl``) raises the weight within a few steps and pulls back toward the base.

The KL it reads is the loss's own (trainer/loss.py ``full_kl``): the exact KL to the base
over the vocabulary at the positions of the batch's reply tokens. With ``kl_estimator = "k3"``
the loss's number is the heavy-tailed sampled-token estimate (epoch means over 100 where the
exact KL was 0.05, docs/LEARNING.md), which would drive the weight to its cap within a few
steps, so the learner turns the control off there (target 0); ``kl_coef = 0`` (no penalty)
turns it off too. On the probe prompts the gate measures about 1.1× that number (round 6
of the window run: 0.141 at the gate, 0.127 in training), so the target sits below the gate
(``kl_target_share``, 0.7 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["KLControl", "MAX_SCALE"]

MAX_SCALE = 1000.0      # the weight grows at most to kl_coef × this (0.05 → 50: the KL term dominates)


@dataclass
class KLControl:
    base: float               # trainer.kl_coef: the weight at and under the target; 0: off
    target: float             # nats per token; <= 0 or inf turns the control off
    scale: float = 1.0        # current weight = base × scale
    peak: float = 1.0         # the largest scale a step used
    last: float = 1.0         # the scale the last step used
    steps_over: int = 0       # updates that saw the KL over the target
    steps: int = 0

    @property
    def coef(self) -> float:
        return self.base * self.scale

    def update(self, kl: float) -> float:
        """Record the KL of a step taken with ``coef``; returns the weight for the next step."""
        self.steps += 1
        self.last = self.scale                          # the scale this step was taken with
        if not (self.base > 0 and self.target > 0 and math.isfinite(self.target) and math.isfinite(kl)):
            return self.coef
        if kl > self.target:
            self.steps_over += 1
        error = max(-1.0, min(1.0, kl / self.target - 1.0))
        self.peak = max(self.peak, self.scale)
        self.scale = min(MAX_SCALE, max(1.0, self.scale * math.exp(error)))
        return self.coef
