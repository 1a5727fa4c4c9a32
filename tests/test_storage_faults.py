"""A full disk or a read-only data folder while running, made with real mechanisms, not mocks:

- "full": SQLite's own page limit (``PRAGMA max_page_count`` at the current size) on the real
  database, so writes that need a page fail with SQLITE_FULL, "database or disk is full";
- "read-only": ``PRAGMA query_only`` on the connection, so writes fail with SQLITE_READONLY,
  "attempt to write a readonly database", as with a read-only file (the tests run as root,
  where chmod stops nothing);
- the trainer's weights: a real file-size limit (``RLIMIT_FSIZE``, with SIGXFSZ ignored) on the
  ``python -m trainer`` process, so the write of a version's weights fails in the kernel
  (EFBIG, "File too large", the same path as ENOSPC), and is lifted with ``prlimit``.

Checked: the person gets a short notice, nothing committed is lost, and service resumes by
itself when the limit goes; the trainer removes its temp folder and goes on to the next round."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from bot.chat import STORE_TEXT, ChatCore
from bot.events import Message, Reaction
from bot.store import Store
from tests.trainer_helpers import CONSOLE, seed_rated, tiny_config, toml_text, trainer_config
from trainer.__main__ import OUTAGE_NOTE, Trainer, outage

REPO = Path(__file__).resolve().parents[1]
UNLIMITED = 1 << 30          # SQLite's default max_page_count


def message(n: int, text: str) -> Message:
    return Message(platform="console", message_id=f"m{n}", channel_id="console", author_id="you",
                   author_name="You", text=text, **CONSOLE)


async def break_writes(store: Store, how: str) -> None:
    if how == "full":
        pages = (await store._one("PRAGMA page_count"))[0]
        await store._one(f"PRAGMA max_page_count = {pages}")
    else:
        await store._one("PRAGMA query_only = ON")


async def mend_writes(store: Store, how: str) -> None:
    await store._one(f"PRAGMA max_page_count = {UNLIMITED}" if how == "full" else "PRAGMA query_only = OFF")


@pytest.mark.parametrize("how", ["full", "read-only"])
async def test_the_person_is_told_nothing_saved_is_lost_and_service_resumes(core, store, how, caplog):
    said: list[str] = []

    async def send(text: str) -> list[str]:
        said.append(text)
        return [f"p{len(said)}"]

    first = await core.on_message(message(1, "hello"), [], send)
    assert first is not None
    await core.vote(first, "you", "\N{THUMBS UP SIGN}", 1.0)
    saved = await store.counts()
    reply = await store.get_reply(first)

    await break_writes(store, how)
    big = "é" * 4000          # needs new pages (8 kB): a full database can't take it
    assert await core.on_message(message(2, big), [], send) is None
    assert said[-1] == STORE_TEXT and "Traceback" not in said[-1] and len(said[-1]) < 200
    assert await store.counts() == saved                       # nothing committed is lost
    assert (await store.get_reply(first)).text == reply.text
    assert await store.votes_for(first) == [("you", "\N{THUMBS UP SIGN}", 1.0)]
    problem = "database or disk is full" if how == "full" else "attempt to write a readonly database"
    assert any(problem in r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)

    await mend_writes(store, how)                              # space (or write access) is back
    again = await core.on_message(message(3, big), [], send)
    assert again is not None and said[-1] != STORE_TEXT       # answered, without a restart
    assert (await store.counts())["messages"] == saved["messages"] + 1
    assert (await store.get_reply(again)) is not None


UP = "\N{THUMBS UP SIGN}"


async def a_vote_cast_while_writes_fail(core, store) -> int:
    """A reply (posted as p1), then writes break and someone 👍 it; the reply id."""
    async def send(text: str) -> list[str]:
        return ["p1"]

    rid = await core.on_message(message(1, "hello"), [], send)
    await break_writes(store, "read-only")
    outcome = await core.on_reaction(Reaction("console", "console", "p1", "bob", UP, added=True))
    assert outcome.startswith("failed: OperationalError") and await store.votes_for(rid) == []
    return rid


async def test_a_vote_cast_while_the_store_fails_is_written_once_it_works_again(core, store):
    rid = await a_vote_cast_while_writes_fail(core, store)
    await core.poll({})                                        # still failing: kept, not dropped
    assert await store.votes_for(rid) == []
    await mend_writes(store, "read-only")
    await core.poll({})                                        # no new event: the kept change is written
    assert await store.votes_for(rid) == [("bob", UP, 1.0)]


async def test_a_store_outage_is_one_error_in_the_background_poll_however_many_polls_it_lasts(core, store, caplog):
    rid = await a_vote_cast_while_writes_fail(core, store)
    seen = len(caplog.records)
    for _ in range(6):
        await core.poll({})                                    # each one tries to write the kept vote
    errors = [r for r in caplog.records[seen:] if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "the store can't be written" in errors[0].getMessage()
    assert "attempt to write a readonly database" in errors[0].getMessage() and not errors[0].exc_info
    await mend_writes(store, "read-only")
    for _ in range(3):
        await core.poll({})
    back = [r for r in caplog.records[seen:] if "can be written again" in r.getMessage()]
    assert len(back) == 1 and back[0].levelno == logging.WARNING
    assert len([r for r in caplog.records[seen:] if r.levelno >= logging.ERROR]) == 1
    assert await store.votes_for(rid) == [("bob", UP, 1.0)]


async def test_a_transaction_on_a_full_database_raises_its_own_error_and_keeps_nothing(store):
    """SQLite rolls a transaction back by itself on SQLITE_FULL; the store must not then hide
    the error behind "cannot rollback - no transaction is active"."""
    rid = await store.add_reply("console", "c", None, 0, "kept", [1], [2], [-0.1], 0.8, 0.95, 8)
    await break_writes(store, "full")
    with pytest.raises(Exception, match="database or disk is full"):
        async with store.transaction():
            await store.db.execute("UPDATE replies SET text = 'changed' WHERE id = ?", (rid,))
            for i in range(50):
                await store.db.execute("INSERT INTO state (key, value) VALUES (?, ?)", (f"k{i}", "x" * 3000))
    assert (await store.get_reply(rid)).text == "kept"
    assert await store.get_state("k0") is None
    await mend_writes(store, "full")
    await store.set_state("k0", "fine")                       # the connection works on
    assert await store.get_state("k0") == "fine"


async def test_the_trainer_loop_goes_on_when_the_store_cannot_be_written(tmp_path, tiny_model_dir, store_for, caplog):
    cfg = tiny_config(tmp_path, tiny_model_dir)
    trainer = Trainer(cfg, trainer_config(cfg))
    trainer.store = store = await store_for(cfg)
    await store.add_train_request("console", "console", "you")
    await break_writes(store, "read-only")
    for _ in range(3):                                        # every pass fails, none raises
        await trainer._turn(once=False, next_scheduled=time.monotonic() + 3600)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "can't be written" in r.getMessage()]
    assert len(errors) == 1                                   # an outage is one error line
    assert [r["status"] for r in await store.train_requests()] == ["pending"]
    await mend_writes(store, "read-only")
    await trainer._turn(once=False, next_scheduled=time.monotonic() + 3600)
    (req,) = await store.train_requests()
    assert req["status"] == "done" and req["result"].startswith("no round:")


@pytest.mark.parametrize("statement", ["INSERT", "UPDATE"], ids=["round-not-added", "outcome-not-recorded"])
async def test_a_request_whose_round_the_store_could_not_record_is_answered_once_it_works(
        statement, tmp_path, tiny_model_dir, store_for, shared_policy):
    """A disk that takes some writes and not others (an UPDATE in place fits, a new row not): the
    request is marked running, then the round's row can't be added (or its outcome can't be
    recorded). The first pass that works settles both; the bot posts the answer."""
    cfg = tiny_config(tmp_path, tiny_model_dir)
    trainer = Trainer(cfg, trainer_config(cfg))
    trainer.store = store = await store_for(cfg)
    asked = await store.add_train_request("console", "console", "you")
    await store._one(f"CREATE TEMP TRIGGER no_room BEFORE {statement} ON rounds"
                     " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    later = time.monotonic() + 3600
    await trainer._turn(once=False, next_scheduled=later)
    assert [r["status"] for r in await store.train_requests()] == ["running"]
    await store._one("DROP TRIGGER no_room")
    await trainer._turn(once=False, next_scheduled=later)           # the store works again
    (req,) = await store.train_requests()
    assert req["status"] == "failed" and "database or disk is full" in req["result"] \
        and req["result"].endswith("ask again with /retrain"), req
    assert [r["status"] for r in await store.rounds()] == (["failed"] if statement == "UPDATE" else [])
    posted: list[tuple[str, str]] = []

    async def post(channel: str, text: str) -> None:
        posted.append((channel, text))

    assert await ChatCore(cfg, store, shared_policy).post_results({"console": post}) == 1
    assert posted == [("console", f"Retrain #{asked}: {req['result']}")]
    again = await store.add_train_request("console", "console", "you")   # and the next request is served
    await trainer._turn(once=False, next_scheduled=later)
    assert [(r["id"], r["status"]) for r in await store.train_requests()] == [(asked, "failed"), (again, "done")]


async def test_a_version_registered_before_the_store_failed_is_reported_as_published(tmp_path, tiny_model_dir,
                                                                                     store_for):
    """The registry commit went through, recording the round's outcome did not: once the store
    works, the request is "done" with the version's summary, not "failed"."""
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    trainer = Trainer(cfg, trainer_config(cfg))
    trainer.store = store = await store_for(cfg)
    trainer.learner.load()
    await seed_rated(store, trainer.learner.tokenizer, 4, base=trainer.learner.base)
    await store.add_train_request("console", "console", "you")
    await store._one("CREATE TEMP TRIGGER no_room BEFORE UPDATE ON rounds WHEN NEW.status = 'published'"
                     " BEGIN SELECT RAISE(FAIL, 'database or disk is full'); END")
    later = time.monotonic() + 3600
    await trainer._turn(once=False, next_scheduled=later)
    assert await store.active_version() == 1 and [r["status"] for r in await store.train_requests()] == ["running"]
    await store._one("DROP TRIGGER no_room")
    await trainer._turn(once=False, next_scheduled=later)
    (req,) = await store.train_requests()
    assert req["status"] == "done" and req["result"].startswith("v1 published: 4 rated replies"), req
    assert req["result"].endswith(OUTAGE_NOTE)
    assert [(r["status"], r["version"]) for r in await store.rounds()] == [("published", 1)]


