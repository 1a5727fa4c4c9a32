"""Shared pieces for the trainer tests: a config on the tiny model, rated replies, logprobs.

The tiny model itself comes from the ``tiny_model_dir`` fixture in tests/conftest.py."""

from __future__ import annotations

from pathlib import Path

import pytest_asyncio
import torch

from bot.config import Config, build, validate
from bot.store import Store
from trainer.config import TrainerConfig, load_trainer_config
from trainer.gates import render_prompt

# Small and quick, and gates loose enough for a random model (tests that check gates set their own).
FAST_TRAINER = {
    "epochs": 4, "minibatch_size": 8, "lr": 5e-3, "lora_rank": 4, "lora_alpha": 8,
    "probe_max_new_tokens": 8, "max_kl": 50.0, "max_repetition": 1.0, "max_empty_share": 1.0, "max_spam_share": 1.0,
    "settle_seconds": 0.0, "heartbeat_seconds": 0.2, "interval_seconds": 0.5, "min_new_ratings": 2,
}


def tiny_config(tmp_path: Path, model_dir: Path, trainer: dict | None = None, **sections) -> Config:
    data = {
        "data_dir": str(tmp_path / "data"),
        "model": {"name": str(model_dir), "system_prompt": "Be brief.", "max_context_tokens": 64},
        "sampling": {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 12},
        "serving": {"poll_seconds": 0.05},
        "trainer": {**FAST_TRAINER, **(trainer or {})},
        **sections,
    }
    return validate(build(Config, data))


def trainer_config(cfg: Config) -> TrainerConfig:
    return load_trainer_config(cfg)


def toml_text(cfg: Config) -> str:
    """The config as a TOML file (for the trainer subprocess)."""
    def val(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return repr(v)

    lines = [f"data_dir = {val(cfg.data_dir)}", "", "[model]"]
    lines += [f"{k} = {val(getattr(cfg.model, k))}" for k in ("name", "system_prompt", "max_context_tokens")]
    lines += ["", "[sampling]"] + [f"{k} = {val(getattr(cfg.sampling, k))}" for k in
                                   ("temperature", "top_p", "max_new_tokens")]
    lines += ["", "[trainer]"] + [f"{k} = {val(v)}" for k, v in cfg.trainer.items()]
    return "\n".join(lines) + "\n"


def prompt_ids(tokenizer, text: str, system_prompt: str = "Be brief.") -> list[int]:
    return render_prompt(tokenizer, system_prompt, text)


@torch.no_grad()
def token_logps(model, prompt: list[int], output: list[int], temperature: float = 0.8) -> list[float]:
    """log p(output token | prefix) at ``temperature``, one per output token (a plain forward pass)."""
    ids = torch.tensor([prompt + output])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / temperature   # [T, V]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(output).unsqueeze(-1)).squeeze(-1).tolist()


def seq_logprob(model, prompt: list[int], output: list[int], temperature: float = 0.8) -> float:
    return float(sum(token_logps(model, prompt, output, temperature)))


async def add_rated(store: Store, prompt: list[int], output: list[int], logprobs: list[float], reward: float,
                    *, temperature: float = 0.8, version: int = 0, voter: str = "u1",
                    created_at: float | None = None, text: str = "x") -> int:
    """One recorded reply with one vote (+1 → 👍, -1 → 👎)."""
    rid = await store.add_reply("console", "c", None, version, text, prompt, output, logprobs, temperature, 0.95,
                                len(output), created_at=created_at)
    await store.set_vote(rid, voter, "\N{THUMBS UP SIGN}" if reward > 0 else "\N{THUMBS DOWN SIGN}", reward)
    return rid


async def seed_rated(store: Store, tokenizer, n: int, *, base=None, prompt: str = "hello there") -> list[int]:
    """``n`` rated replies in the real store, alternating: even i " no bad" 👎, odd i " yes sure" 👍
    (each output ends with EOS). Returns their reply ids.

    ``prompt`` is formatted with ``i`` ("hello there {i}" gives every reply its own prompt).
    The recorded behaviour logprobs are ``base``'s (a plain forward pass at 0.8, as the bot
    would have sampled them), or -1.0 per token without a model."""
    ids = []
    for i in range(n):
        liked = i % 2 == 1
        p = prompt_ids(tokenizer, prompt.format(i=i))
        out = tokenizer.encode(" yes sure" if liked else " no bad", add_special_tokens=False) + [tokenizer.eos_token_id]
        logps = token_logps(base, p, out) if base is not None else [-1.0] * len(out)
        ids.append(await add_rated(store, p, out, logps, 1.0 if liked else -1.0))
    return ids


@pytest_asyncio.fixture
async def store_for(tmp_path):
    """Factory fixture: ``await store_for(cfg)`` opens the real SQLite store; closed at teardown."""
    opened = []

    async def open_(cfg: Config) -> Store:
        s = await Store.open(cfg.db_path)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        await s.close()


# What the console adapter puts on a playground message (bot/adapters/console.py): every line
# is addressed to the bot and one person is not rate limited. For tests that call the core as
# the console does.
CONSOLE = dict(mentions_bot=True, rate_limited=False)
