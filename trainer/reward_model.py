"""A reward model learned from the votes: P(👍 | conversation, reply).

    feats = FeatureCache(base, pad_id)                   # the frozen base model's view of a reply
    x = feats.of(examples)                               # [N, 3H], cached by reply id
    rm = RewardModel.fit(x, targets, weights, l2=1.0)    # a second or two on every vote so far
    p = rm.predict(x)                                    # [N] in (0, 1)
    rm.state() / RewardModel.from_state(state)           # tensors, saved as safetensors with the version

Why: one vote is one noisy bit about one reply. A reward model spreads it: it scores replies
nobody voted on, among them the ones the trainer samples itself to explore
(trainer/explore.py), so a taste that shows in one reply of twenty can be found.

Features [3H]: over the reply tokens, the mean of the base model's token embeddings (which
words) and of its last hidden state (after the final norm: what they say in context), and
the last hidden state at the first reply token (how the reply opens). On 128 base replies
with 64 noisy labels this mix had held-out AUC 0.54-0.78 across six tastes, where the last
layer alone or the embeddings alone each failed on some (docs/LEARNING.md). The base
never changes, so a reply's features are computed once (``FeatureCache``). The head is a
logistic regression on standardised features with an L2 penalty: a few hundred votes
cannot fit more than a linear read-out of what the base already represents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from bot.store import ReplyRecord
from trainer.data import Example, collate, usable


def reply_features(base, examples: Sequence[Example], pad_id: int, chunk: int = 8) -> Tensor:
    """[N, 3H] (module docstring) of each reply under ``base`` (no grad)."""
    rows = []
    with torch.no_grad():
        for i in range(0, len(examples), chunk):
            batch = collate(examples[i:i + chunk], pad_id)
            out = base(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, output_hidden_states=True, logits_to_keep=1,
                       use_cache=False)
            T = batch.reply_len
            mask = batch.mask.unsqueeze(-1)                                # [B, T, 1]
            embedded = out.hidden_states[0][:, -T:].float()                # [B, T, H] the reply's positions
            last = out.hidden_states[-1][:, -T:].float()                   # [B, T, H]
            mean = lambda h: (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)   # noqa: E731  [B, H]
            rows.append(torch.cat([mean(embedded), mean(last), last[:, 0]], dim=-1))   # [B, 3H]
    return torch.cat(rows) if rows else torch.zeros(0, 0)


class FeatureCache:
    """``reply_features`` by token content, so each reply goes through the base model once
    (keyed by its prompt and output ids, not its id: an id may be reused after /forget)."""

    def __init__(self, base, pad_id: int):
        self.base, self.pad_id = base, pad_id
        self._rows: dict[tuple, Tensor] = {}

    @staticmethod
    def _key(e: Example) -> tuple:
        return tuple(e.prompt_ids), tuple(e.output_ids)

    def of(self, examples: Sequence[Example]) -> Tensor:
        todo = list({self._key(e): e for e in examples if self._key(e) not in self._rows}.values())
        if todo:
            for e, row in zip(todo, reply_features(self.base, todo, self.pad_id)):
                self._rows[self._key(e)] = row
        return torch.stack([self._rows[self._key(e)] for e in examples])


@dataclass
class RewardModel:
    """A logistic regression on standardised features: p = σ(((x − mean) / scale) · w + b)."""

    mean: Tensor       # [D]
    scale: Tensor      # [D]
    weight: Tensor     # [D]
    bias: Tensor       # [] (0-dim)
    n_train: int = 0   # replies it was fitted on
    last_reply_id: int = 0   # the newest of them: later replies are its held-out test

    @classmethod
    def fit(cls, x: Tensor, target: Tensor, weight: Tensor, l2: float = 1.0, steps: int = 100,
            last_reply_id: int = 0) -> "RewardModel":
        """Fit on replies ``x`` [N, D] with soft labels ``target`` [N] (the share of 👍, from
        the reply's reward) and per-reply ``weight`` [N] (how many votes it carries, capped).

        Minimises the weighted mean cross-entropy + l2/2 · ‖w‖² with L-BFGS."""
        x, target, weight = x.float(), target.float(), weight.float()
        mean, scale = x.mean(0), x.std(0, correction=0) + 1e-4
        z = (x - mean) / scale                                             # [N, D]
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")
        wsum = weight.sum().clamp(min=1e-6)

        def closure():
            opt.zero_grad()
            ce = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target, reduction="none")
            loss = (ce * weight).sum() / wsum + 0.5 * l2 * (w * w).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(mean, scale, w.detach(), b.detach(), n_train=len(x), last_reply_id=last_reply_id)

    def predict(self, x: Tensor) -> Tensor:
        """[N, D] → P(👍) [N]."""
        return torch.sigmoid(((x.float() - self.mean) / self.scale) @ self.weight + self.bias)

    def state(self) -> dict[str, Tensor]:
        return {"mean": self.mean.contiguous(), "scale": self.scale.contiguous(),
                "weight": self.weight.contiguous(), "bias": self.bias.reshape(1).contiguous(),
                "n_train": torch.tensor([self.n_train]), "last_reply_id": torch.tensor([self.last_reply_id])}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> "RewardModel":
        need = {"mean", "scale", "weight", "bias"}
        if not need <= set(state):
            raise ValueError(f"a reward model needs tensors {sorted(need)}, got {sorted(state)}")
        d = state["weight"].shape
        if state["mean"].shape != d or state["scale"].shape != d or len(d) != 1:
            raise ValueError("reward model tensors have mismatched shapes")
        if not all(bool(torch.isfinite(t).all()) for t in state.values()):
            raise ValueError("reward model tensors hold NaN/inf")
        count = lambda key: int(state[key][0]) if key in state else 0   # noqa: E731
        return cls(state["mean"], state["scale"], state["weight"], state["bias"].reshape(()), count("n_train"),
                   count("last_reply_id"))


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve: the chance a liked reply scores above a disliked one (ties ½);
    None without both kinds."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def as_example(r: ReplyRecord) -> Example:
    """A stored reply in the layout the feature pass batches (no advantage: not trained on)."""
    return Example(reply_id=r.id, prompt_ids=list(r.prompt_ids), output_ids=list(r.output_ids),
                   behaviour_logp=list(r.logprobs), temperature=float(r.temperature), reward=float(r.reward or 0.0))


def fit_on_votes(cache: FeatureCache, replies: Sequence[ReplyRecord], previous: RewardModel | None,
                 l2: float, weights: dict | None = None) -> tuple[RewardModel | None, dict]:
    """Fit a reward model on every rated reply in ``replies`` (target: the share of 👍 its
    reward means; weight: its number of voters). ``weights``: reply id →
    ``trainer.influence.Weighted``, the per-user capped reward and weight to use instead
    (the weight then counts effective voters). Before that, the ``previous`` model is
    tested on the replies it never saw (ids after its ``last_reply_id``): that held-out
    AUC and accuracy are the honest measure of how well it predicts votes.

    Returns (the model, or None when the votes are all liked or all disliked; a report)."""
    from trainer.influence import Weighted

    rated = [r for r in replies if not usable(r) and (weights is None or r.id in weights)]
    w = weights or {r.id: Weighted(float(r.reward), 1.0) for r in rated}
    report: dict = {"rm_replies": len(rated), "rm_votes": sum(r.n_voters for r in rated)}
    if previous is not None:
        new = [r for r in rated if r.id > previous.last_reply_id and r.reward != 0]
        if new:
            p = previous.predict(cache.of([as_example(r) for r in new])).tolist()
            liked = [r.reward > 0 for r in new]
            report.update(rm_heldout=len(new), rm_heldout_auc=auc(p, liked),
                          rm_heldout_accuracy=sum((q > 0.5) == y for q, y in zip(p, liked)) / len(new))
    liked = [w[r.id].reward > 0 for r in rated]
    if len(set(liked)) < 2:
        report["rm_skipped"] = "the votes so far are all liked or all disliked"
        return None, report
    x = cache.of([as_example(r) for r in rated])
    if not bool(torch.isfinite(x).all()):
        from trainer.learner import NonFinite

        raise NonFinite("the reward model's features are nan/inf (is the base model broken?)")
    target = torch.tensor([(w[r.id].reward + 1.0) / 2.0 for r in rated])
    weight = torch.tensor([r.n_voters * w[r.id].weight for r in rated])     # effective voters
    model = RewardModel.fit(x, target, weight, l2=l2, last_reply_id=max(r.id for r in rated))
    report["rm_train_auc"] = auc(model.predict(x).tolist(), liked)
    report["rm_cv_auc"] = cross_validated_auc(x, target, weight, liked, l2)
    return model, report


def cross_validated_auc(x: Tensor, target: Tensor, weight: Tensor, liked: Sequence[bool], l2: float,
                        folds: int = 5) -> float | None:
    """AUC of out-of-fold predictions (each reply scored by a model fitted without its fold),
    pooled into one AUC so that a rare taste's few liked replies all count. How much the
    reward model can be trusted, before it has held-out votes.

    The folds are stratified (liked and disliked replies dealt out to the folds in turn):
    with plain folds, a fold that happens to hold more of the few liked replies is scored by
    a model that saw fewer of them, so the pooled AUC reads below chance (0.26-0.40 on the
    first rounds of a 3% taste)."""
    n = len(x)
    if n < folds:
        return None
    fold = torch.zeros(n, dtype=torch.long)
    for group in (True, False):
        idx = [i for i, y in enumerate(liked) if y == group]
        for k, i in enumerate(idx):
            fold[i] = k % folds
    scores = torch.zeros(n)
    for f in range(folds):
        test = fold == f
        m = RewardModel.fit(x[~test], target[~test], weight[~test], l2=l2)
        scores[test] = m.predict(x[test])
    return auc(scores.tolist(), liked)


def trust(cv_auc: float | None) -> float:
    """How far to follow the reward model, from its cross-validated AUC: 0 at AUC ≤ 0.5
    (it cannot tell liked from disliked: votes at random, or too few), rising linearly to
    1 at AUC ≥ 0.75."""
    if cv_auc is None:
        return 0.0
    return max(0.0, min(1.0, (cv_auc - 0.5) / 0.25))