async def test_a_pass_that_fails_says_whether_the_store_or_a_file_failed(store, tmp_path):
    await break_writes(store, "full")
    with pytest.raises(sqlite3.Error) as full:
        await store.set_state("big", "x" * 100_000)
    await mend_writes(store, "full")
    with pytest.raises(OSError) as missing:
        (tmp_path / "versions" / "v0001" / "model.safetensors").read_bytes()
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    with pytest.raises(OSError) as not_a_folder:
        (blocked / "v0002").mkdir()
    assert outage(full.value).startswith("the store can't be written: the disk is full (")
    assert outage(missing.value).startswith("a file operation failed (FileNotFoundError: ")
    assert "model.safetensors" in outage(missing.value) and "store" not in outage(missing.value)
    assert outage(not_a_folder.value).startswith("a file operation failed (NotADirectoryError: ")
    assert outage(OSError(errno.ENOSPC, "No space left on device")).startswith(
        "a file can't be written: the disk is full (")


# -- the trainer process and a real file-size limit --------------------------------------

LIMIT = 6 << 20      # 6 MiB: above the database and its WAL (at most ~4 MiB before a checkpoint),
                     # below the full weights of the model below (~9 MB)
LIMITED = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
           "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY)); "
           "sys.argv = ['trainer'] + sys.argv[2:]; runpy.run_module('trainer', run_name='__main__', alter_sys=True)")


