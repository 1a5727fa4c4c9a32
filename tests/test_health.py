"""/healthz and /metrics (bot/health.py): the real store, the real chat core and policy on the tiny
model, the real aiohttp server on a loopback port, the real processes for start and stop."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.chat import ChatCore
from bot.config import Config, ConfigError, build, load_config, validate
from bot.events import Message, Reaction
from bot.health import BotHealth, HealthError, HealthServer, TrainerHealth
from bot.store import Store
from tests.trainer_helpers import tiny_config, toml_text

ROOT = Path(__file__).resolve().parents[1]


async def get(server: HealthServer, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.bound_port}{path}") as r:
            return r.status, await r.text()


async def get_json(server: HealthServer, path: str = "/healthz") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.bound_port}{path}") as r:
            return r.status, await r.json()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value, from Prometheus text."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def serving(health) -> HealthServer:
    server = HealthServer(health, "127.0.0.1", 0, "health.bot_port")
    await server.start()
    return server


async def test_bot_healthz_is_200_when_ready_and_503_when_the_store_is_gone(cfg, policy):
    store = await Store.open(cfg.db_path)
    health = BotHealth(cfg, store)
    server = await serving(health)
    try:
        status, body = await get_json(server)
        assert status == 503 and body["checks"]["model"] == {"ok": False, "required": True, "detail": "loading"}
        core = ChatCore(cfg, store, policy, metrics=health)
        await core.sync_version()
        health.core = core
        await store.set_state("trainer_heartbeat", f"{time.time():.3f}")
        status, body = await get_json(server)
        assert status == 200 and body["ok"] is True
        assert {k: c["ok"] for k, c in body["checks"].items()} == {"store": True, "model": True,
                                                                  "trainer_heartbeat": True}
        assert body["checks"]["model"]["detail"] == "serving v0"
        # A stopped trainer is reported, and the bot, which still chats, stays healthy.
        await store.set_state("trainer_heartbeat", f"{time.time() - 3600:.3f}")
        status, body = await get_json(server)
        assert status == 200 and body["checks"]["trainer_heartbeat"]["ok"] is False
        assert body["checks"]["trainer_heartbeat"]["detail"].startswith("stale: written 3600 s ago")
        await store.close()
        status, body = await get_json(server)
        assert status == 503 and body["ok"] is False
        assert body["checks"]["store"]["ok"] is False and "does not answer" in body["checks"]["store"]["detail"]
        status, text = await get(server, "/metrics")        # /metrics still answers, and says so
        assert status == 200 and samples(text)[("reactlearn_store_up", ())] == 0
    finally:
        await server.stop()


async def test_metrics_count_a_reply_and_a_vote_that_went_through_the_chat_core(cfg, store, policy):
    health = BotHealth(cfg, store)
    core = ChatCore(cfg, store, policy, metrics=health)
    health.core = core
    server = await serving(health)
    try:
        async def send(text: str) -> list[str]:
            return ["bot-msg-1"]

        msg = Message("discord", "m1", "c1", "u1", "Ann", "hello bot", mentions_bot=True)
        assert await core.on_message(msg, [], send) is not None
        assert await core.on_reaction(Reaction("discord", "c1", "bot-msg-1", "u2", "👍", added=True)) == "added"
        assert await core.on_reaction(Reaction("discord", "c1", "bot-msg-1", "u3", "👎", added=True)) == "added"
        assert await core.on_reaction(Reaction("discord", "c1", "bot-msg-1", "u4", "👍", added=True)) == "added"
        status, text = await get(server, "/metrics")
        assert status == 200
        got = samples(text)
        assert got[("reactlearn_bot_replies_total", (("platform", "discord"),))] == 1
        assert got[("reactlearn_bot_reply_latency_seconds_count", ())] == 1
        assert got[("reactlearn_bot_reply_latency_seconds_sum", ())] > 0
        assert got[("reactlearn_votes", (("value", "+1"),))] == 2
        assert got[("reactlearn_votes", (("value", "-1"),))] == 1
        assert got[("reactlearn_replies", ())] == 1 and got[("reactlearn_rated_replies", ())] == 1
        assert got[("reactlearn_bot_queue_depth", ())] == 0
        assert got[("reactlearn_active_version", ())] == 0 and got[("reactlearn_bot_serving_version", ())] == 0
        assert got[("reactlearn_store_up", ())] == 1
        assert ("reactlearn_trainer_heartbeat_age_seconds", ()) not in got      # no trainer ever ran
        assert any(name == "process_resident_memory_bytes" for name, _ in got)
    finally:
        await server.stop()


async def test_trainer_metrics_and_health_after_recorded_rounds(cfg, store):
    await store.add_version(1, 0, str(cfg.versions_dir / "v0001"), "ab" * 32, "published", {}, activate=True)
    published = await store.start_round(None, 0)
    await store.finish_round(published, status="published", version=1, n_replies=16, mean_reward=0.25, kl=0.03)
    rejected = await store.start_round(None, 1)
    await store.finish_round(rejected, status="rejected", n_replies=16, mean_reward=-0.5, kl=0.9, reason="KL")
    await store.start_round(None, 1)                                     # one running now
    server = HealthServer(TrainerHealth(store, heartbeat_seconds=10.0), "127.0.0.1", 0, "health.trainer_port")
    await server.start()
    try:
        got = samples((await get(server, "/metrics"))[1])
        assert {labels[0][1]: v for (name, labels), v in got.items() if name == "reactlearn_trainer_rounds_total"} \
            == {"published": 1, "rejected": 1, "skipped": 0, "failed": 0}
        assert got[("reactlearn_trainer_rounds_running", ())] == 1
        assert got[("reactlearn_trainer_last_published_version", ())] == 1
        assert got[("reactlearn_trainer_last_published_kl", ())] == pytest.approx(0.03)
        assert got[("reactlearn_trainer_last_published_mean_reward", ())] == pytest.approx(0.25)
        assert got[("reactlearn_active_version", ())] == 1
        status, body = await get_json(server)                            # the trainer's heartbeat is required
        assert status == 503 and body["checks"]["heartbeat"]["detail"].startswith("missing")
        await store.set_state("trainer_heartbeat", f"{time.time() - 5:.3f}")
        status, body = await get_json(server)
        assert status == 200 and body["checks"]["heartbeat"] == {"ok": True, "required": True,
                                                                "detail": "written 5 s ago"}
        got = samples((await get(server, "/metrics"))[1])
        assert 4 < got[("reactlearn_trainer_heartbeat_age_seconds", ())] < 60
        await store.set_state("trainer_heartbeat", f"{time.time() - 61:.3f}")       # limit: max(60, 3 × 10) s
        assert (await get_json(server))[0] == 503
    finally:
        await server.stop()


async def test_a_taken_port_is_one_line_naming_the_key(cfg, store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = HealthServer(BotHealth(cfg, store), "127.0.0.1", port, "health.bot_port")
        with pytest.raises(HealthError) as e:
            await server.start()
    assert f"127.0.0.1:{port} (health.bot_port) is already in use" in str(e.value) and "\n" not in str(e.value)
    await server.stop()                                                  # nothing to stop: a no-op


@pytest.mark.parametrize("health, key", [
    ({"bot_port": 70000}, "health.bot_port"),
    ({"trainer_port": -1}, "health.trainer_port"),
    ({"bot_port": 9321, "trainer_port": 9321}, "health.trainer_port"),
    ({"host": " "}, "health.host"),
    ({"bot_port": "9321"}, "health.bot_port"),
    ({"port": 9321}, "health.port"),
])
def test_config_errors_name_the_key(health, key):
    with pytest.raises(ConfigError) as e:
        validate(build(Config, {"health": health}))
    assert f"'{key}'" in str(e.value)


def test_the_defaults_are_off_on_loopback():
    cfg = load_config(None, env={})
    assert (cfg.health.host, cfg.health.bot_port, cfg.health.trainer_port) == ("127.0.0.1", 0, 0)


def test_health_port_flag_is_checked():
    from bot.__main__ import parse_args

    assert parse_args(["--health-port", "9321"]).health_port == 9321
    with pytest.raises(SystemExit):
        parse_args(["--health-port", "65536"])


# -- the real processes -------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("REACTLEARN_CONFIG", "DISCORD_TOKEN", "SLACK_BOT_TOKEN",
                                                           "SLACK_APP_TOKEN")}
    return {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}


async def wait_healthy(port: int, proc: subprocess.Popen, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the process exited with {proc.returncode}"
            try:
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    if r.status == 200:
                        return await r.json()
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise AssertionError("never healthy")


async def test_the_trainer_process_serves_health_and_stops_cleanly(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"interval_seconds": 3600.0})
    config = tmp_path / "reactlearn.toml"
    config.write_text(toml_text(cfg))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "--config", str(config), "--health-port", str(port)],
                            cwd=ROOT, env=process_env(), stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "trainer.log").open("wb"))
    try:
        body = await wait_healthy(port, proc)
        assert body["checks"]["heartbeat"]["ok"] and body["checks"]["store"]["ok"]
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
            got = samples(await r.text())
        assert got[("reactlearn_trainer_rounds_total", (("status", "published"),))] == 0
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0, (tmp_path / "trainer.log").read_text()
        with socket.socket() as s:                                         # the port is free again
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_bot_whose_health_port_is_taken_exits_with_one_line(tmp_path, tiny_model_dir):
    config = tmp_path / "reactlearn.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nplatforms = []\n[model]\nname = "{tiny_model_dir}"\n')
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "bot", "--config", str(config), "--health-port", str(port)],
                              cwd=ROOT, env=process_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "health.bot_port" in lines[0] and "already in use" in lines[0], done.stderr


async def test_the_bot_process_serves_health_and_stops_cleanly(tmp_path, tiny_model_dir):
    config = tmp_path / "reactlearn.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nplatforms = []\n[model]\nname = "{tiny_model_dir}"\n'
                      '[sampling]\nmax_new_tokens = 8\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bot", "--config", str(config), "--health-port", str(port)],
                            cwd=ROOT, env=process_env(), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=(tmp_path / "stderr.log").open("wb"))
    try:
        body = await wait_healthy(port, proc)
        assert body["checks"]["model"] == {"ok": True, "required": True, "detail": "serving v0"}
        assert body["checks"]["trainer_heartbeat"]["detail"].startswith("missing")       # reported, not failed
        proc.stdin.close()                                                # the console's end of input: quit
        assert await asyncio.to_thread(proc.wait, 60) == 0, (tmp_path / "stderr.log").read_text()
        with socket.socket() as s:                                         # the port is free again
            s.bind(("127.0.0.1", port))
    finally:
        if proc.poll() is None:
            proc.kill()
