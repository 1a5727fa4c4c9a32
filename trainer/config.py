"""The trainer's hyper-parameters: the ``[trainer]`` table of the same TOML file.

    tcfg = load_trainer_config(cfg)      # build from cfg.trainer, then validate()

Every field has help text (``metadata["help"]``) like the bot's settings, and every numeric
field its valid range (``setting(600.0, "...", ge=0.1, le=604800)``). Defaults are
sized for SmolLM2-135M on 2 CPU cores: a round over 32 rated replies of ~60 tokens takes
about 2 minutes (bench/round_time.py), a LoRA version is ~3.7 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.config import Config, ConfigError, build, check_ranges, setting
from bot.store import MAX_EXPLORE_PROMPTS

BASELINES = ("mean", "mean_std", "none")
KL_ESTIMATORS = ("full", "k3")


@dataclass
class TrainerConfig:
    # -- when to train ----------------------------------------------------------
    interval_seconds: float = setting(600.0, "How often the trainer considers a scheduled round (train requests "
                                      "are picked up at once, whatever this says).",
                                      ge=0.1, le=604800)
    min_new_ratings: int = setting(16, "A scheduled round runs only when at least this many settled rated replies "
                                   "arrived since the last published round.",
                                   ge=2, le=100000, hint="one reply carries no signal against a mean baseline")
    settle_seconds: float = setting(600.0, "A reply's votes count as settled this long after the reply was sent "
                                    "(people react late). Retrain requests ignore it and use every rated reply.",
                                    ge=0, le=604800)
    window: int = setting(256, "Most rated replies one round learns from (the newest ones; earlier rounds' replies "
                          "may be reused, importance ratios and clipping keep that safe).",
                          ge=2, le=100000)
    max_user_share: float = setting(0.2, "No one steers a round alone: one person's votes carry at most this share "
                                    "of a round's vote weight (and of the reward model's), so a round needs at "
                                    "least 1 / share distinct voters (5 for 0.2) or is skipped. The console "
                                    "playground is exempt. 1 turns the cap off.",
                                    gt=0, le=1, hint="0.2 means at least five people shape a round, 1 turns the cap off")
    # -- the update -------------------------------------------------------------
    baseline: str = setting("mean", 'Advantage = reward - baseline: "mean" (batch mean), "mean_std" (also divide '
                            'by the std, GRPO-style) or "none".')
    punish_degenerate: bool = setting(True, "Learn from a degenerate reply (5+ emoji/symbol characters, or repeated "
                                      "word 3-grams over max_repetition) as if it were disliked (reward -1), "
                                      "whatever its votes, so the model never learns that spam pleases.")
    lr: float = setting(2e-4, "AdamW learning rate.", gt=0, le=0.01, hint="1e-4 to 5e-4 suits LoRA")
    weight_decay: float = setting(0.0, "AdamW weight decay.", ge=0, le=1)
    epochs: int = setting(2, "Passes over the round's replies.", ge=1, le=1000)
    minibatch_size: int = setting(8, "Replies per optimizer step.", ge=1, le=1024)
    clip_eps: float = setting(0.2, "PPO clip range: the ratio new/behaviour policy is clipped to 1 ± clip_eps.",
                              gt=0, lt=1, hint="0.2 is usual")
    is_cap: float = setting(2.0, "Truncated importance sampling: each token's off-policy weight "
                            "p_trainer/p_serving (the int8 serving engine's numbers differ from the fp32 "
                            "trainer's) is capped at this value (>= 1; 2 as in the TIS literature).",
                            ge=1, le=100, hint="2 is usual")
    kl_coef: float = setting(0.05, "Weight of the KL(policy ‖ reference) penalty per token; the reference is the "
                             "base model (adapter off).",
                             ge=0, le=100)
    kl_target_share: float = setting(0.7, "A round's KL budget, as a share of max_kl: while the training replies' "
                                     "KL to the base is over kl_target_share × max_kl, the KL penalty's weight "
                                     "grows step by step (and falls back to kl_coef once it is under; "
                                     "trainer/kl_control.py), to keep the candidate under the gate. 0 turns it "
                                     "off (so do kl_coef = 0 and kl_estimator = \"k3\").",
                                     ge=0, le=10, hint="0 turns the control off; under 1 leaves the gate a margin")
    kl_estimator: str = setting("full", 'How the KL penalty is computed at each reply position: "full" (exact, '
                                "summed over the vocabulary: no heavy tail, what the gate measures) or \"k3\" (the "
                                "sampled-token estimate: less memory, but heavy-tailed once the policy has moved "
                                "away from the one that wrote the replies).")
    keep_optimizer: bool = setting(False, "Carry AdamW's moments from version to version (optimizer.safetensors "
                                   "beside a LoRA adapter) instead of a fresh optimizer each round. Off: in the "
                                   "simulations it made the KL to the base grow faster (docs/LEARNING.md).")
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this global norm before each step.", gt=0, le=1000)
    # -- more signal per vote (trainer/reward_model.py, trainer/explore.py) -----------
    reward_model: bool = setting(True, "Each round, fit a reward model P(👍 | conversation, reply) on every vote so "
                                 "far (a logistic head on the frozen base model's features), sample explore_samples "
                                 "replies for each of the explore_prompts newest prompts from the active version, "
                                 "score them with it and learn from them too (RLOO advantages). Off: learn from the "
                                 "voted replies only.")
    explore_prompts: int = setting(8, "Newest distinct prompts the trainer samples its own replies for each round "
                                   f"(at most {MAX_EXPLORE_PROMPTS}: the bot's retention keeps the newest replies "
                                   "they are read from).",
                                   ge=1, le=MAX_EXPLORE_PROMPTS, hint="turn exploration off with reward_model = false")
    explore_samples: int = setting(4, "Replies sampled per explored prompt (k >= 2: each is compared with the mean "
                                   "of the other k - 1).",
                                   ge=2, le=64)
    reward_model_l2: float = setting(1.0, "L2 penalty of the reward model's head (on standardised features).",
                                     gt=0, le=1000000)
    reward_model_window: int = setting(4096, "Most rated replies (the newest) the reward model is fitted on.",
                                       ge=2, le=1000000)
    # -- what is trained ----------------------------------------------------------
    full_finetune: bool = setting(False, "Train every weight instead of a LoRA adapter (versions are then the "
                                  "size of the model, and the KL reference is a second copy of the base).")
    lora_rank: int = setting(8, "LoRA rank r.", ge=1, le=1024)
    lora_alpha: int = setting(16, "LoRA alpha (the update is scaled by alpha / r).", ge=1, le=4096)
    lora_dropout: float = setting(0.0, "LoRA dropout. 0 keeps the recomputed logprobs exactly the sampled ones "
                                  "before the first step (ratio 1), which the importance ratio relies on.",
                                  ge=0, lt=1)
    target_modules: list = setting(["q_proj", "k_proj", "v_proj", "o_proj"],
                                   "Module names that get LoRA adapters (Llama/SmolLM names by default).")
    # -- gates ------------------------------------------------------------------
    max_kl: float = setting(0.1, "Gate: mean per-token KL(candidate ‖ base) on the probe prompts, in nats, "
                            "must stay at or below this.",
                            gt=0, le=100)
    max_repetition: float = setting(0.5, "Gate: mean share of repeated word 3-grams in the probe replies must "
                                    "stay at or below this (catches degenerate loops).",
                                    gt=0, le=1)
    max_empty_share: float = setting(0.25, "Gate: at most this share of probe replies may be empty.", ge=0, le=1)
    max_spam_share: float = setting(0.125, "Gate: at most this share of probe replies may hold 5+ emoji/symbol "
                                    "characters (0.125 = one of the 8 probes).",
                                    ge=0, le=1)
    max_nll_increase: float = setting(0.5, "Gate: the base model's NLL per token of the candidate's probe replies "
                                      "may exceed its NLL of its own probe replies by at most this many nats "
                                      "(the candidate must not talk in ways the base finds unlikely). 8 probes are "
                                      "noisy: a candidate 0.002 nat/token from the base measured +0.15, and 0.3 "
                                      "rejected a round of the '!' simulation (docs/LEARNING.md).",
                                      gt=0, le=100)
    min_length_ratio: float = setting(0.5, "Gate: the candidate's probe replies must average at least this share "
                                      "of the base model's probe replies' length in words.",
                                      ge=0, le=1, hint="0 turns the check off")
    probe_max_new_tokens: int = setting(48, "Tokens sampled per probe prompt for the gates.", ge=1, le=1024)
    # -- auto-rollback (trainer/rollback.py) ---------------------------------------
    auto_rollback: bool = setting(True, "Roll the active version back to its parent when people like it "
                                  "significantly less (one-sided two-proportion z-test on the share of liked "
                                  "rated replies each version got while it served).")
    rollback_min_rated: int = setting(30, "The test runs only when both versions have at least this many rated "
                                      "replies.",
                                      ge=2, le=1000000)
    rollback_p: float = setting(0.05, "Roll back when the test's p-value is below this.",
                                gt=0, lt=1, hint="0.05 is usual")
    # -- housekeeping -------------------------------------------------------------
    keep_versions: int = setting(5, "Published version folders kept on disk (the active one and its parent are "
                                 "always kept).",
                                 ge=2, le=10000, hint="the active version and one to roll back to")
    heartbeat_seconds: float = setting(10.0, "How often the trainer writes its heartbeat (shown by /status), "
                                       "also during a round.",
                                       ge=0.1, le=3600)
    seed: int = setting(0, "Random seed for shuffling, LoRA init and probe sampling (rounds are reproducible).",
                        ge=0, le=4294967295)
    threads: int = setting(0, "torch CPU threads for training; 0 keeps torch's default.", ge=0, le=256)

    def validate(self) -> "TrainerConfig":
        """Checks beyond types: every declared range (``setting(..., ge=, le=)``), then the choices.
        Raises ConfigError naming the key, the value and the fix."""
        def check(ok: bool, key: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"'trainer.{key}': {fix} (got {getattr(self, key)!r})")

        check_ranges(self, "trainer")
        check(self.baseline in BASELINES, "baseline", f"use one of {list(BASELINES)}.")
        check(self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"use one of {list(KL_ESTIMATORS)}.")
        check(bool(self.target_modules) and all(isinstance(m, str) and m for m in self.target_modules),
              "target_modules", 'must be a non-empty list of module names, e.g. ["q_proj", "v_proj"].')
        return self


def load_trainer_config(cfg: Config) -> TrainerConfig:
    """The validated trainer settings from ``cfg.trainer`` (the [trainer] table)."""
    return build(TrainerConfig, cfg.trainer, "trainer").validate()
