"""Hand-computed checks for trainer/loss.py.

Every expected number below is worked out in the comments, not by calling the
code under test.
"""

import math

import pytest
import torch

from trainer.loss import LossParts, advantages, full_kl, pg_loss, token_logprobs

LN2 = math.log(2.0)
LN1_5 = math.log(1.5)
LN0_5 = math.log(0.5)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------
# Shared clipping fixture
# ---------------------------------------------------------------------------
#
# B = 2 replies, T = 3 tokens each, all real (mask = 1).
# behaviour_logp = -1 everywhere; new_logp = -1 + log(rho) with
# rho = [1.5, 0.5, 1.0] on both rows. Row 0 has A = +1, row 1 has A = -1.
# eps = 0.2 so clip range is [0.8, 1.2].
#
# Row 0 (A = +1):                 rho*A   clip(rho)*A   min     pg = -min   clipped?
#   rho = 1.5                      1.5     1.2           1.2     -1.2        yes (upper)
#   rho = 0.5                      0.5     0.8           0.5     -0.5        no
#   rho = 1.0                      1.0     1.0           1.0     -1.0        no
# Row 1 (A = -1):
#   rho = 1.5                     -1.5    -1.2          -1.5     +1.5        no
#   rho = 0.5                     -0.5    -0.8          -0.8     +0.8        yes (lower)
#   rho = 1.0                     -1.0    -1.0          -1.0     +1.0        no
#
# sum pg = -1.2 - 0.5 - 1.0 + 1.5 + 0.8 + 1.0 = 0.6 ; mean over 6 tokens = 0.1
# clip_frac = 2 / 6 = 1/3
# ratio_mean = (1.5 + 0.5 + 1.0) * 2 / 6 = 1.0


def clip_case():
    behaviour = torch.full((2, 3), -1.0)
    log_rho = torch.tensor([[LN1_5, LN0_5, 0.0], [LN1_5, LN0_5, 0.0]])
    new = (behaviour + log_rho).clone().requires_grad_(True)
    ref = new.detach().clone()  # ref == new -> k3 == 0 exactly
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    return new, behaviour, ref, adv, mask


def test_clipping_values_both_sides():
    new, behaviour, ref, adv, mask = clip_case()
    out = pg_loss(new, behaviour, ref, adv, mask, clip_eps=0.2, kl_coef=0.05)
    assert isinstance(out, LossParts)
    torch.testing.assert_close(out.pg, scalar(0.1))
    torch.testing.assert_close(out.kl, scalar(0.0))
    # kl is 0, so loss == pg regardless of kl_coef
    torch.testing.assert_close(out.loss, scalar(0.1))
    torch.testing.assert_close(out.clip_frac, scalar(1.0 / 3.0))
    torch.testing.assert_close(out.ratio_mean, scalar(1.0))
    for part in (out.loss, out.pg, out.kl, out.clip_frac, out.ratio_mean):
        assert part.dim() == 0


def test_only_upper_clip_for_positive_advantage():
    # Single reply, A = +1, rho = [1.5, 0.5]:
    #   rho=1.5 -> min(1.5, 1.2) = 1.2, clipped (upper)
    #   rho=0.5 -> min(0.5, 0.8) = 0.5, NOT clipped (lower side is irrelevant for A > 0)
    # pg = -(1.2 + 0.5) / 2 = -0.85 ; clip_frac = 1/2
    behaviour = torch.zeros(1, 2)
    new = torch.tensor([[LN1_5, LN0_5]], requires_grad=True)
    out = pg_loss(new, behaviour, new.detach(), torch.tensor([1.0]), torch.ones(1, 2), kl_coef=0.0)
    torch.testing.assert_close(out.loss, scalar(-0.85))
    torch.testing.assert_close(out.clip_frac, scalar(0.5))


