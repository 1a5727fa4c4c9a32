"""What a round's replies measure: like-rate, reward, length, spam, and the KL of the serving version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bot import versions
from bot.policy_types import VersionError
from trainer.fluency import symbol_spam

from .people import Asked
from .tastes import Taste, word_count


async def version_kl(store, version: int) -> float | None:
    if version == 0:
        return 0.0
    v = await store.get_version(version)
    return v.metrics.get("probe_kl") if v else None


async def measure(core, store, asked: list[Asked], taste: Taste) -> dict:
    replied = [a for a in asked if a.reply_id is not None]
    rewards, items = [], []
    for a in replied:
        r = await store.get_reply(a.reply_id)
        reward = r.reward if r is not None else None
        if reward is not None:
            rewards.append(reward)
        items.append({"reply_id": a.reply_id, "prompt": a.prompt, "text": a.sent_text,
                      "liked": taste.liked(a.sent_text), "reward": reward})
    n = max(1, len(replied))
    return {"replies": items,
        "n_replies": len(replied),
        "failed": len(asked) - len(replied),
        "like_rate": sum(taste.liked(a.sent_text) for a in replied) / n,
        "mean_reward": sum(rewards) / len(rewards) if rewards else None,
        "mean_words": sum(word_count(a.sent_text) for a in replied) / n,
        "symbol_spam_share": sum(symbol_spam(a.sent_text) for a in replied) / n,
    }


def _tcfg_of(version, tcfg):
    """The trainer settings that rebuild ``version`` exactly (its own adapter shape), so that
    Learner.candidate loads its weights rather than starting a fresh adapter."""
    try:
        saved = versions.read_meta(Path(version.path))["trainer"]
    except (VersionError, KeyError, TypeError):
        return tcfg
    keep = ("full_finetune", "lora_rank", "lora_alpha", "target_modules")
    return dataclasses.replace(tcfg, **{k: saved[k] for k in keep if k in saved})


def reply_shift(model, reference, examples, pad: int, chunk: int = 8, *, model_is_base: bool = False) -> dict:
    """Per reply (blocking, no grad): ``tokens``; ``kl``, the exact KL(model ‖ base) summed
    over the reply's positions (both tempered by the reply's temperature, as the gates
    compute it); ``delta_logp``, log p_model(reply) − log p_base(reply); ``base_logp``.

    ``reference`` as in :func:`trainer.data.reference_logits` (None: the model's adapter
    off); ``model_is_base``: ``model`` is the base itself (KL and delta are then 0)."""
    import torch

    from trainer.data import collate, reference_logits, reply_logits, tempered
    from trainer.loss import full_kl

    out = {"tokens": [], "kl": [], "delta_logp": [], "base_logp": []}
    with torch.no_grad():
        for i in range(0, len(examples), chunk):
            batch = collate(examples[i:i + chunk], pad)
            logp = torch.log_softmax(tempered(reply_logits(model, batch), batch.temperature), -1)   # [B, T, V]
            base = logp if model_is_base else torch.log_softmax(
                tempered(reference_logits(model, reference, batch), batch.temperature), -1)
            target = batch.targets.unsqueeze(-1)
            new_tok = logp.gather(-1, target).squeeze(-1) * batch.mask                   # [B, T]
            base_tok = base.gather(-1, target).squeeze(-1) * batch.mask
            out["tokens"] += batch.mask.sum(1).tolist()
            out["kl"] += (full_kl(logp, base) * batch.mask).sum(1).tolist()
            out["delta_logp"] += (new_tok - base_tok).sum(1).tolist()
            out["base_logp"] += base_tok.sum(1).tolist()
    return out


def reply_stats(learner, version, records, chunk: int = 8) -> dict:
    """Two numbers about replies that were really served (blocking):

    - ``served_kl``: mean per-token KL(version ‖ base) along the replies, exact over the
      vocabulary at each position, both tempered by the reply's temperature (as the gates
      compute it on their probes);
    - ``base_nll``: mean per-token negative log-likelihood of the reply tokens under the
      base model at that temperature, a fluency proxy: gibberish the base would not write
      scores high; for v0 it is the base's own cross-entropy on its samples."""
    from trainer.data import Example

    learner.load()
    base_only = version is None or version.id == 0
    if base_only:
        model, reference = learner.base, None
    else:
        cand = learner.candidate(version, seed=0, tcfg=_tcfg_of(version, learner.tcfg))
        model, reference = cand.model, cand.reference
    model.eval()
    records = [r for r in records if r is not None and r.output_ids]
    examples = [Example(r.id, r.prompt_ids, r.output_ids, r.logprobs, r.temperature, 0.0) for r in records]
    shift = reply_shift(model, reference, examples, learner.tokenizer.pad_token_id, chunk, model_is_base=base_only)
    tokens = sum(shift["tokens"])
    if not tokens:
        return {"served_kl": None, "base_nll": None}
    return {"served_kl": 0.0 if base_only else sum(shift["kl"]) / tokens, "base_nll": -sum(shift["base_logp"]) / tokens}

