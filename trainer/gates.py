"""Checks a candidate must pass before it is published.

The candidate answers a few fixed everyday prompts (the probes) with the serving
settings: same system prompt and chat template as the bot, same temperature and top-p.
Then:

- KL: the mean per-token KL(candidate ‖ reference) along the candidate's own sampled
  tokens, computed exactly over the whole vocabulary at each position (no estimator):
  sum_v p_c(v) (log p_c(v) - log p_r(v)) with both distributions tempered by the serving
  temperature (top-p truncation is ignored). Reference = the same model with the
  adapter off, i.e. the base model (for a full fine-tune, the cached base copy).
- fluency: the base model's NLL per token of the candidate's probe replies may exceed the
  base model's NLL of its own probe replies (same prompts and seed, sampled once and cached
  by the learner: ``ProbeBaseline``) by at most ``max_nll_increase``, and the candidate's
  replies must keep at least ``min_length_ratio`` of the base's mean length in words;
- no degenerate output: at most ``max_empty_share`` of the replies empty, at most
  ``max_spam_share`` emoji/symbol spam, and the mean share of repeated word 3-grams at
  most ``max_repetition`` (trainer/fluency.py);
- the training loss was finite.

A GateReport says which check failed, with the numbers, in words a person can act on.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from bot.torch_engine import left_pad
from trainer.data import Example, collate, reply_logits, tempered
from trainer.fluency import repetition, symbol_spam
from trainer.loss import full_kl

PROBES = [
    "Hi! How are you doing today?",
    "Can you recommend a good book for a rainy weekend?",
    "What's a quick and healthy breakfast idea?",
    "I'm feeling a bit stressed about work. Any advice?",
    "Tell me a fun fact about space.",
    "How do I make a good cup of coffee at home?",
    "What should I name my new cat?",
    "Thanks for the help earlier!",
]


class Interrupted(Exception):
    """The stop event was set; the round publishes nothing."""


@dataclass
class ProbeBaseline:
    """The base model's own probe replies: their base-model NLL per token and mean words."""

    nll: float
    words: float


@dataclass
class GateReport:
    passed: bool
    reason: str                 # '' when passed; otherwise e.g. "KL 0.91 > 0.1"
    kl: float
    repetition: float
    empty_share: float = 0.0
    spam_share: float = 0.0
    samples: list[str] = field(default_factory=list)
    nll: float | None = None            # base-model NLL per token of the candidate's probe replies
    words: float | None = None          # their mean length in words
    baseline: ProbeBaseline | None = None

    def as_metrics(self) -> dict:
        base = self.baseline
        return {"probe_kl": self.kl, "probe_repetition": self.repetition, "probe_empty_share": self.empty_share,
                "probe_spam_share": self.spam_share, "probe_nll": self.nll, "probe_words": self.words,
                "probe_base_nll": base.nll if base else None, "probe_base_words": base.words if base else None,
                "probe_samples": self.samples}


def render_prompt(tokenizer, system_prompt: str, text: str) -> list[int]:
    """Token ids of a one-message conversation, rendered exactly as bot.policy.Policy._render
    renders it (system message first when set, then the user turn, generation prompt)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": text})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


class _StopOnEvent(StoppingCriteria):
    def __init__(self, stop: threading.Event | None):
        self.stop = stop

    def __call__(self, input_ids, scores, **kwargs):
        done = bool(self.stop is not None and self.stop.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool)


@torch.no_grad()
def sample_probes(model, tokenizer, prompts: list[list[int]], *, temperature: float, top_p: float,
                  max_new_tokens: int, seed: int, stop: threading.Event | None = None):
    """Sample one reply per prompt. Returns (input_ids, attention, prompt_width, replies) where
    replies[i] is the sampled ids up to and including the end-of-turn token."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    input_ids, attention = left_pad(prompts, pad)
    width = input_ids.shape[1]
    gen = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                           max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=eos)
    with torch.random.fork_rng(devices=[]):   # seeded probes without resetting the process's RNG
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen,
                             stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]))
    if stop is not None and stop.is_set():
        raise Interrupted("stopped while sampling probe replies")
    replies = []
    for row in out[:, width:].tolist():
        n = row.index(eos) + 1 if eos in row else len(row)
        replies.append(row[:n])
    return replies