def test_only_lower_clip_for_negative_advantage():
    # Single reply, A = -2, rho = [1.5, 0.5]:
    #   rho=1.5 -> min(-3.0, -2.4) = -3.0, NOT clipped
    #   rho=0.5 -> min(-1.0, -1.6) = -1.6, clipped (lower)
    # pg = -(-3.0 - 1.6) / 2 = 2.3 ; clip_frac = 1/2
    behaviour = torch.zeros(1, 2)
    new = torch.tensor([[LN1_5, LN0_5]], requires_grad=True)
    out = pg_loss(new, behaviour, new.detach(), torch.tensor([-2.0]), torch.ones(1, 2), kl_coef=0.0)
    torch.testing.assert_close(out.loss, scalar(2.3))
    torch.testing.assert_close(out.clip_frac, scalar(0.5))


def test_inside_clip_range_is_plain_policy_gradient():
    # rho = 1.1 (inside [0.8, 1.2]), A = +3: pg = -(1.1 * 3) = -3.3, never clipped.
    behaviour = torch.zeros(1, 1)
    new = torch.tensor([[math.log(1.1)]], requires_grad=True)
    out = pg_loss(new, behaviour, new.detach(), torch.tensor([3.0]), torch.ones(1, 1), kl_coef=0.0)
    torch.testing.assert_close(out.loss, scalar(-3.3))
    torch.testing.assert_close(out.clip_frac, scalar(0.0))
    torch.testing.assert_close(out.ratio_mean, scalar(1.1))


def test_gradient_zero_for_clipped_tokens():
    # d/d new_logp of -rho*A / N is -rho*A/N (since d rho / d new_logp = rho).
    # With N = 6 (clip_case), kl_coef = 0:
    #   row 0 (A=+1): [clipped -> 0, -0.5/6, -1.0/6]
    #   row 1 (A=-1): [+1.5/6, clipped -> 0, +1.0/6]
    new, behaviour, ref, adv, mask = clip_case()
    out = pg_loss(new, behaviour, ref, adv, mask, clip_eps=0.2, kl_coef=0.0)
    out.loss.backward()
    expected = torch.tensor([[0.0, -0.5 / 6, -1.0 / 6], [1.5 / 6, 0.0, 1.0 / 6]])
    torch.testing.assert_close(new.grad, expected)
    assert new.grad[0, 0].item() == 0.0
    assert new.grad[1, 1].item() == 0.0


def test_only_new_logp_gets_gradient():
    behaviour = torch.zeros(1, 2, requires_grad=True)
    ref = torch.tensor([[LN0_5, LN2]], requires_grad=True)
    new = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([1.0], requires_grad=True)
    out = pg_loss(new, behaviour, ref, adv, torch.ones(1, 2), kl_coef=0.1)
    out.loss.backward()
    assert new.grad is not None
    assert ref.grad is None
    assert behaviour.grad is None
    assert adv.grad is None
    for diag in (out.pg, out.kl, out.clip_frac, out.ratio_mean):
        assert not diag.requires_grad


# ---------------------------------------------------------------------------
# KL (k3) term
# ---------------------------------------------------------------------------


