"""`python -m trainer` as a real process: SIGTERM mid-round, restart, single instance."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoTokenizer

from tests.trainer_helpers import seed_rated, tiny_config, toml_text

REPO = Path(__file__).resolve().parents[1]


def start_trainer(config: Path, *args: str, log: Path) -> subprocess.Popen:
    """``python -m trainer``; its stderr (the log) goes to ``log``, read only to explain a failure
    or where the printed message is what is tested."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("REACTLEARN_CONFIG", None)
    return subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config), *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))


async def wait_for(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def exit_code(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    return await asyncio.to_thread(proc.wait, timeout)


async def test_sigterm_mid_round_publishes_nothing_and_next_start_serves_the_request(tmp_path, tiny_model_dir,
                                                                                     store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1000, "interval_seconds": 3600.0})
    config = tmp_path / "reactlearn.toml"
    config.write_text(toml_text(cfg))
    store = await store_for(cfg)
    await seed_rated(store, AutoTokenizer.from_pretrained(cfg.model.name), 16, prompt="hello there {i}")
    rid = await store.add_train_request("console", "c", "admin")
    log = tmp_path / "trainer1.log"
    proc = start_trainer(config, log=log)
    try:
        async def round_running():   # the round's row, written when it starts
            return [r["status"] for r in await store.rounds()] == ["running"]
        await wait_for(round_running, what="the round to start")
        beat = float(await store.get_state("trainer_heartbeat", "0"))

        async def beat_moved():   # heartbeats go on while the round computes
            return float(await store.get_state("trainer_heartbeat", "0")) > beat
        await wait_for(beat_moved, what="a heartbeat during the round")   # 60 s: a loaded CI box is slow, not broken
        assert (await store.train_requests())[0]["status"] == "running"
        proc.send_signal(signal.SIGTERM)
        assert await exit_code(proc) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    # a clean stop (exit code 0 above); the interrupted round published nothing and gave its request back
    assert [v.id for v in await store.versions()] == [0] and await store.active_version() == 0
    assert not cfg.versions_dir.exists() or not [p for p in cfg.versions_dir.iterdir() if p.name.startswith("v")]
    req = (await store.train_requests())[0]
    assert (req["id"], req["status"], req["result"]) == (rid, "pending", "")     # served again at the next start
    rounds = await store.rounds()
    assert len(rounds) == 1 and rounds[0]["status"] == "failed" and "interrupted" in rounds[0]["reason"]

    # a crashed publish from some earlier run left a tmp folder; the next start removes it
    stale = cfg.versions_dir / ".tmp-v0009-12345"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    cfg.trainer["epochs"] = 1
    config.write_text(toml_text(cfg))
    log2 = tmp_path / "trainer2.log"
    proc = start_trainer(config, "--once", log=log2)
    assert await exit_code(proc) == 0, log2.read_text()
    assert not stale.exists()
    req = (await store.train_requests())[0]
    assert req["status"] == "done" and req["result"].startswith("v1 published: 16 rated replies"), req
    assert await store.active_version() == 1 and (cfg.versions_dir / "v0001" / "meta.json").is_file()


async def test_second_instance_exits_with_a_clear_message(tmp_path, tiny_model_dir, store_for):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"interval_seconds": 3600.0})
    config = tmp_path / "reactlearn.toml"
    config.write_text(toml_text(cfg))
    store = await store_for(cfg)
    crashed = await store.add_train_request("console", "c", "admin")
    await store.set_request_status(crashed, "running")        # left by a trainer that died mid-round
    await store.start_round(crashed, 0)                         # ... and its round row
    first = start_trainer(config, log=tmp_path / "first.log")
    try:
        async def beating():
            return await store.get_state("trainer_heartbeat") is not None
        await wait_for(beating, what="the first trainer's heartbeat")
        second = start_trainer(config, log=tmp_path / "second.log")
        assert await exit_code(second) == 2
        message = (tmp_path / "second.log").read_text()
        assert "another trainer is already running for" in message and f"pid {first.pid}" in message
        assert "trainer.lock" in message
        assert first.poll() is None
        req = (await store.train_requests())[0]
        assert req["status"] == "failed" and "stopped unexpectedly" in req["result"]
        assert [(r["status"], r["reason"]) for r in await store.rounds()] == [
            ("failed", "the trainer stopped unexpectedly during this round")]
        first.send_signal(signal.SIGINT)
        assert await exit_code(first) == 0
    finally:
        if first.poll() is None:
            first.kill()


def test_trainer_never_loads_a_chat_sdk():
    code = ("import sys, trainer.__main__, trainer.round, trainer.gates, trainer.publish; "
            "print([m for m in sys.modules if m.split('.')[0] in ('discord', 'slack_bolt', 'slack_sdk', 'aiohttp')"
            " or m.startswith('bot.adapters')])")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
