"""Policy-gradient loss for learning from emoji reactions.

Each bot reply is one "sample": a sequence of sampled tokens with a single
scalar reward (derived from the reactions it got). We turn rewards into
advantages, then optimise a PPO-style clipped surrogate per token plus a KL
penalty that keeps the LoRA-adapted policy close to the frozen base model.

Notation used in the shape comments:
    B = number of replies in the batch
    T = (padded) number of reply tokens per row
    V = vocabulary size

Three log-probability tensors, all for the *same* sampled tokens:
    new_logp        log pi_theta(token)  - current policy, carries grad
    behaviour_logp  log pi_old(token)    - policy that actually produced the
                                           reply (recorded at sampling time)
    ref_logp        log pi_ref(token)    - frozen base model (adapter off)
and optionally
    proximal_logp   log pi_prox(token)   - the candidate before its first step,
                                           recomputed in fp32 by the trainer

Why a fourth: the serving engine samples with int8 weights (bot/ct2_engine.py), so the
recorded behaviour numbers are not what the fp32 trainer computes for the same model
(measured on the default model: mean |log ratio| 0.19 per token, 30% of tokens outside
PPO's 0.8-1.25 window, docs/PERFORMANCE.md). With the plain ratio pi_theta / pi_behaviour
PPO would clip those tokens before learning anything. So, as in decoupled PPO with
truncated importance sampling (TIS): the clipped ratio is pi_theta / pi_prox (exactly 1
at the first step), and each token's term is weighted by min(pi_prox / pi_behaviour, C),
the off-policy correction, truncated at C (``is_cap``) so that a token the engine found
unlikely cannot blow up a round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LossParts", "token_logprobs", "full_kl", "pg_loss", "advantages"]


@dataclass
class LossParts:
    """Result of :func:`pg_loss`. All fields are scalar (0-dim) tensors.

    Only ``loss`` carries grad; the rest are detached diagnostics for logging.
    """

    loss: Tensor  # total objective to call .backward() on
    pg: Tensor  # masked mean of the clipped policy-gradient term
    kl: Tensor  # masked mean of the KL term (k3 or exact; before kl_coef)
    clip_frac: Tensor  # fraction of real tokens where clipping was active
    ratio_mean: Tensor  # masked mean of rho = pi_theta / pi_prox (pi_behaviour without proximal_logp)
    is_weight: Tensor  # masked mean of the truncated importance weight (1 without proximal_logp)


# --------------------------------------------------------------------------
# Log-probabilities of sampled tokens
# --------------------------------------------------------------------------


def token_logprobs(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature) gathered at ``tokens``.

    logits: [B, T, V]  (logits[b, t] is the distribution that *predicts*
                        tokens[b, t], i.e. the caller has already shifted)
    tokens: [B, T]     (integer token ids)
    returns [B, T]     (float32)

    The temperature must be the one used when sampling, otherwise
    new_logp and behaviour_logp describe different distributions and the
    ratio rho is biased even before any update.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens shape {tuple(tokens.shape)} does not match logits [B, T] = "
            f"{tuple(logits.shape[:2])}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    # Upcast: bf16/fp16 logits lose too much precision in log-softmax.
    scaled = logits.float() / temperature  # [B, T, V]
    # log_softmax(x)[k] = x[k] - logsumexp(x); gathering first avoids
    # materialising a second [B, T, V] tensor of log-probs.
    picked = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked - torch.logsumexp(scaled, dim=-1)  # [B, T]


def full_kl(new_logp_all: Tensor, ref_logp_all: Tensor) -> Tensor:
    """Exact KL(pi_theta || pi_ref) at every position, summed over the vocabulary.

    new_logp_all, ref_logp_all: [B, T, V] log-softmax of the (tempered) logits
    returns [B, T]: sum_v p_theta(v) * (log p_theta(v) - log p_ref(v)), >= 0

    Why this and not the k3 estimate at the sampled tokens: k3 = r - 1 - log r with
    r = pi_ref / pi_theta is unbiased only for tokens sampled from pi_theta. Our replies
    were sampled by an earlier policy, and a token that the current policy has pushed
    down while the base still likes it gives r in the hundreds: one such token then
    outweighs the whole policy-gradient signal of a minibatch (we measured epoch means
    of k3 above 100 while the exact KL on fresh samples was 0.05). The exact KL has no
    such tail, costs one more [B, T, V] softmax, and is what the gate and the target
    measure.
    """
    if new_logp_all.shape != ref_logp_all.shape or new_logp_all.dim() != 3:
        raise ValueError(f"need two [B, T, V] tensors, got {tuple(new_logp_all.shape)} and "
                         f"{tuple(ref_logp_all.shape)}")
    return (new_logp_all.exp() * (new_logp_all - ref_logp_all.detach())).sum(-1)  # [B, T]


# --------------------------------------------------------------------------
# Clipped policy-gradient loss with KL penalty
# --------------------------------------------------------------------------


def _check_shapes(new_logp: Tensor, behaviour_logp: Tensor, ref_logp: Tensor,
                  advantages: Tensor, mask: Tensor) -> None:
    if new_logp.dim() != 2:
        raise ValueError(f"new_logp must be [B, T], got shape {tuple(new_logp.shape)}")
    for name, t in (("behaviour_logp", behaviour_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t.shape != new_logp.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match new_logp shape "
                f"{tuple(new_logp.shape)}; all per-token tensors must be [B, T]"
            )
    batch = new_logp.shape[0]
    if advantages.shape != (batch,):
        raise ValueError(
            f"advantages must be [B] = ({batch},) (one value per reply), got shape "
            f"{tuple(advantages.shape)}"
        )


def pg_loss(
    new_logp: Tensor,
    behaviour_logp: Tensor,
    ref_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.05,
    kl_tokens: Tensor | None = None,
    proximal_logp: Tensor | None = None,
    is_cap: float = 2.0,
) -> LossParts:
    """PPO-clip surrogate + KL penalty, averaged over all real tokens.

    new_logp, behaviour_logp, ref_logp: [B, T]
    mask:        [B, T]  1 (or True) for real sampled reply tokens, 0 for padding
    advantages:  [B]     one per reply, shared by all of that reply's tokens

    Per real token (rho = exp(new_logp - behaviour_logp), A = advantage):
        pg_term = -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A)
        k3      = exp(log_r) - 1 - log_r,   log_r = ref_logp - new_logp
        term    = pg_term + kl_coef * k3
    loss = sum(term * mask) / sum(mask)

    kl_tokens: [B, T] per-position KL with grad (e.g. :func:`full_kl`); when given it
    replaces k3 in the penalty (ref_logp is then unused apart from its shape).
    proximal_logp: [B, T] (see the module doc): rho becomes exp(new_logp - proximal_logp)
    and pg_term is weighted by min(exp(proximal_logp - behaviour_logp), is_cap).
    """
    _check_shapes(new_logp, behaviour_logp, ref_logp, advantages, mask)
    if not 0.0 < clip_eps < 1.0:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")

    # Only new_logp is trained. The behaviour policy's numbers were recorded at
    # sampling time and the reference model is frozen: neither may get grad.
    behaviour_logp = behaviour_logp.detach()
    anchor = behaviour_logp if proximal_logp is None else proximal_logp.detach()
    ref_logp = ref_logp.detach()
    adv = advantages.detach().to(new_logp.dtype).unsqueeze(1)  # [B, 1], broadcasts over T

    real = mask.bool()  # [B, T]
    weight = real.to(new_logp.dtype)  # [B, T]
    # If a batch has no real tokens the loss is 0 rather than 0/0 = NaN.
    n_tokens = weight.sum().clamp(min=1.0)  # scalar

    # Padding positions may hold garbage (e.g. -inf log-probs); exp() of that
    # would give inf, and inf * 0 = NaN. So zero the log-ratios there *before*
    # exponentiating: padded tokens then have rho = 1, k3 = 0 and zero grad.
    zero = torch.zeros((), dtype=new_logp.dtype, device=new_logp.device)
    log_ratio = torch.where(real, new_logp - anchor, zero)  # [B, T]
    log_r_ref = torch.where(real, ref_logp - new_logp, zero)  # [B, T]
    is_w = torch.exp(torch.where(real, anchor - behaviour_logp, zero)).clamp(max=is_cap)  # [B, T], 1 w/o prox

    ratio = torch.exp(log_ratio)  # [B, T]  rho
    pg_term, clip_active = _clipped_surrogate(ratio, adv, clip_eps, real)  # [B, T] each
    pg_term = pg_term * is_w
    k3 = _kl_penalty(log_r_ref, kl_tokens, real, zero)  # [B, T]

    # --- Token-level masked mean over the whole batch -----------------------
    # Every real token in the batch weighs the same (so longer replies weigh
    # more than short ones), as in DAPO / TRL's "token-level" loss.
    per_token = pg_term + kl_coef * k3  # [B, T]
    loss = (per_token * weight).sum() / n_tokens  # scalar, has grad

    with torch.no_grad():
        pg = (pg_term * weight).sum() / n_tokens
        kl = (k3 * weight).sum() / n_tokens
        clip_frac = clip_active.to(new_logp.dtype).sum() / n_tokens
        ratio_mean = (ratio * weight).sum() / n_tokens
        is_weight = (is_w * weight).sum() / n_tokens

    return LossParts(loss=loss, pg=pg, kl=kl, clip_frac=clip_frac, ratio_mean=ratio_mean, is_weight=is_weight)


def _clipped_surrogate(ratio: Tensor, adv: Tensor, clip_eps: float, real: Tensor) -> tuple[Tensor, Tensor]:
    """The PPO-clip term and where clipping was active, both [B, T].

    ratio: [B, T] rho;  adv: [B, 1] (broadcasts over T);  real: [B, T] bool
    """
    unclipped = ratio * adv  # [B, T]
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv  # [B, T]
    # Pessimistic bound: take the smaller objective. When the clipped branch
    # wins, clamp() is flat there, so the token contributes no gradient.
    pg_term = -torch.minimum(unclipped, clipped)  # [B, T]

    # Clipping is "active" where the clipped branch was chosen AND differs,
    # i.e. rho > 1+eps with A > 0, or rho < 1-eps with A < 0.
    clip_active = (clipped < unclipped) & real  # [B, T]
    return pg_term, clip_active


def _kl_penalty(log_r_ref: Tensor, kl_tokens: Tensor | None, real: Tensor, zero: Tensor) -> Tensor:
    """KL(pi_theta || pi_ref) per token [B, T]: the k3 estimate, or ``kl_tokens`` when given.

    log_r_ref: [B, T] log pi_ref - log pi_theta, already 0 at padding;  real: [B, T] bool

    k3 = r - 1 - log r with r = pi_ref / pi_theta (Schulman, "Approximating
    KL divergence"). It is >= 0 for every token and unbiased for
    KL(pi_theta || pi_ref) *when the token is sampled from pi_theta*.
    Our tokens were sampled from the behaviour policy instead, so strictly an
    importance weight rho would be needed. Like GRPO (DeepSeekMath) and TRL's
    GRPOTrainer we evaluate k3 at the behaviour samples with no weighting:
    pi_theta stays close to pi_behaviour (that is what clipping enforces), so
    the bias is small, and the unweighted penalty has lower variance.
    """
    if kl_tokens is None:
        return torch.exp(log_r_ref) - 1.0 - log_r_ref  # [B, T]
    if kl_tokens.shape != log_r_ref.shape:
        raise ValueError(f"kl_tokens shape {tuple(kl_tokens.shape)} does not match {tuple(log_r_ref.shape)}")
    return torch.where(real, kl_tokens, zero)  # [B, T], the exact KL instead


# --------------------------------------------------------------------------
# Rewards -> advantages
# --------------------------------------------------------------------------


def advantages(rewards: Tensor, baseline: str = "mean") -> Tensor:
    """Turn per-reply rewards [B] into advantages [B].

    baseline:
      "mean"      A = r - mean(r)
      "mean_std"  A = (r - mean(r)) / (std(r) + 1e-6)   (GRPO-style)
      "none"      A = r

    Why the batch mean: subtracting any baseline that does not depend on the
    sampled action leaves the policy gradient unbiased (the mean includes the
    sample itself, so it is only "unbiased-ish", with O(1/B) bias) and it cuts
    variance a lot: without it, all-positive rewards would push up every reply
    that was sampled. A learned value network would be the usual alternative,
    but for a 135M-parameter model trained on a few hundred reactions a critic
    is more parameters and more noise than signal. "mean_std" additionally
    normalises the scale, like GRPO, so the step size does not depend on how
    generous the reward mapping is.

    The std is the population std (correction=0), so B=1 gives std 0 and
    A = 0 / 1e-6 = 0 instead of NaN. Note that with a mean baseline a single
    reply (B=1) or a batch of identical rewards carries no learning signal.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B], got shape {tuple(rewards.shape)}")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty; need at least one reply")

    if not rewards.is_floating_point():
        rewards = rewards.float()  # [B]; integer reaction counts are fine
    if baseline == "none":
        return rewards.clone()
    centred = rewards - rewards.mean()  # [B]
    if baseline == "mean":
        return centred
    if baseline == "mean_std":
        std = rewards.std(correction=0)  # scalar, 0 for B = 1
        return centred / (std + 1e-6)  # [B]
    raise ValueError(f"unknown baseline {baseline!r}; expected 'mean', 'mean_std' or 'none'")
