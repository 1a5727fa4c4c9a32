"""Reaction ingestion: votes/s through ChatCore.on_reaction, and the database size per million votes.

    python -m bench.votes [--votes 10000] [--reply-rows 200] [--concurrency 16] [--config X] ...

A real store in a temp folder gets ``--reply-rows`` recorded replies (prompt and reply token
ids and logprobs of typical length, each linked to a platform message id). Then each phase
stores ``--votes`` reactions on them, every one a distinct (reply, user, emoji), 👍 or 👎,
with 18-digit user ids (Discord snowflakes):

    core, one at a time    ``ChatCore.on_reaction(Reaction(...))`` awaited one after another
    store.set_vote         baseline: the store's own write, no reply lookup, no core (run in
                           alternating blocks with the one above, so both see the same table size)
    core, N at once        the same from ``--concurrency`` tasks (adapters run each event as a task)
    plain sqlite3          baseline: stdlib sqlite3, the same table and pragmas (WAL, synchronous
                           NORMAL), one INSERT + commit per vote, in a separate file

The votes table is counted after each phase and must hold exactly what was sent. The
database size per million votes is the growth of the file (store closed, so the WAL is
checkpointed into it) over the phases' votes, scaled to 10^6. No model is loaded: the
chat core's vote path does not use the policy.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import sys
import time
from pathlib import Path

from bench import common

NAME = "votes"
UP, DOWN = "\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"
USER0 = 400_000_000_000_000_000          # 18 digits, like a Discord user id


def build_parser():
    ap = common.base_parser(NAME, __doc__)
    ap.add_argument("--votes", type=int, default=10_000, help="votes per phase (10000)")
    ap.add_argument("--reply-rows", type=int, default=200, help="replies the votes land on (200)")
    ap.add_argument("--concurrency", type=int, default=16, help="tasks in the 'at once' phase (16)")
    return ap


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def seed_replies(store, n: int, rng: random.Random) -> list[str]:
    """n replies of typical size, each linked to a platform message id; returns those ids."""
    ids = []
    for i in range(n):
        row = await store.add_message("bench", f"in{i}", "c", f"{USER0 + i}", "Person", "hello there, how are you?")
        prompt = [rng.randrange(49152) for _ in range(60)]
        out = [rng.randrange(49152) for _ in range(48)]
        rid = await store.add_reply("bench", "c", row, 0, "a reply " * 20, prompt, out,
                                    [-rng.random() * 3 for _ in out], 0.7, 0.9, 48)
        await store.link_reply_message(rid, "bench", f"out{i}")
        ids.append(f"out{i}")
    return ids


def reactions(msg_ids: list[str], n: int, user_base: int):
    """n distinct (message, user, emoji) reactions: vote i → message i % R, user base + i // R."""
    from bot.events import Reaction

    r = len(msg_ids)
    return [Reaction("bench", "c", msg_ids[i % r], str(user_base + i // r), UP if (i * 7919) % 3 else DOWN, True)
            for i in range(n)]


async def core_phase(core, rs, concurrency: int) -> tuple[float, list[str]]:
    outcomes: list[str] = []

    async def worker(part):
        for r in part:
            outcomes.append(await core.on_reaction(r))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(rs[k::concurrency]) for k in range(concurrency)))
    return time.perf_counter() - t0, outcomes


async def store_phase(store, rid: dict[str, int], rs) -> float:
    t0 = time.perf_counter()
    for r in rs:
        await store.set_vote(rid[r.message_id], r.user_id, r.emoji, 1.0 if r.emoji == UP else -1.0)
    return time.perf_counter() - t0