def test_k3_known_values():
    # new = behaviour (rho = 1) and A = 0, so the pg term is exactly 0.
    # log r = ref - new per token: [log 0.5, log 2, 0]
    #   r = 0.5: k3 = 0.5 - 1 - log 0.5 = -0.5 + ln2 = 0.19314718...
    #   r = 2  : k3 = 2   - 1 - log 2   =  1.0 - ln2 = 0.30685282...
    #   r = 1  : k3 = 1   - 1 - 0       =  0
    # mean k3 = (0.5) / 3 = 1/6 (the ln2 terms cancel)
    # loss = kl_coef * 1/6 = 0.1 / 6
    new = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    behaviour = new.detach().clone()
    ref = new.detach() + torch.tensor([[LN0_5, LN2, 0.0]])
    out = pg_loss(new, behaviour, ref, torch.tensor([0.0]), torch.ones(1, 3), kl_coef=0.1)
    torch.testing.assert_close(out.pg, scalar(0.0))
    torch.testing.assert_close(out.kl, scalar(1.0 / 6.0))
    torch.testing.assert_close(out.loss, scalar(0.1 / 6.0))

    # Single token check of the r = 0.5 value by itself.
    one = pg_loss(new[:, :1], behaviour[:, :1], ref[:, :1], torch.tensor([0.0]),
                  torch.ones(1, 1), kl_coef=1.0)
    assert one.kl.item() == pytest.approx(-0.5 + LN2, abs=1e-6)
    assert one.kl.item() == pytest.approx(0.19314718, abs=1e-6)

    # Gradient: d k3 / d new = d/d new [exp(ref-new) - 1 - (ref-new)] = 1 - r
    #   r = 0.5 -> 0.5 ; r = 2 -> -1 ; r = 1 -> 0 ; times kl_coef / N = 0.1 / 3
    out.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[0.5, -1.0, 0.0]]) * (0.1 / 3))


def test_kl_added_to_pg():
    # One token: rho = 1.5 (behaviour 0, new ln1.5), A = +1 -> pg = -1.2 (clipped)
    # ref = new + ln2 -> r = 2 -> k3 = 1 - ln2
    # loss = -1.2 + 0.5 * (1 - ln2)
    new = torch.tensor([[LN1_5]], requires_grad=True)
    ref = new.detach() + LN2
    out = pg_loss(new, torch.zeros(1, 1), ref, torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.5)
    assert out.loss.item() == pytest.approx(-1.2 + 0.5 * (1 - LN2), abs=1e-6)
    assert out.pg.item() == pytest.approx(-1.2, abs=1e-6)
    assert out.kl.item() == pytest.approx(1 - LN2, abs=1e-6)


# ---------------------------------------------------------------------------
# Masking
# ---------------------------------------------------------------------------


def test_masked_tokens_contribute_nothing():
    # Row 0: 2 real tokens then 2 padding; row 1: 1 real token then 3 padding.
    # Real tokens:
    #   row 0, A=+1: rho = 1.0 -> pg = -1.0 ; rho = 0.5 -> pg = -0.5
    #   row 1, A=-1: rho = 1.5 -> pg = +1.5
    # N = 3 real tokens: pg = (-1.0 - 0.5 + 1.5) / 3 = 0.0
    # ratio_mean = (1.0 + 0.5 + 1.5) / 3 = 1.0 ; clip_frac = 0
    # Padding holds garbage (huge, inf, nan) that must not leak into anything.
    inf, nan = float("inf"), float("nan")
    behaviour = torch.tensor([[0.0, 0.0, -50.0, -inf], [0.0, 3.0, nan, 0.0]])
    new = torch.tensor([[0.0, LN0_5, 50.0, 7.0], [LN1_5, -inf, 1.0, nan]], requires_grad=True)
    ref = torch.tensor([[0.0, LN0_5, -inf, 100.0], [LN1_5, 9.0, 0.0, nan]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0])

    out = pg_loss(new, behaviour, ref, adv, mask, kl_coef=0.05)
    torch.testing.assert_close(out.loss, scalar(0.0))
    torch.testing.assert_close(out.pg, scalar(0.0))
    torch.testing.assert_close(out.kl, scalar(0.0))
    torch.testing.assert_close(out.clip_frac, scalar(0.0))
    torch.testing.assert_close(out.ratio_mean, scalar(1.0))

    out.loss.backward()
    # grad = -rho*A/N on real tokens: [-1/3, -0.5/3] and [+1.5/3]; exactly 0 on padding
    expected = torch.tensor([[-1.0 / 3, -0.5 / 3, 0.0, 0.0], [1.5 / 3, 0.0, 0.0, 0.0]])
    assert torch.isfinite(new.grad).all()
    torch.testing.assert_close(new.grad, expected)


