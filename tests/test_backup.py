"""`python -m bot backup PATH` and `storage.synchronous`, on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bot.__main__ import main
from bot.backup import backup
from bot.config import ConfigError, load_config
from bot.store import Store

ROOT = Path(__file__).resolve().parents[1]
PROMPT = list(range(400))          # ~1.6 KB of JSON a reply: the database spans a few hundred pages


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("REACTLEARN_CONFIG", "DISCORD_TOKEN", "SLACK_BOT_TOKEN",
                                                           "SLACK_APP_TOKEN")}
    return subprocess.run([sys.executable, "-m", "bot", *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)


def write_config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "reactlearn.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\nplatforms = []\n{extra}')
    return config


async def seed(store: Store, n_replies: int) -> list[int]:
    ids = []
    for i in range(n_replies):
        mid = await store.add_message("discord", f"m{i}", "c1", "u1", "u1", f"message {i}")
        ids.append(await store.add_reply("discord", "c1", mid, 0, f"reply {i}", PROMPT, [1, 2], [-0.5, -1.0],
                                         0.8, 0.95, 12))
    await store.set_vote(ids[0], "seed-voter", "👍", 1.0)
    return ids


async def create_database(path: Path, n_replies: int = 0) -> None:
    store = await Store.open(path)
    try:
        if n_replies:
            await seed(store, n_replies)
    finally:
        await store.close()


def scalar(db: sqlite3.Connection, sql: str):
    return db.execute(sql).fetchone()[0]


async def test_a_backup_while_votes_keep_coming_is_whole_and_consistent(tmp_path):
    db_path, dest = tmp_path / "data" / "reactlearn.sqlite3", tmp_path / "backups" / "copy.sqlite3"
    dest.parent.mkdir()
    dest.write_bytes(b"yesterday's backup")                  # replaced atomically
    store = await Store.open(db_path)                         # the running bot's connection
    try:
        reply_ids = await seed(store, 200)
        committed, stop, steps = [1], asyncio.Event(), []

        async def voter():                                    # people keep voting throughout
            n = 0
            while not stop.is_set():
                n += 1
                await store.set_vote(reply_ids[n % len(reply_ids)], f"user{n}", "👍", 1.0)
                committed[0] += 1

        def between_steps(status, remaining, total):          # let at least one vote land between steps
            seen, deadline = committed[0], time.monotonic() + 5
            while committed[0] == seen and time.monotonic() < deadline:
                time.sleep(0.001)
            steps.append(committed[0] - seen)

        writer = asyncio.create_task(voter())
        await asyncio.sleep(0.05)
        before = committed[0]                                 # committed before the backup started
        result = await asyncio.to_thread(backup, db_path, dest, pages=4, progress=between_steps)
        stop.set()
        await writer
        final = committed[0]
    finally:
        await store.close()
    assert len(steps) >= 10 and all(steps), "the writer committed votes between the backup's steps"
    copy = sqlite3.connect(dest)
    assert scalar(copy, "PRAGMA integrity_check") == "ok"
    assert copy.execute("PRAGMA foreign_key_check").fetchall() == []
    assert scalar(copy, "PRAGMA journal_mode") == "delete"   # one self-contained file
    votes = scalar(copy, "SELECT COUNT(*) FROM votes")
    assert before <= votes <= final and scalar(copy, "SELECT COUNT(*) FROM replies") == 200
    assert (result.path, result.replies, result.votes, result.size) == (dest, 200, votes, dest.stat().st_size)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["copy.sqlite3"]     # no temp file left


def test_the_cli_writes_one_line_and_takes_config_after_the_word(tmp_path):
    config = write_config(tmp_path)

    asyncio.run(create_database(tmp_path / "data" / "reactlearn.sqlite3", n_replies=2))
    dest = tmp_path / "copy.sqlite3"
    done = run_cli("backup", str(dest), "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [done.stdout.strip()] and done.stderr == ""
    assert f"backup written: {dest} (" in done.stdout and "2 replies, 1 votes" in done.stdout
    assert f"{dest.stat().st_size:,} bytes" in done.stdout


def test_a_missing_database_is_one_line_and_exit_code_2(tmp_path):
    config = write_config(tmp_path)
    dest = tmp_path / "copy.sqlite3"
    done = run_cli("--config", str(config), "backup", str(dest))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot back up:"), done.stderr
    assert str(tmp_path / "data" / "reactlearn.sqlite3") in lines[0] and "does not exist" in lines[0]
    assert not dest.exists() and not (tmp_path / "data" / "reactlearn.sqlite3").exists()   # nothing created


def test_a_folder_that_cannot_be_written_is_one_line_and_exit_code_2(tmp_path, capsys):
    config = write_config(tmp_path)
    asyncio.run(create_database(tmp_path / "data" / "reactlearn.sqlite3"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(["--config", str(config), "backup", str(blocker / "copy.sqlite3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"cannot back up: the folder {blocker}"), err
    assert "writable folder" in err[0]


def test_a_failed_backup_leaves_the_old_one_and_no_temp_file(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reactlearn.sqlite3").write_bytes(b"this is not a database" * 100)
    dest = tmp_path / "out" / "copy.sqlite3"
    dest.parent.mkdir()
    dest.write_bytes(b"the old backup")
    assert main(["backup", str(dest), "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("backup failed:") and "left as it was" in err[0], err
    assert dest.read_bytes() == b"the old backup" and [p.name for p in dest.parent.iterdir()] == ["copy.sqlite3"]


@pytest.mark.parametrize("setting, pragma", [(None, 1), ("NORMAL", 1), ("FULL", 2), ("full", 2)])
async def test_storage_synchronous_is_what_the_store_applies(tmp_path, setting, pragma):
    config = write_config(tmp_path, f'[storage]\nsynchronous = "{setting}"\n' if setting else "")
    cfg = load_config(config, env={})
    assert cfg.storage.synchronous == (setting or "NORMAL").upper()
    store = await Store.open(cfg.db_path, synchronous=cfg.storage.synchronous)
    try:
        assert (await store._one("PRAGMA synchronous"))[0] == pragma
    finally:
        await store.close()


async def test_the_store_defaults_to_normal(tmp_path):
    store = await Store.open(tmp_path / "db.sqlite3")
    try:
        assert (await store._one("PRAGMA synchronous"))[0] == 1
    finally:
        await store.close()


def test_a_bad_synchronous_value_is_refused_naming_the_key_and_the_values(tmp_path):
    config = write_config(tmp_path, '[storage]\nsynchronous = "OFF"\n')
    with pytest.raises(ConfigError) as e:
        load_config(config, env={})
    assert "storage.synchronous" in str(e.value) and '"NORMAL"' in str(e.value) and '"FULL"' in str(e.value)
    assert "'OFF'" in str(e.value)
    with pytest.raises(ValueError, match="NORMAL, FULL"):
        asyncio.run(Store.open(tmp_path / "db.sqlite3", synchronous="OFF"))