def wider_model(folder: Path, tiny: Path) -> Path:
    """The tiny model's tokenizer on a wider random model whose full weights are ~9 MB."""
    tok = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


async def wait_for(check, timeout: float, what: str, proc: subprocess.Popen, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the trainer exited ({proc.returncode}) waiting for {what}:\n{log.read_text()[-3000:]}")
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")


async def test_a_version_too_big_for_the_disk_leaves_no_temp_folder_and_the_trainer_goes_on(
        tmp_path, tiny_model_dir, store_for):
    model = wider_model(tmp_path / "wider", tiny_model_dir)
    cfg = tiny_config(tmp_path, model, trainer={"full_finetune": True, "epochs": 1, "interval_seconds": 3600.0})
    config = tmp_path / "reactlearn.toml"
    config.write_text(toml_text(cfg))
    store = await store_for(cfg)
    await seed_rated(store, AutoTokenizer.from_pretrained(model), 8, prompt="hello there {i}")
    first = await store.add_train_request("console", "c", "admin")
    log = tmp_path / "trainer.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("REACTLEARN_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-c", LIMITED, str(LIMIT), "--config", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    try:
        async def finished(rid):
            async def check():
                req = next(r for r in await store.train_requests() if r["id"] == rid)
                return req if req["status"] in ("done", "failed") else None
            return check

        req = await wait_for(await finished(first), 240, "the first round", proc, log)
        assert req["status"] == "failed" and req["result"].startswith("round failed: publishing failed"), req
        assert "File too large" in req["result"]                              # the weights' write hit the limit
        assert sorted(p.name for p in cfg.versions_dir.iterdir()) == []        # no .tmp-* left, nothing visible
        assert [v.id for v in await store.versions()] == [0] and await store.active_version() == 0
        beat = float(await store.get_state("trainer_heartbeat", "0"))

        async def beating():
            return float(await store.get_state("trainer_heartbeat", "0")) > beat
        await wait_for(beating, 30, "a heartbeat after the failed round", proc, log)

        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        second = await store.add_train_request("console", "c", "admin")
        req = await wait_for(await finished(second), 240, "the round after space came back", proc, log)
        assert req["status"] == "done" and req["result"].startswith("v1 published"), req
        assert sorted(p.name for p in cfg.versions_dir.iterdir()) == ["v0001"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, log.read_text()[-3000:]


async def test_a_result_posted_while_the_store_cannot_mark_it_is_not_posted_again(core, store):
    """The trainer's answer went out but the store could not record that it did (a full disk):
    the next polls must not post it again, and it is marked once the store works."""
    asked = await store.add_train_request("console", "console", "you")
    await store.set_request_status(asked, "done", "v1 published")
    posted: list[str] = []

    async def post(channel: str, text: str) -> None:
        posted.append(text)

    await break_writes(store, "read-only")
    for _ in range(4):
        await core.poll({"console": post})                     # mark_notified fails each time
    assert posted == [f"Retrain #{asked}: v1 published"]
    await mend_writes(store, "read-only")
    await core.poll({"console": post})
    assert posted == [f"Retrain #{asked}: v1 published"]
    assert await store.unnotified_results() == []