async def interleaved(core, store, msg_ids: list[str], n: int, blocks: int) -> dict:
    """The core one at a time and the store.set_vote baseline, n votes each, in alternating
    blocks (the table grows as they go, and the machine's load changes: both see the same)."""
    rid = {m: await store.reply_for_message("bench", m) for m in msg_ids}
    core_rs, store_rs = reactions(msg_ids, n, USER0), reactions(msg_ids, n, USER0 + 10 ** 9)
    core_s = store_s = 0.0
    outs: list[str] = []
    for b in range(blocks):
        part = slice(b * n // blocks, (b + 1) * n // blocks)
        secs, o = await core_phase(core, core_rs[part], 1)
        core_s, outs = core_s + secs, outs + o
        store_s += await store_phase(store, rid, store_rs[part])
    counted = (await store.counts())["votes"]
    return {"core, one at a time": {"seconds": common.rnd(core_s), "votes_per_s": common.rnd(n / core_s, 1),
                                    "added": outs.count("added"), "counted": counted},
            "store.set_vote (baseline)": {"seconds": common.rnd(store_s), "votes_per_s": common.rnd(n / store_s, 1),
                                          "added": n, "counted": counted}}


def plain_sqlite(path: Path, rs) -> tuple[float, int, int]:
    """(seconds, rows, file growth in bytes) for one INSERT + commit per vote."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("CREATE TABLE votes (reply_id INTEGER NOT NULL, user_id TEXT NOT NULL, emoji TEXT NOT NULL, "
               "value REAL NOT NULL, created_at REAL NOT NULL, PRIMARY KEY (reply_id, user_id, emoji))")
    db.execute("CREATE INDEX votes_user ON votes (user_id)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db_bytes(path)
    t0 = time.perf_counter()
    for r in rs:
        db.execute("BEGIN")
        db.execute("INSERT OR REPLACE INTO votes VALUES (?, ?, ?, ?, ?)",
                   (int(r.message_id[3:]), r.user_id, r.emoji, 1.0 if r.emoji == UP else -1.0, time.time()))
        db.execute("COMMIT")
    seconds = time.perf_counter() - t0
    rows = db.execute("SELECT COUNT(*) FROM votes").fetchone()[0]
    db.close()                                   # checkpoints the WAL into the file
    return seconds, rows, db_bytes(path) - before


async def run(args) -> dict:
    from bot.chat import ChatCore
    from bot.store import Store

    cfg = common.bench_config(args, common.temp_dir(NAME))
    rng = random.Random(args.seed)
    store = await Store.open(cfg.db_path)
    msg_ids = await seed_replies(store, args.reply_rows, rng)
    await store.close()
    size0 = db_bytes(cfg.db_path)
    store = await Store.open(cfg.db_path)
    core = ChatCore(cfg, store, None)            # on_reaction never touches the policy
    n = args.votes
    try:
        phases = await interleaved(core, store, msg_ids, n, blocks=10)
        secs, outs = await core_phase(core, reactions(msg_ids, n, USER0 + 2 * 10 ** 9), args.concurrency)
        phases[f"core, {args.concurrency} at once"] = {"seconds": common.rnd(secs), "votes_per_s": common.rnd(n / secs, 1),
                                                       "added": outs.count("added"),
                                                       "counted": (await store.counts())["votes"]}
        expected = 3 * n
    finally:
        await store.close()
    growth = db_bytes(cfg.db_path) - size0
    psecs, prows, pgrowth = plain_sqlite(Path(cfg.data_dir) / "plain.sqlite3", reactions(msg_ids, n, USER0))
    phases["plain sqlite3 (baseline)"] = {"seconds": common.rnd(psecs), "votes_per_s": common.rnd(n / psecs, 1),
                                          "added": n, "counted": prows}
    core_one = phases["core, one at a time"]["votes_per_s"]
    return {
        "settings": {"engine": "n/a (no model)"}, "votes_per_phase": n, "replies": args.reply_rows, "phases": phases,
        "expected_votes_in_store": expected, "votes_in_store": phases[f"core, {args.concurrency} at once"]["counted"],
        "db_growth_bytes": growth, "bytes_per_vote": common.rnd(growth / expected, 1),
        "mib_per_million_votes": common.rnd(growth / expected * 1e6 / 2 ** 20, 1),
        "plain_bytes_per_vote": common.rnd(pgrowth / n, 1),
        "plain_mib_per_million_votes": common.rnd(pgrowth / n * 1e6 / 2 ** 20, 1),
        "ratio": {"core one at a time / plain sqlite3": common.ratio(core_one,
                                                                    phases["plain sqlite3 (baseline)"]["votes_per_s"]),
                  "core one at a time / store.set_vote": common.ratio(
                      core_one, phases["store.set_vote (baseline)"]["votes_per_s"])},
        "checks": {
            "every reaction was stored as a vote": all(p["added"] == n for p in phases.values()),
            "the store holds exactly the votes sent": phases[f"core, {args.concurrency} at once"]["counted"] == expected,
            "each phase's count adds up": [p["counted"] for p in phases.values()][:3] == [2 * n, 2 * n, 3 * n],
            "plain sqlite3 holds its votes": prows == n,
        },
    }


def markdown(d: dict) -> str:
    plain = d["phases"]["plain sqlite3 (baseline)"]["votes_per_s"]
    rows = [[name, p["votes_per_s"], common.ratio(p["votes_per_s"], plain), p["added"], p["counted"]]
            for name, p in d["phases"].items()]
    return "\n".join([
        common.header(NAME, "reaction ingestion", d),
        f"{d['votes_per_phase']} votes per phase on {d['replies']} replies.\n",
        common.table(["phase", "votes/s", "vs plain sqlite3", "added", "votes in the table after"], rows),
        "",
        f"Database size: {d['bytes_per_vote']} bytes per vote = **{d['mib_per_million_votes']} MiB per million votes** "
        f"(plain sqlite3, the same table: {d['plain_bytes_per_vote']} bytes, {d['plain_mib_per_million_votes']} MiB). "
        f"The store holds {d['votes_in_store']} of {d['expected_votes_in_store']} votes sent.",
    ])


def main(argv: list[str] | None = None) -> int:
    return common.main(NAME, build_parser(), run, markdown, argv)


if __name__ == "__main__":
    sys.exit(main())