def test_padding_does_not_change_loss():
    # Same real tokens with and without extra padding columns -> same loss.
    behaviour = torch.zeros(1, 2)
    new = torch.tensor([[LN1_5, LN0_5]])
    adv = torch.tensor([1.0])
    ref = torch.tensor([[0.0, 0.0]])
    short = pg_loss(new, behaviour, ref, adv, torch.ones(1, 2))

    pad = torch.tensor([[123.0, -5.0]])
    long = pg_loss(torch.cat([new, pad], 1), torch.cat([behaviour, -pad], 1),
                   torch.cat([ref, pad * 2], 1), adv,
                   torch.tensor([[True, True, False, False]]))
    torch.testing.assert_close(long.loss, short.loss)
    torch.testing.assert_close(long.kl, short.kl)
    torch.testing.assert_close(long.clip_frac, short.clip_frac)


def test_all_masked_gives_zero_not_nan():
    out = pg_loss(torch.zeros(1, 2, requires_grad=True), torch.zeros(1, 2), torch.zeros(1, 2),
                  torch.tensor([1.0]), torch.zeros(1, 2))
    assert out.loss.item() == 0.0


# ---------------------------------------------------------------------------
# Advantages / baselines
# ---------------------------------------------------------------------------


def test_advantages_mean_baseline():
    # rewards [1, 0, -1, 2]: mean = 2/4 = 0.5 -> A = [0.5, -0.5, -1.5, 1.5]
    a = advantages(torch.tensor([1.0, 0.0, -1.0, 2.0]), "mean")
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -1.5, 1.5]))
    # default is "mean"
    torch.testing.assert_close(advantages(torch.tensor([1.0, 0.0, -1.0, 2.0])), a)


def test_advantages_mean_std_baseline():
    # centred = [0.5, -0.5, -1.5, 1.5]
    # population variance = (0.25 + 0.25 + 2.25 + 2.25) / 4 = 1.25 -> std = sqrt(1.25) = 1.1180340
    # A = centred / (1.1180340 + 1e-6) ~= [0.4472, -0.4472, -1.3416, 1.3416]
    a = advantages(torch.tensor([1.0, 0.0, -1.0, 2.0]), "mean_std")
    d = math.sqrt(1.25) + 1e-6
    torch.testing.assert_close(a, torch.tensor([0.5 / d, -0.5 / d, -1.5 / d, 1.5 / d]))
    assert a[3].item() == pytest.approx(1.3416, abs=1e-4)


def test_advantages_none():
    torch.testing.assert_close(advantages(torch.tensor([1.0, -2.0, 0.5]), "none"), torch.tensor([1.0, -2.0, 0.5]))


def test_advantages_single_reply_no_nan():
    # B = 1: mean = r, so A = 0; std = 0 -> 0 / 1e-6 = 0, not NaN.
    for baseline in ("mean", "mean_std"):
        a = advantages(torch.tensor([3.0]), baseline)
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a, torch.tensor([0.0]))
    torch.testing.assert_close(advantages(torch.tensor([3.0]), "none"), torch.tensor([3.0]))


def test_advantages_identical_rewards_no_nan():
    a = advantages(torch.tensor([2.0, 2.0, 2.0]), "mean_std")
    torch.testing.assert_close(a, torch.zeros(3))


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="baseline"):
        advantages(torch.tensor([1.0, 2.0]), "median")
    with pytest.raises(ValueError, match=r"\[B\]"):
        advantages(torch.ones(2, 2))
    with pytest.raises(ValueError, match="empty"):
        advantages(torch.tensor([]))


# ---------------------------------------------------------------------------
# Shape validation
# ---------------------------------------------------------------------------