def _token_dists(model, prompts: list[list[int]], replies: list[list[int]], temperature: float, pad: int):
    """log p(· | prefix) over the vocabulary at each reply position: [B, T, V], and the mask [B, T]."""
    examples = [Example(0, p, r or [pad], [0.0] * max(1, len(r)), temperature, 0.0) for p, r in zip(prompts, replies)]
    batch = collate(examples, pad)
    for i, r in enumerate(replies):
        if not r:
            batch.mask[i] = 0.0
    logp = torch.log_softmax(tempered(reply_logits(model, batch), batch.temperature), dim=-1)   # [B, T, V]
    return logp, batch.mask


def _reference_dists(candidate, reference, prompts, replies, temperature: float, pad: int):
    """``_token_dists`` of the reference: ``reference``, or ``candidate`` with its adapter off."""
    if reference is None:
        with candidate.disable_adapter():
            return _token_dists(candidate, prompts, replies, temperature, pad)
    return _token_dists(reference, prompts, replies, temperature, pad)


def _nll(logp: torch.Tensor, mask: torch.Tensor, replies: list[list[int]], pad: int) -> float:
    """Mean negative log-likelihood per reply token of ``replies`` under ``logp`` [B, T, V]."""
    targets = torch.tensor([r + [pad] * (logp.shape[1] - len(r)) if r else [pad] * logp.shape[1] for r in replies])
    picked = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)                # [B, T]
    return float(-(picked * mask).sum() / mask.sum().clamp(min=1.0))


@torch.no_grad()
def probe_kl(candidate, reference, prompts, replies, temperature: float, pad: int) -> tuple[float, float]:
    """(mean over reply tokens of the exact KL(candidate ‖ reference) at that position, the
    reference's NLL per token of the replies).

    ``reference`` is a module, or None to run ``candidate`` with its adapter disabled."""
    if not any(replies):
        return 0.0, 0.0
    logp_c, mask = _token_dists(candidate, prompts, replies, temperature, pad)
    logp_r, _ = _reference_dists(candidate, reference, prompts, replies, temperature, pad)
    kl = full_kl(logp_c, logp_r)                                               # [B, T]
    return float((kl * mask).sum() / mask.sum().clamp(min=1.0)), _nll(logp_r, mask, replies, pad)


def _words(tokenizer, replies: list[list[int]]) -> tuple[list[str], float]:
    texts = [tokenizer.decode(r, skip_special_tokens=True).strip() for r in replies]
    return texts, sum(len(t.split()) for t in texts) / max(1, len(texts))


