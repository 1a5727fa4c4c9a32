"""python -m trainer: the learning loop, one round at a time.

    python -m trainer [--config reactlearn.toml] [--check-config] [--once] [--help-config] [--health-port PORT]

- One trainer per data_dir: an flock on ``data_dir/trainer.lock``; a second one exits
  with a message and exit code 2.
- At start: remove leftovers of crashed publishes and prunes (``versions/.tmp-*``,
  ``versions/.trash-*``, unregistered version folders) and settle what a trainer that died
  mid-round left "running" (``trainer/recover.py``): a round whose version was committed
  counts as published (or rejected) and its requests as done; the others fail (a crash may
  be caused by the request, so it is not retried blindly).
- Heartbeat: state key ``trainer_heartbeat`` (unix time) every ``heartbeat_seconds``,
  also during a round (the round's compute runs in a worker thread).
- Train requests (/retrain) are picked up within a couple of seconds; all pending ones
  are served by one round over every rated reply (no settle wait); each ends "done"
  with the round's summary ("v7 published: ..." / "v7 rejected: ...") or "failed".
- Otherwise every ``interval_seconds``: a round when at least ``min_new_ratings``
  settled rated replies arrived since the last published (or rejected/failed) round.
- Health: with ``health.trainer_port`` (or ``--health-port``) set, ``/healthz`` (the store
  answers, the heartbeat is fresh) and ``/metrics`` (rounds by status, the last published
  round's KL and mean reward, heartbeat age) on ``health.host`` (bot/health.py). A port that
  is taken is one line on stderr and exit code 2.
- SIGTERM/SIGINT: the round in flight stops at its next step and publishes nothing; its
  train requests go back to "pending", so the next start serves them. Exit code 0.
  A second signal exits at once.
- ``--once``: serve pending requests, or else one round if enough new ratings are
  settled (ignoring the interval), then exit.

The trainer imports nothing from bot.adapters, so it never loads a chat SDK.
"""

from __future__ import annotations

from bot import process

process.quiet_threads()      # before torch loads (bot/process.py says why)

import argparse  # noqa: E402
import asyncio  # noqa: E402
import fcntl  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bot.config import ConfigError, check_paths, load_config  # noqa: E402
from bot.store import STORE_ERRORS, Store  # noqa: E402
from trainer.config import TrainerConfig, load_trainer_config  # noqa: E402

log = logging.getLogger("trainer")
LOCK_NAME = "trainer.lock"
ATTEMPTED_KEY = "trainer_last_attempted_reply_id"
REQUEST_POLL_SECONDS = 2.0


OUTAGE_NOTE = " (the store failed before this was reported; recorded once it worked again)"


def outage(e: BaseException) -> str:
    """What a loop pass's store or file error was, in words: the store (the SQLite file) or a
    file (a version's), and whether the disk is full or read-only (``bot.process.disk_problem``)."""
    disk, store = process.disk_problem(e), isinstance(e, sqlite3.Error)
    if disk:
        where = f"{'the store' if store else 'a file'} can't be written: the disk is {disk}"
    else:
        where = "the store failed" if store else "a file operation failed"
    return f"{where} ({type(e).__name__}: {e})"


class AlreadyRunning(Exception):
    """Another trainer holds the lock for this data_dir."""