def test_shape_mismatch_raises():
    ok = torch.zeros(2, 3)
    adv = torch.zeros(2)
    with pytest.raises(ValueError, match="behaviour_logp"):
        pg_loss(ok, torch.zeros(2, 4), ok, adv, ok)
    with pytest.raises(ValueError, match="ref_logp"):
        pg_loss(ok, ok, torch.zeros(3, 3), adv, ok)
    with pytest.raises(ValueError, match="mask"):
        pg_loss(ok, ok, ok, adv, torch.ones(2, 2))
    with pytest.raises(ValueError, match="advantages"):
        pg_loss(ok, ok, ok, torch.zeros(3), ok)
    with pytest.raises(ValueError, match="advantages"):
        pg_loss(ok, ok, ok, torch.zeros(2, 1), ok)
    with pytest.raises(ValueError, match="new_logp"):
        pg_loss(torch.zeros(6), torch.zeros(6), torch.zeros(6), adv, torch.zeros(6))


def test_bad_hyperparameters_raise():
    ok = torch.zeros(1, 1)
    with pytest.raises(ValueError, match="clip_eps"):
        pg_loss(ok, ok, ok, torch.zeros(1), ok, clip_eps=0.0)
    with pytest.raises(ValueError, match="kl_coef"):
        pg_loss(ok, ok, ok, torch.zeros(1), ok, kl_coef=-0.1)


# ---------------------------------------------------------------------------
# token_logprobs
# ---------------------------------------------------------------------------


def test_token_logprobs_values():
    # logits over V = 3: [0, 0, ln2] -> exp = [1, 1, 2] -> probs [1/4, 1/4, 1/2]
    #   temperature 1: token 2 -> log(1/2), token 0 -> log(1/4)
    # temperature 2: logits/2 = [0, 0, ln2/2] -> exp = [1, 1, sqrt2]
    #   token 2 -> log(sqrt2 / (2 + sqrt2)) = log(0.41421356...)
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])  # [1, 2, 3]
    tokens = torch.tensor([[2, 0]])  # [1, 2]
    lp = token_logprobs(logits, tokens, temperature=1.0)
    assert lp.shape == (1, 2)
    torch.testing.assert_close(lp, torch.tensor([[math.log(0.5), math.log(0.25)]]))

    lp2 = token_logprobs(logits, tokens, temperature=2.0)
    s2 = math.sqrt(2.0)
    torch.testing.assert_close(lp2, torch.tensor([[math.log(s2 / (2 + s2)), math.log(1 / (2 + s2))]]))
    assert lp2[0, 0].item() == pytest.approx(math.log(0.41421356), abs=1e-6)


def test_token_logprobs_bf16_and_grad():
    logits = torch.tensor([[[0.0, 0.0, LN2]]], dtype=torch.bfloat16, requires_grad=True)
    lp = token_logprobs(logits, torch.tensor([[2]]), 1.0)
    assert lp.dtype == torch.float32
    lp.sum().backward()
    assert logits.grad is not None


def test_token_logprobs_bad_input():
    logits = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="tokens"):
        token_logprobs(logits, torch.zeros(1, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="logits"):
        token_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.zeros(1, 2, dtype=torch.long), 0.0)


# ---------------------------------------------------------------------------
# Exact KL over the vocabulary (kl_estimator = "full")
# ---------------------------------------------------------------------------


def test_full_kl_known_values():
    # position 0: p = (1/2, 1/2), q = (1/4, 3/4):
    #   KL = 1/2 ln(2) + 1/2 ln(2/3) = 1/2 ln(4/3) = 0.14384103...
    # position 1: p == q = (0.9, 0.1): KL = 0
    p = torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]).log()
    q = torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]).log()
    kl = full_kl(p, q)
    assert kl.shape == (1, 2)
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        full_kl(p[0], q[0])