@torch.no_grad()
def probe_baseline(candidate, reference, tokenizer, *, system_prompt: str, temperature: float, top_p: float,
                   tcfg, stop: threading.Event | None = None) -> ProbeBaseline:
    """The base model's own probe replies (the reference; for LoRA the candidate with its
    adapter off): their NLL per token under the base and their mean words."""
    prompts = [render_prompt(tokenizer, system_prompt, p) for p in PROBES]
    model = reference if reference is not None else candidate
    was_training = model.training
    model.eval()
    try:
        with candidate.disable_adapter() if reference is None else contextlib.nullcontext():
            replies = sample_probes(model, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                    max_new_tokens=tcfg.probe_max_new_tokens, seed=tcfg.seed, stop=stop)
            logp, mask = _token_dists(model, prompts, replies, temperature, tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    return ProbeBaseline(_nll(logp, mask, replies, tokenizer.pad_token_id), _words(tokenizer, replies)[1])



def run_gates(candidate, reference, tokenizer, *, system_prompt: str, temperature: float, top_p: float,
              tcfg, loss: float, stop: threading.Event | None = None,
              baseline: ProbeBaseline | None = None) -> GateReport:
    """Sample the probes with the candidate and check it. ``reference`` as in :func:`probe_kl`;
    ``baseline``: the base's own probe replies (:func:`probe_baseline`), for the fluency checks."""
    if not math.isfinite(loss):
        return GateReport(False, f"training loss is not finite ({loss})", float("nan"), 0.0)
    was_training = candidate.training
    candidate.eval()
    try:
        prompts = [render_prompt(tokenizer, system_prompt, p) for p in PROBES]
        replies = sample_probes(candidate, tokenizer, prompts, temperature=temperature, top_p=top_p,
                                max_new_tokens=tcfg.probe_max_new_tokens, seed=tcfg.seed, stop=stop)
        kl, nll = probe_kl(candidate, reference, prompts, replies, temperature, tokenizer.pad_token_id)
    finally:
        candidate.train(was_training)
    texts, words = _words(tokenizer, replies)
    return judge(texts, kl, tcfg, nll=nll, words=words, baseline=baseline)


def _above(x: float, bound: float) -> str:
    """``x`` with the fewest significant digits (2 or more) that still show it is over ``bound``:
    0.9 → "0.9", 0.10024 over 0.1 → "0.1002" (not "0.1 > 0.1")."""
    for digits in (2, 3, 4, 6):
        text = f"{x:.{digits}g}"
        if float(text) > bound:
            return text
    return repr(x)


def judge(texts: list[str], kl: float, tcfg, *, nll: float | None = None, words: float | None = None,
          baseline: ProbeBaseline | None = None) -> GateReport:
    """The verdict on the candidate's probe replies ``texts``, its probe KL and (with a
    ``baseline``) its fluency, first failure first."""
    rep = sum(repetition(t) for t in texts) / len(texts)
    empty = sum(1 for t in texts if not t) / len(texts)
    spam = sum(1 for t in texts if symbol_spam(t)) / len(texts)
    report = GateReport(True, "", kl, rep, empty, spam, texts, nll=nll, words=words, baseline=baseline)
    fluency = _fluency_failure(nll, words, baseline, tcfg)
    if not math.isfinite(kl):
        report.passed, report.reason = False, f"probe KL is not finite ({kl})"
    elif kl > tcfg.max_kl:
        report.passed, report.reason = False, f"KL {_above(kl, tcfg.max_kl)} > {tcfg.max_kl:g}"
    elif empty > tcfg.max_empty_share:
        report.passed, report.reason = False, f"{empty:.0%} of probe replies empty > {tcfg.max_empty_share:.0%}"
    elif spam > tcfg.max_spam_share:
        report.passed, report.reason = False, f"{spam:.0%} of probe replies are emoji spam > {tcfg.max_spam_share:.0%}"
    elif rep > tcfg.max_repetition:
        report.passed, report.reason = False, f"repetition {rep:.2f} > {tcfg.max_repetition:g}"
    elif fluency:
        report.passed, report.reason = False, fluency
    return report


def _fluency_failure(nll: float | None, words: float | None, baseline: ProbeBaseline | None, tcfg) -> str:
    """Why the candidate talks worse than the base on the probes ('' when it does not)."""
    if baseline is None or nll is None or words is None:
        return ""
    if nll - baseline.nll > tcfg.max_nll_increase:
        return (f"base-model NLL of the probe replies {nll:.2f} is {nll - baseline.nll:.2f} nats/token above the "
                f"base's own {baseline.nll:.2f} (> {tcfg.max_nll_increase:g})")
    if words < tcfg.min_length_ratio * baseline.words:
        return (f"probe replies average {words:.1f} words, under {tcfg.min_length_ratio:.0%} of the base's "
                f"{baseline.words:.1f}")
    return ""