def acquire_lock(data_dir: Path):
    """Take the single-instance lock (kept while the returned file stays open).

    Raises AlreadyRunning with a message naming the holder's pid and the lock file."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    try:
        f = open(path, "a+")
    except OSError as e:
        raise process.StartupError(f"cannot start: the lock file {path} can't be opened ({e.strerror or e}). "
                                   "It must be a file this user can write; remove whatever is in its place.") from None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise AlreadyRunning(f"another trainer is already running for {data_dir} (pid {holder}, lock {path}); "
                             "stop it first, or point this one at another data_dir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class Trainer:
    def __init__(self, cfg, tcfg: TrainerConfig):
        from trainer.learner import Learner

        self.cfg, self.tcfg = cfg, tcfg
        self.stop = threading.Event()          # checked by the round's worker thread every step
        self.wake = asyncio.Event()
        self.learner = Learner(cfg, tcfg)
        self.store: Store | None = None
        self._signals = 0
        self._store_failing = ""        # why the last loop pass failed (a store or disk error, see _turn); '' if it did not

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("%s: stopping (the round in flight, if any, publishes nothing)", signal.Signals(signum).name)
        self.stop.set()
        self.wake.set()

    async def run(self, once: bool = False) -> int:
        from trainer.publish import clean_stale
        from trainer.recover import settle_unfinished

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self.store = store = await Store.open(self.cfg.db_path, synchronous=self.cfg.storage.synchronous)
        except (sqlite3.Error, OSError, RuntimeError) as e:     # RuntimeError: a schema newer than this code
            raise process.StartupError(process.store_problem(self.cfg.db_path, e)) from None
        beat = health = None
        try:
            health, problem = await self._start_health()
            if problem:
                return process.fail(problem)
            beat = asyncio.create_task(self._heartbeat())
            await clean_stale(store, self.cfg.versions_dir)
            await settle_unfinished(store)      # rounds and requests a killed trainer left running
            log.info("trainer ready: data %s, model %s, active v%d", self.cfg.data_dir, self.cfg.model.name,
                     await store.active_version())
            next_scheduled = 0.0
            while not self.stop.is_set():
                next_scheduled = await self._turn(once, next_scheduled)
                if once:
                    break
                self.wake.clear()
                if self.stop.is_set():
                    break
                try:
                    await asyncio.wait_for(self.wake.wait(), REQUEST_POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
        finally:
            if beat is not None:
                beat.cancel()
                await asyncio.gather(beat, return_exceptions=True)
            if health is not None:
                await health.stop()
            await store.close()
        log.info("trainer stopped")
        return 0

    async def _turn(self, once: bool, next_scheduled: float) -> float:
        """One pass of the loop: the auto-rollback check, pending requests, else a due round.
        Returns when the next scheduled round is due. A store that can't be written (a full
        disk, a read-only data folder) or a file that can't be (a version's, on the same disk)
        costs this pass, not the trainer: logged once, and the next pass tries again, so it goes
        on by itself once there is room. The first pass after such a failure settles what it
        left "running" (its round, its train requests: trainer/recover.py), so every request
        still ends "done" or "failed" and is answered."""
        from trainer.recover import settle_unfinished
        from trainer.rollback import check_rollback

        try:
            if self._store_failing:
                await settle_unfinished(self.store, self._store_failing, OUTAGE_NOTE)
            await check_rollback(self.store, self.tcfg)
            served = await self.serve_requests()
            if not served and (once or time.monotonic() >= next_scheduled):
                next_scheduled = time.monotonic() + self.tcfg.interval_seconds
                await self.scheduled_round()
        except STORE_ERRORS as e:      # an outage is logged once, as an error, however long it lasts
            why = outage(e)
            (log.debug if self._store_failing else log.error)("%s; trying again every %gs", why, REQUEST_POLL_SECONDS)
            self._store_failing = self._store_failing or why
            return next_scheduled
        if self._store_failing:
            log.warning("the trainer's writes work again (after: %s); it goes on", self._store_failing)
            self._store_failing = ""
        return next_scheduled

    async def _start_health(self):
        """(the /healthz and /metrics server, '') when health.trainer_port is set, (None, '') when
        it is 0, (None, one line) when it can't listen. bot.health (aiohttp) loads only when set."""
        if not self.cfg.health.trainer_port:
            return None, ""
        from bot.health import HealthError, HealthServer, TrainerHealth

        server = HealthServer(TrainerHealth(self.store, self.tcfg.heartbeat_seconds), self.cfg.health.host,
                              self.cfg.health.trainer_port, "health.trainer_port")
        try:
            await server.start()
        except HealthError as e:
            return None, str(e)
        return server, ""

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.store.set_state("trainer_heartbeat", f"{time.time():.3f}")
            except Exception:  # noqa: BLE001 - a locked database now and then must not stop the beat
                log.exception("heartbeat failed")
            await asyncio.sleep(self.tcfg.heartbeat_seconds)

    async def serve_requests(self) -> bool:
        """One round for all pending train requests. Returns whether there were any."""
        from trainer.round import run_round

        store = self.store
        pending = await store.train_requests("pending")
        if not pending:
            return False
        ids = [r["id"] for r in pending]
        for rid in ids:
            await store.set_request_status(rid, "running")
        log.info("serving train request(s) %s", ", ".join(f"#{i}" for i in ids))
        result = await run_round(store, self.cfg, self.tcfg, self.learner, request_id=ids[-1], use_all=True,
                                 stop=self.stop)
        if result.interrupted:
            for rid in ids:
                await store.set_request_status(rid, "pending")
            log.info("request(s) %s back to pending (interrupted)", ids)
            return True
        status = "failed" if result.status == "failed" else "done"
        for rid in ids:
            await store.set_request_status(rid, status, result.summary())
        await self._attempted(result)
        return True

    async def scheduled_round(self) -> None:
        from trainer.round import run_round

        store = self.store
        since = max(await store.last_trained_reply_id(), int(await store.get_state(ATTEMPTED_KEY, "0")))
        new = await store.count_rated_since(since, time.time() - self.tcfg.settle_seconds)
        if new < self.tcfg.min_new_ratings:
            log.debug("no round: %d new settled rated replies (< %d)", new, self.tcfg.min_new_ratings)
            return
        log.info("scheduled round: %d new settled rated replies", new)
        result = await run_round(store, self.cfg, self.tcfg, self.learner, stop=self.stop)
        if not result.interrupted:
            await self._attempted(result)

    async def _attempted(self, result) -> None:
        """Remember the newest reply a finished round saw, so a rejected or failed round is not
        repeated on the same ratings every interval (published ones count via the registry)."""
        if result.last_reply_id is not None and result.status in ("rejected", "failed"):
            await self.store.set_state(ATTEMPTED_KEY, str(result.last_reply_id))


