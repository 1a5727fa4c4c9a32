"""Shared fixtures: a real SQLite file, a tiny real model, the real chat core."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import pytest_asyncio

from bot.chat import ChatCore
from bot.config import Config, build
from bot.policy import Policy
from bot.store import Store
from tests.tiny_model import build_endless_model, build_tiny_model
from tests.trainer_helpers import store_for  # noqa: F401  (a fixture: await store_for(cfg))


# The fake platforms' secrets: they must never reach a log, at any level, on any path.
SECRETS = ("fake-bot-token", "xoxb-fake-bot", "xapp-fake-app", "fake-verification-token")
LOGGERS = ("bot", "trainer", "discord", "slack_bolt", "slack_sdk", "aiohttp")


@pytest.fixture(autouse=True)
def no_secrets_in_logs(request, caplog):
    """Every test runs with the project's and the chat SDKs' loggers at DEBUG; afterwards the
    captured records, and any log file the test's bot wrote under its tmp_path, are searched
    for the fake tokens."""
    for name in LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    fmt = logging.Formatter()
    records = [r for phase in ("setup", "call") for r in caplog.get_records(phase)]
    texts = [("captured log", "\n".join(fmt.format(r) for r in records))]
    if tmp is not None:
        texts += [(str(p), p.read_text(errors="replace")) for p in Path(tmp).rglob("*.log") if p.is_file()]
    leaks = [(where, secret) for where, text in texts for secret in SECRETS if secret in text]
    assert not leaks, f"secrets in logs: {leaks}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def endless_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model that never ends a reply early: every reply runs to max_new_tokens."""
    return build_endless_model(tmp_path_factory.mktemp("models") / "endless", tiny_model_dir)


# Streamed-reply tests: 300 tokens on the reference torch engine take a few tenths of a second
# on a CPU, so a reply is still being written across several pacing intervals of 0.1-0.15 s.
STREAMING = {"sampling": {"max_new_tokens": 300, "temperature": 1.5}, "serving": {"engine": "torch"}}


def make_config(tmp_path: Path, model_dir: Path, **sections) -> Config:
    """A Config for tests: temp data dir, the tiny model, short replies; override per section."""
    data = {"data_dir": str(tmp_path / "data"),
            "model": {"name": str(model_dir), "max_context_tokens": 256, "system_prompt": "Be brief."},
            "sampling": {"max_new_tokens": 12},
            "serving": {"poll_seconds": 0.2}}
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return build(Config, data)


@pytest.fixture
def cfg(tmp_path, tiny_model_dir) -> Config:
    return make_config(tmp_path, tiny_model_dir)


@pytest_asyncio.fixture
async def store(cfg):
    s = await Store.open(cfg.db_path)
    yield s
    await s.close()


@pytest.fixture(scope="session")
def shared_policy(tiny_model_dir, tmp_path_factory):
    """One tiny policy for tests that only generate (loading is cheap, but threads add up)."""
    cfg = make_config(tmp_path_factory.mktemp("p"), tiny_model_dir)
    p = Policy.from_config(cfg)
    yield p
    p.close()


@pytest_asyncio.fixture
async def policy(cfg):
    p = Policy.from_config(cfg)
    yield p
    p.close()


@pytest_asyncio.fixture
async def core(cfg, store, policy):
    return ChatCore(cfg, store, policy)