def test_pg_loss_uses_the_given_kl_and_masks_padding():
    # A = 0, rho = 1: the loss is kl_coef * mean of kl_tokens over the real tokens only.
    new = torch.zeros(1, 3, requires_grad=True)
    kl_tokens = torch.tensor([[0.3, 0.6, 99.0]], requires_grad=True)   # the last is padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    out = pg_loss(new, new.detach(), new.detach() + 5.0, torch.tensor([0.0]), mask, kl_coef=0.5,
                  kl_tokens=kl_tokens)
    torch.testing.assert_close(out.kl, scalar(0.45))                    # k3 of ref = new + 5 would be ~143
    torch.testing.assert_close(out.loss, scalar(0.5 * 0.45))
    out.loss.backward()
    assert kl_tokens.grad[0].tolist() == pytest.approx([0.25, 0.25, 0.0])
    with pytest.raises(ValueError, match="kl_tokens shape"):
        pg_loss(new, new.detach(), new.detach(), torch.tensor([0.0]), mask, kl_tokens=torch.zeros(1, 2))


def test_full_kl_gradient_pulls_toward_the_reference():
    # one step of gradient descent on KL(softmax(x) || q) moves softmax(x) toward q
    q = torch.tensor([[[0.2, 0.8]]]).log()
    x = torch.zeros(1, 1, 2, requires_grad=True)
    full_kl(torch.log_softmax(x, -1), q).sum().backward()
    with torch.no_grad():
        after = torch.softmax(x - 1.0 * x.grad, -1)
    assert 0.5 < after[0, 0, 1].item() < 0.8


# ---------------------------------------------------------------------------
# Decoupled PPO with truncated importance sampling (proximal_logp, is_cap)
# ---------------------------------------------------------------------------


def test_proximal_equal_to_behaviour_changes_nothing():
    new, behaviour, ref, adv, mask = clip_case()
    plain = pg_loss(new, behaviour, ref, adv, mask, kl_coef=0.0)
    same = pg_loss(new, behaviour, ref, adv, mask, kl_coef=0.0, proximal_logp=behaviour.clone())
    torch.testing.assert_close(same.loss, plain.loss)
    torch.testing.assert_close(same.clip_frac, plain.clip_frac)
    torch.testing.assert_close(same.is_weight, scalar(1.0))


def test_ratio_is_taken_against_the_proximal_policy():
    # The serving engine recorded log p = -2 for a token the trainer's model gives -1 (e = 2.7x
    # likelier). With new == proximal the PPO ratio is exactly 1 (nothing clipped); the token's
    # weight is min(e, cap = 2) = 2, so pg = -(1 * A) * 2 = -2 for A = +1.
    behaviour = torch.full((1, 1), -2.0)
    proximal = torch.full((1, 1), -1.0)
    new = proximal.clone().requires_grad_(True)
    out = pg_loss(new, behaviour, new.detach(), torch.tensor([1.0]), torch.ones(1, 1), kl_coef=0.0,
                  proximal_logp=proximal, is_cap=2.0)
    torch.testing.assert_close(out.ratio_mean, scalar(1.0))
    torch.testing.assert_close(out.clip_frac, scalar(0.0))
    torch.testing.assert_close(out.is_weight, scalar(2.0))          # truncated from e ~ 2.72
    torch.testing.assert_close(out.loss, scalar(-2.0))
    out.loss.backward()
    torch.testing.assert_close(new.grad, torch.tensor([[-2.0]]))    # d(-rho*A*w)/d new = -rho*A*w


def test_importance_weight_below_the_cap_is_exact():
    # proximal / behaviour = 0.5 (the engine found the token likelier): weight 0.5, untruncated.
    behaviour = torch.full((1, 1), math.log(0.4))
    proximal = torch.full((1, 1), math.log(0.2))
    new = proximal.clone().requires_grad_(True)
    out = pg_loss(new, behaviour, new.detach(), torch.tensor([-1.0]), torch.ones(1, 1), kl_coef=0.0,
                  proximal_logp=proximal, is_cap=2.0)
    torch.testing.assert_close(out.is_weight, scalar(0.5))
    torch.testing.assert_close(out.loss, scalar(0.5))               # -(1 * -1) * 0.5
