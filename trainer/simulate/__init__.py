"""Simulated people with a hidden taste: the end-to-end proof that the bot learns.

    python -m trainer.simulate [--taste short] [--rounds 10] [--replies 32] [--voters 5] [--flip 0.1]
                               [--vote-rate 0.5 --crowd 20 --dissent 0.1 --late 0.2] [--taste-after 6:TASTE]
                               [--lr 2e-4 --kl-coef 0.05 --epochs 2 ...] [--out sim_out]

Everything real except the people: the chat core (``ChatCore.on_message`` with a send
function that returns a fake platform message id, ``ChatCore.on_reaction`` for votes),
the policy (``Policy.from_config``), the store (a temp SQLite file, or ``--data-dir``),
the trainer round (``run_round``) and the hot-swap (``ChatCore.sync_version``).

A round:
  1. ``--replies`` prompts from trainer/prompts.txt (seeded sample) are sent to the bot
     at once; the policy generates them as one batch (serving.batch_size = N).
  2. Dense votes: each reply gets ``--voters`` simulated users (distinct ids). Each votes 👍
     when the taste likes the reply and 👎 otherwise, flipped with probability ``--flip``.
     Sparse votes (``--vote-rate R``, as in a real channel): each reply gets one vote with
     probability R, from one person drawn from a crowd of ``--crowd`` people; ``--dissent``
     of the crowd vote by a random taste of their own; ``--late`` of the votes arrive only
     at the next round (after that round's replies were trained on). Votes are platform
     reactions on the reply's fake message id, through the chat core.
  3. One training round over the newest ``window`` rated replies, as the product trains
     (``--train-on all``, the default), or this round's replies only (``--train-on round``,
     which the dense runs before the sparse-votes work used); then the bot hot-swaps.
Evaluation: before round 1 the base model also answers ``--eval-extra`` more prompts
(unvoted); after the last round the last version answers round 1's prompts and those
again (votes, no training), so base and last version compare on the same prompts
(``eval`` in the JSON): one 32-reply round alone moves by about ±0.08 by chance.

Tastes (``--taste``):
  short                    the reply has 1-19 words (an empty reply is not a reply)
  coin                     the random-votes control: a fair coin per reply (nothing to learn)
  regex:PATTERN            re.search(PATTERN, reply, re.IGNORECASE)
  python:module:function   function(text) -> bool, or a float in [-1, 1]: each voter then
                           votes 👍 with probability (1 + v) / 2; the reply counts as liked
                           when v > 0.
``--taste-after ROUND:TASTE`` changes the taste from round ROUND on (the bot must follow);
the evaluation then judges both base and last version by the new taste.

Per round it prints and saves (``--out``/simulate.json, rewritten after every round): the
like-rate (share of replies the taste likes, before any flip: the honest measure), the mean
reward (noisy votes, as the store aggregates them), the probe KL to the base model (gate
report), mean reply length in words, the version serving, seconds. At the end it draws
``--out``/learning_curve.png (like-rate and KL against training rounds done) and prints a
few before/after replies.
"""

from __future__ import annotations

from bot import process

process.quiet_threads()      # before torch loads (bot/process.py says why)

# One job per module: tastes (the hidden preference), cli (flags and configs), people (prompts,
# asking, voting), metrics (what replies measure), report (printing, JSON, plot), runner (run and
# main). The public names are re-exported: ``from trainer import simulate; simulate.main([...])``.
from .tastes import Taste, parse_taste, word_count  # noqa: E402
from .cli import build_parser, make_configs  # noqa: E402
from .people import load_prompts, sample_prompts  # noqa: E402
from .metrics import measure, reply_stats  # noqa: E402
from .report import plot, print_summary, write_json  # noqa: E402
from .runner import main, run  # noqa: E402

__all__ = ["Taste", "parse_taste", "word_count", "build_parser", "make_configs", "load_prompts", "sample_prompts",
           "measure", "reply_stats", "plot", "print_summary", "write_json", "main", "run"]