def config_help() -> str:
    """The [trainer] table with every setting at its default, each under its help text and valid range."""
    import dataclasses
    import json
    import textwrap

    lines = ["[trainer]"]
    for f in dataclasses.fields(TrainerConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        valid = f" Valid: {f.metadata['range']}." if "range" in f.metadata else ""
        lines += [f"# {line}" for line in textwrap.wrap(f.metadata["help"] + valid, 96)]
        lines.append(f"{f.name} = {json.dumps(default)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trainer", description="reactlearn's trainer: learns from the "
                                 "emoji reactions recorded by the bot and publishes new model versions.")
    ap.add_argument("--config", type=Path, default=None, help="TOML config file (default: $REACTLEARN_CONFIG, "
                    "or built-in defaults)")
    ap.add_argument("--check-config", action="store_true", help="validate the config (incl. [trainer]) and exit")
    ap.add_argument("--once", action="store_true", help="serve pending requests or run one due round, then exit")
    ap.add_argument("--health-port", type=process.port_arg, metavar="PORT", help="serve /healthz and /metrics on "
                    "this port (overrides health.trainer_port; 0 = off)")
    ap.add_argument("--help-config", action="store_true", help="print every [trainer] setting with its default "
                    "and help, as TOML, and exit")
    args = ap.parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0
    try:
        cfg = load_config(args.config, need_secrets=False)     # the trainer never connects to a chat
        tcfg = load_trainer_config(cfg)
    except ConfigError as e:
        return process.fail(f"config error: {e}")
    if args.health_port is not None:
        cfg.health.trainer_port = args.health_port
    try:
        check_paths(cfg)
    except ConfigError as e:
        return process.fail(f"{'config error' if args.check_config else 'cannot start'}: {e}")
    if args.check_config:
        print(f"config OK: data_dir {cfg.data_dir}, model {cfg.model.name}, trainer "
              f"{'full fine-tune' if tcfg.full_finetune else f'LoRA r={tcfg.lora_rank}'}, lr {tcfg.lr:g}, "
              f"epochs {tcfg.epochs}, round every {tcfg.interval_seconds:g}s given {tcfg.min_new_ratings} new ratings")
        return 0
    process.setup_logging(cfg.log_level)
    data_dir = Path(cfg.data_dir).expanduser()
    problem = process.writable_dir_problem(data_dir, "data_dir")
    if problem:
        return process.fail(problem)
    try:
        lock = acquire_lock(data_dir)
    except (AlreadyRunning, process.StartupError) as e:
        return process.fail(str(e))
    try:
        return asyncio.run(Trainer(cfg, tcfg).run(once=args.once))
    except process.StartupError as e:
        return process.fail(str(e))
    except Exception as e:  # noqa: BLE001 - whatever it is, exit non-zero with one line (Restart=on-failure)
        line = process.disk_stop_line("trainer", e, data_dir)
        if not line:
            log.exception("the trainer stopped")
        return process.fail(line or f"the trainer stopped: {type(e).__name__}: {e}")
    finally:
        lock.close()


if __name__ == "__main__":
    process.run_main(main)
