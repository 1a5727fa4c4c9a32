"""Every SQL statement of the project, behind one small async class.

Two processes share the database file (the bot and the trainer), so it runs in WAL
mode with a busy timeout, foreign keys on, and short transactions. The schema is
built by numbered migrations (``MIGRATIONS[i]`` takes the schema from version i to
i + 1); ``Store.open`` applies whatever is missing, each in its own transaction.

Token ids and logprobs are stored as JSON arrays: a reply has ~100 of each, the
trainer reads them back exactly, and the file stays readable with the sqlite3 CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable

import aiosqlite

from bot.config import SYNCHRONOUS

# aiosqlite logs every call at DEBUG with its SQL and parameters (people's messages, ids): never
# let those reach a log, whatever level the root logger is set to.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

MIGRATIONS: list[str] = [
    # 1: the chat log, the recorded generations, votes, train requests, model versions
    """
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        platform_message_id TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        author_id TEXT NOT NULL,
        author_name TEXT NOT NULL DEFAULT '',
        text TEXT NOT NULL,
        created_at REAL NOT NULL,
        UNIQUE (platform, platform_message_id)
    );
    CREATE INDEX messages_author ON messages (platform, author_id);

    CREATE TABLE model_versions (
        id INTEGER PRIMARY KEY,            -- version number; 0 is the base model
        parent INTEGER REFERENCES model_versions (id),
        path TEXT,                         -- folder of the published version; NULL for 0
        sha256 TEXT,                       -- of the weights file
        status TEXT NOT NULL CHECK (status IN ('published', 'rejected')),
        reason TEXT NOT NULL DEFAULT '',   -- why it was rejected
        metrics TEXT NOT NULL DEFAULT '{}',-- JSON
        created_at REAL NOT NULL
    );
    INSERT INTO model_versions (id, parent, path, sha256, status, created_at)
        VALUES (0, NULL, NULL, NULL, 'published', 0);

    CREATE TABLE replies (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        message_id INTEGER REFERENCES messages (id) ON DELETE CASCADE,
        version INTEGER NOT NULL REFERENCES model_versions (id),
        text TEXT NOT NULL,
        prompt_ids TEXT NOT NULL,          -- JSON [int]: the exact prompt the model saw
        output_ids TEXT NOT NULL,          -- JSON [int]: the sampled tokens
        logprobs TEXT NOT NULL,            -- JSON [float]: log p(token) at the sampling temperature
        temperature REAL NOT NULL,
        top_p REAL NOT NULL,
        max_new_tokens INTEGER NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX replies_created ON replies (created_at);

    -- A reply may be split over several platform messages; a reaction on any part counts.
    CREATE TABLE reply_messages (
        platform TEXT NOT NULL,
        platform_message_id TEXT NOT NULL,
        reply_id INTEGER NOT NULL REFERENCES replies (id) ON DELETE CASCADE,
        PRIMARY KEY (platform, platform_message_id)
    );

    CREATE TABLE votes (
        reply_id INTEGER NOT NULL REFERENCES replies (id) ON DELETE CASCADE,
        user_id TEXT NOT NULL,
        emoji TEXT NOT NULL,               -- canonical emoji
        value REAL NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (reply_id, user_id, emoji)
    );
    CREATE INDEX votes_user ON votes (user_id);

    CREATE TABLE train_requests (
        id INTEGER PRIMARY KEY,
        platform TEXT NOT NULL,
        channel_id TEXT NOT NULL,
        requested_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        status TEXT NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'running', 'done', 'failed')),
        result TEXT NOT NULL DEFAULT '',
        finished_at REAL,
        notified_at REAL
    );

    CREATE TABLE rounds (
        id INTEGER PRIMARY KEY,
        request_id INTEGER REFERENCES train_requests (id) ON DELETE SET NULL,
        version INTEGER REFERENCES model_versions (id),
        parent INTEGER,
        started_at REAL NOT NULL,
        finished_at REAL,
        n_replies INTEGER NOT NULL DEFAULT 0,
        mean_reward REAL,
        kl REAL,
        loss REAL,
        status TEXT NOT NULL DEFAULT 'running'
            CHECK (status IN ('running', 'published', 'rejected', 'skipped', 'failed')),
        reason TEXT NOT NULL DEFAULT ''
    );

    -- Small shared facts: active_version, trainer_heartbeat, serving_version, serving_error.
    CREATE TABLE state (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    INSERT INTO state (key, value) VALUES ('active_version', '0');
    """,
    # 2: indexes for reconciling votes (a reply's platform messages), retention (old messages)
    # and /forget's "later replies in the channel" rule (for replies recorded before 3)
    """
    CREATE INDEX reply_messages_reply ON reply_messages (reply_id);
    CREATE INDEX replies_channel ON replies (platform, channel_id, created_at);
    CREATE INDEX messages_created ON messages (created_at);
    """,
    # 3: whose words each reply's prompt held, so /forget deletes exactly those replies. Written
    # with the reply (Store.add_reply); a reply recorded before this migration has no rows (and
    # /forget falls back to its channel rule for it), as has one whose context an adapter could
    # not attribute: user_id '' stands for "someone it could not name" and means the same.
    """
    CREATE TABLE reply_context_authors (
        reply_id INTEGER NOT NULL REFERENCES replies (id) ON DELETE CASCADE,
        platform TEXT NOT NULL,
        user_id TEXT NOT NULL,
        PRIMARY KEY (reply_id, platform, user_id)
    );
    CREATE INDEX reply_context_authors_user ON reply_context_authors (platform, user_id);
    """,
]

# What a write raises when the disk is full (SQLITE_FULL), the file or its folder is read-only
# (SQLITE_READONLY), or the disk fails (SQLITE_IOERR). Caught by name where an outage is handled
# apart from other failures: the trainer's loop pass and the bot's background poll (one error per
# outage), and the vote path (ChatCore._cast keeps the change for flush_votes).
STORE_ERRORS = (sqlite3.Error, OSError)
# The trainer explores the distinct prompts of the newest replies: ``recent_prompts(n)`` reads
# the newest n x EXPLORE_READ_FACTOR replies, rated or not. Retention never deletes the newest
# RETENTION_KEEP_NEWEST replies, so trainer.explore_prompts is capped at their quotient
# (trainer/config.py; 8 x 4 replies by default), and what the trainer reads is always there.
EXPLORE_READ_FACTOR = 4
RETENTION_KEEP_NEWEST = 1000
MAX_EXPLORE_PROMPTS = RETENTION_KEEP_NEWEST // EXPLORE_READ_FACTOR
RETENTION_BATCH = 1000       # rows prune_before deletes per transaction (the write lock is held that long)


# The reward rule in SQL, said once (bot/rewards.py says it in Python; tests/test_store.py
# keeps the two equal): a user's vote on a reply is the sum of their emoji values clipped to
# [-1, 1] (USER_VOTE_SQL, over one user's votes rows); a reply's reward is the mean over its
# voters. Both read the replies row as ``r``.
USER_VOTE_SQL = "MAX(-1.0, MIN(1.0, SUM(value)))"
REWARD_SQL = (f"(SELECT AVG(uv) FROM (SELECT {USER_VOTE_SQL} AS uv FROM votes v"
              " WHERE v.reply_id = r.id GROUP BY user_id))")
RATED_SQL = "EXISTS (SELECT 1 FROM votes v WHERE v.reply_id = r.id)"


@dataclass
class ReplyRecord:
    """One generated reply with everything the trainer needs to learn from it."""

    id: int
    platform: str
    channel_id: str
    version: int
    text: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[float]
    temperature: float
    top_p: float
    created_at: float
    reward: float | None = None   # mean of the per-user values; None when unrated
    n_voters: int = 0


@dataclass
class Version:
    id: int
    parent: int | None
    path: str | None
    sha256: str | None
    status: str
    reason: str
    metrics: dict
    created_at: float


class Store:
    """Async access to the SQLite file. Open with ``await Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, path: Path):
        self.db = db
        self.path = path
        # One connection serves many coroutines: a write from one must not land inside another's
        # open transaction (it would commit or roll back with it), so writes take turns.
        self._writing = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, *, busy_timeout_ms: int = 10_000, synchronous: str = "NORMAL") -> "Store":
        """``synchronous`` is PRAGMA synchronous for this connection (``storage.synchronous``):
        "NORMAL" (in WAL mode a commit can be lost on power loss, never corrupted) or "FULL"
        (each commit is on the disk before it returns)."""
        if synchronous.upper() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}, got {synchronous!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        connecting = aiosqlite.connect(path, isolation_level=None)  # we issue BEGIN/COMMIT ourselves
        try:
            db = await connecting
        except BaseException:
            # A failed connect stops aiosqlite's (non-daemon) thread without waiting for it: wait
            # here, while the event loop runs, or it dies later printing "Event loop is closed".
            thread = getattr(connecting, "_thread", None)
            if thread is not None and thread.is_alive():
                await asyncio.to_thread(thread.join, 5)
            raise
        db.row_factory = aiosqlite.Row
        store = cls(db, path)
        try:
            await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await db.execute("PRAGMA foreign_keys = ON")
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            await store.migrate()
        except BaseException:
            await db.close()
            raise
        return store

    async def close(self) -> None:
        await self.db.close()

    # -- schema ---------------------------------------------------------------

    async def schema_version(self) -> int:
        await self.db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = await self._one("SELECT MAX(version) AS v FROM schema_version")
        return row["v"] or 0

    async def migrate(self) -> int:
        """Apply the missing migrations in order; returns the new schema version."""
        current = await self.schema_version()
        if current > len(MIGRATIONS):
            raise RuntimeError(f"database {self.path} has schema {current}, newer than this code "
                               f"({len(MIGRATIONS)}). Upgrade reactlearn.")
        for number in range(current + 1, len(MIGRATIONS) + 1):
            # executescript commits first, so run each statement inside our own transaction
            async with self.transaction():
                for stmt in _statements(MIGRATIONS[number - 1]):
                    await self.db.execute(stmt)
                await self.db.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
        return len(MIGRATIONS)

    async def tables(self) -> dict[str, list[str]]:
        """Table name → column names (for tests and `status`)."""
        out = {}
        async with self.db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name") as cur:
            names = [r["name"] for r in await cur.fetchall()]
        for name in names:
            async with self.db.execute(f"PRAGMA table_info({name})") as cur:
                out[name] = [r["name"] for r in await cur.fetchall()]
        return out

    # -- helpers --------------------------------------------------------------

    @asynccontextmanager
    async def transaction(self):
        """Several statements as one write transaction: all of them, or none on any error.
        IMMEDIATE takes the write lock at the start, so two processes never deadlock."""
        async with self._writing:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield
                await self.db.execute("COMMIT")
            except BaseException:
                # SQLite has already rolled back after some errors (SQLITE_FULL: a full disk);
                # a second ROLLBACK would hide the real error behind "no transaction is active".
                if self.db.in_transaction:
                    await self.db.execute("ROLLBACK")
                raise

    # Reads fetch everything in one call: a cursor left open between execute and fetch keeps a
    # read snapshot that a write from another coroutine on this connection, after the trainer
    # committed, can't upgrade: SQLite then answers "database is locked" at once, busy timeout
    # or not (seen in bench/swap.py).

    async def _one(self, sql: str, args: Iterable[Any] = ()) -> aiosqlite.Row | None:
        rows = await self.db.execute_fetchall(sql, tuple(args))
        return rows[0] if rows else None

    async def _all(self, sql: str, args: Iterable[Any] = ()) -> list[aiosqlite.Row]:
        return list(await self.db.execute_fetchall(sql, tuple(args)))

    async def _write(self, sql: str, args: Iterable[Any] = ()) -> int:
        """One statement in its own short transaction; returns lastrowid (or rowcount for updates)."""
        async with self._writing, self.db.execute(sql, tuple(args)) as cur:
            return cur.lastrowid if sql.lstrip().upper().startswith("INSERT") else cur.rowcount

    # -- messages and replies -------------------------------------------------

    async def add_message(self, platform: str, platform_message_id: str, channel_id: str,
                          author_id: str, author_name: str, text: str, created_at: float | None = None) -> int:
        """Record an incoming message (idempotent on the platform id); returns its row id."""
        await self._write(
            "INSERT OR IGNORE INTO messages (platform, platform_message_id, channel_id, author_id, author_name, text, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (platform, platform_message_id, channel_id, author_id, author_name, text, created_at or time.time()))
        row = await self._one("SELECT id FROM messages WHERE platform = ? AND platform_message_id = ?",
                              (platform, platform_message_id))
        return row["id"]

    async def add_reply(self, platform: str, channel_id: str, message_id: int | None, version: int, text: str,
                        prompt_ids: list[int], output_ids: list[int], logprobs: list[float],
                        temperature: float, top_p: float, max_new_tokens: int,
                        created_at: float | None = None, context_authors: Iterable[str] | None = None) -> int:
        """Record a generated reply; returns its id. ``context_authors``: the ids (on ``platform``)
        of everyone whose words its prompt may hold (the asker, the authors of the context),
        written in the same transaction (``reply_context_authors``) for ``forget_user``; ``''``
        for an author nobody could name. None (not recorded) makes ``forget_user`` treat the
        reply like one recorded before that table: by its channel rule."""
        async with self.transaction():
            cur = await self.db.execute(
                "INSERT INTO replies (platform, channel_id, message_id, version, text, prompt_ids, output_ids,"
                " logprobs, temperature, top_p, max_new_tokens, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (platform, channel_id, message_id, version, text, json.dumps(prompt_ids), json.dumps(output_ids),
                 json.dumps([round(x, 6) for x in logprobs]), temperature, top_p, max_new_tokens,
                 created_at or time.time()))
            reply_id = cur.lastrowid
            await self.db.executemany(
                "INSERT OR IGNORE INTO reply_context_authors (reply_id, platform, user_id) VALUES (?, ?, ?)",
                [(reply_id, platform, str(u)) for u in sorted({str(u) for u in context_authors or ()})])
        return reply_id

    async def reply_askers(self, platform: str, platform_message_ids: Iterable[str]) -> list[str]:
        """The authors of the messages that the bot's replies posted as ``platform_message_ids``
        answered (sorted, each once). An id that resolves to no one (a reply since deleted by
        retention or ``/forget``, a notice, a reply whose message is gone) adds ``''``: someone
        unknown, so ``forget_user`` judges the reply recorded with it by its channel."""
        ids = sorted({str(i) for i in platform_message_ids})
        rows = await self._all(
            "SELECT rm.platform_message_id AS pid, m.author_id FROM reply_messages rm"
            " JOIN replies r ON r.id = rm.reply_id JOIN messages m ON m.id = r.message_id"
            " WHERE rm.platform = ? AND m.platform = ? AND rm.platform_message_id IN (SELECT value FROM json_each(?))",
            (platform, platform, json.dumps(ids)))
        authors = {r["author_id"] for r in rows}
        if set(ids) - {r["pid"] for r in rows}:
            authors.add("")
        return sorted(authors)

    async def link_reply_message(self, reply_id: int, platform: str, platform_message_id: str) -> None:
        await self._write("INSERT OR REPLACE INTO reply_messages (platform, platform_message_id, reply_id) VALUES (?, ?, ?)",
                          (platform, platform_message_id, reply_id))

    async def reply_for_message(self, platform: str, platform_message_id: str) -> int | None:
        row = await self._one("SELECT reply_id FROM reply_messages WHERE platform = ? AND platform_message_id = ?",
                              (platform, platform_message_id))
        return row["reply_id"] if row else None

    async def get_reply(self, reply_id: int) -> ReplyRecord | None:
        rows = await self._replies("WHERE r.id = ?", (reply_id,))
        return rows[0] if rows else None

    async def latest_reply_id(self, platform: str, channel_id: str) -> int | None:
        row = await self._one("SELECT MAX(id) AS id FROM replies WHERE platform = ? AND channel_id = ?",
                              (platform, channel_id))
        return row["id"]

    async def _replies(self, where: str, args: Iterable[Any], order: str = "ORDER BY r.id") -> list[ReplyRecord]:
        rows = await self._all(
            f"SELECT r.*, {REWARD_SQL} AS reward,"
            " (SELECT COUNT(DISTINCT user_id) FROM votes v WHERE v.reply_id = r.id) AS n_voters"
            f" FROM replies r {where} {order}", args)
        return [ReplyRecord(id=r["id"], platform=r["platform"], channel_id=r["channel_id"], version=r["version"],
                            text=r["text"], prompt_ids=json.loads(r["prompt_ids"]),
                            output_ids=json.loads(r["output_ids"]), logprobs=json.loads(r["logprobs"]),
                            temperature=r["temperature"], top_p=r["top_p"], created_at=r["created_at"],
                            reward=r["reward"], n_voters=r["n_voters"]) for r in rows]

    async def rated_replies(self, settled_before: float, since_id: int = 0, limit: int = 10_000) -> list[ReplyRecord]:
        """Replies with at least one vote, created before ``settled_before``, newest ``limit`` of them."""
        rows = await self._replies(f"WHERE r.created_at <= ? AND r.id > ? AND {RATED_SQL}",
                                   (settled_before, since_id, limit), order="ORDER BY r.id DESC LIMIT ?")
        return rows[::-1]

    async def recent_prompts(self, limit: int) -> list[list[int]]:
        """The prompts of the newest replies, rated or not, distinct, newest first: at most ``limit``."""
        rows = await self._all("SELECT prompt_ids FROM replies ORDER BY id DESC LIMIT ?",
                               (limit * EXPLORE_READ_FACTOR,))
        seen: dict[str, list[int]] = {}
        for r in rows:
            if r["prompt_ids"] not in seen and len(seen) < limit:
                seen[r["prompt_ids"]] = json.loads(r["prompt_ids"])
        return [p for p in seen.values() if p]

    async def count_rated_since(self, after_reply_id: int, settled_before: float) -> int:
        row = await self._one(f"SELECT COUNT(*) AS n FROM replies r WHERE r.id > ? AND r.created_at <= ? AND {RATED_SQL}",
                              (after_reply_id, settled_before))
        return row["n"]

    # -- votes ----------------------------------------------------------------

    async def set_vote(self, reply_id: int, user_id: str, emoji: str, value: float) -> None:
        await self._write("INSERT OR REPLACE INTO votes (reply_id, user_id, emoji, value, created_at) VALUES (?, ?, ?, ?, ?)",
                          (reply_id, user_id, emoji, value, time.time()))

    async def remove_vote(self, reply_id: int, user_id: str, emoji: str) -> bool:
        return await self._write("DELETE FROM votes WHERE reply_id = ? AND user_id = ? AND emoji = ?",
                                 (reply_id, user_id, emoji)) > 0

    async def user_votes(self, reply_ids: Iterable[int]) -> dict[int, list[tuple[str, float]]]:
        """reply id → [(user, vote)]: each user's emoji values on the reply summed and clipped to
        [-1, 1], as REWARD_SQL counts them (the reward is the mean of these)."""
        ids, out = list(reply_ids), {}
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            rows = await self._all(
                f"SELECT reply_id, user_id, {USER_VOTE_SQL} AS vote FROM votes"
                f" WHERE reply_id IN ({','.join('?' * len(chunk))}) GROUP BY reply_id, user_id ORDER BY reply_id, user_id",
                chunk)
            for r in rows:
                out.setdefault(r["reply_id"], []).append((r["user_id"], float(r["vote"])))
        return out

    async def vote_values(self) -> dict[float, int]:
        """Emoji value → how many vote rows hold it (for /metrics)."""
        rows = await self._all("SELECT value, COUNT(*) AS n FROM votes GROUP BY value ORDER BY value")
        return {float(r["value"]): int(r["n"]) for r in rows}

    async def votes_for(self, reply_id: int) -> list[tuple[str, str, float]]:
        rows = await self._all("SELECT user_id, emoji, value FROM votes WHERE reply_id = ? ORDER BY user_id, emoji",
                               (reply_id,))
        return [(r["user_id"], r["emoji"], r["value"]) for r in rows]

    async def recent_reply_messages(self, platform: str, since: float) -> list[tuple[int, str, list[str]]]:
        """(reply id, channel, its platform message ids) of every reply on ``platform`` created at
        or after ``since`` that was sent, oldest first: what reconciling votes reads back."""
        rows = await self._all(
            "SELECT r.id, r.channel_id, m.platform_message_id FROM replies r JOIN reply_messages m ON m.reply_id = r.id"
            " WHERE r.platform = ? AND m.platform = ? AND r.created_at >= ? ORDER BY r.id, m.platform_message_id",
            (platform, platform, since))
        out: dict[int, tuple[int, str, list[str]]] = {}
        for r in rows:
            out.setdefault(r["id"], (r["id"], r["channel_id"], []))[2].append(r["platform_message_id"])
        return list(out.values())

    async def replace_votes(self, reply_id: int, votes: dict[tuple[str, str], float],
                            older_than: float, leave: Collection[tuple[str, str]] = ()) -> tuple[int, int]:
        """Make a reply's votes ``votes`` ((user, canonical emoji) → value), in one transaction:
        missing ones are added, changed values set, and stored ones not in ``votes`` deleted,
        except those written at or after ``older_than`` (a live reaction event that arrived
        after the platform's list was read is newer than the list). The (user, emoji) keys in
        ``leave`` (changed live while the list was read, a removal too) are neither written nor
        deleted. Returns (added or changed, removed)."""
        async with self.transaction():
            rows = await self.db.execute_fetchall(
                "SELECT user_id, emoji, value, created_at FROM votes WHERE reply_id = ?", (reply_id,))
            have = {(r["user_id"], r["emoji"]): (r["value"], r["created_at"]) for r in rows}
            gone = [key for key, (_, at) in have.items() if key not in votes and at < older_than and key not in leave]
            new = [(key, value) for key, value in votes.items()
                   if key not in leave and (key not in have or have[key][0] != value)]
            for user, emoji in gone:
                await self.db.execute("DELETE FROM votes WHERE reply_id = ? AND user_id = ? AND emoji = ?",
                                      (reply_id, user, emoji))
            now = time.time()
            for (user, emoji), value in new:
                await self.db.execute("INSERT OR REPLACE INTO votes (reply_id, user_id, emoji, value, created_at)"
                                      " VALUES (?, ?, ?, ?, ?)", (reply_id, user, emoji, value, now))
        return len(new), len(gone)

    # -- versions -------------------------------------------------------------

    async def active_version(self) -> int:
        return int(await self.get_state("active_version", "0"))

    async def get_version(self, version: int) -> Version | None:
        r = await self._one("SELECT * FROM model_versions WHERE id = ?", (version,))
        return _version(r) if r else None

    async def versions(self) -> list[Version]:
        return [_version(r) for r in await self._all("SELECT * FROM model_versions ORDER BY id")]

    async def next_version_id(self) -> int:
        row = await self._one("SELECT MAX(id) AS v FROM model_versions")
        return row["v"] + 1

    async def add_version(self, version: int, parent: int | None, path: str | None, sha256: str | None,
                          status: str, metrics: dict, reason: str = "", activate: bool = False) -> None:
        """Register a version and (optionally) make it active, in one transaction."""
        async with self.transaction():
            await self.db.execute(
                "INSERT INTO model_versions (id, parent, path, sha256, status, reason, metrics, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (version, parent, path, sha256, status, reason, json.dumps(metrics), time.time()))
            if activate:
                await self.db.execute("UPDATE state SET value = ? WHERE key = 'active_version'", (str(version),))

    async def activate(self, version: int) -> Version:
        """Make a published version active. Raises ValueError for unknown or rejected versions."""
        v = await self.get_version(version)
        if v is None:
            raise ValueError(f"version {version} does not exist")
        if v.status != "published":
            raise ValueError(f"version {version} was rejected ({v.reason or 'no reason recorded'}) and cannot be activated")
        await self.set_state("active_version", str(version))
        return v

    async def rating_by_version(self) -> dict[int, tuple[int, float | None]]:
        """version → (rated replies, like rate = share of rated replies with reward > 0)."""
        rows = await self._all(
            "SELECT version, COUNT(*) AS n, AVG(CASE WHEN reward > 0 THEN 1.0 ELSE 0.0 END) AS like_rate FROM ("
            f"  SELECT r.version, {REWARD_SQL} AS reward FROM replies r WHERE {RATED_SQL}) GROUP BY version")
        return {r["version"]: (r["n"], r["like_rate"]) for r in rows}

    async def newest_rated_channel(self, version: int) -> tuple[str, str] | None:
        """(platform, channel) of ``version``'s newest rated reply, None when it has none."""
        row = await self._one(f"SELECT platform, channel_id FROM replies r WHERE version = ? AND {RATED_SQL} "
                              "ORDER BY id DESC LIMIT 1", (version,))
        return (row["platform"], row["channel_id"]) if row else None

    # -- train requests and rounds ------------------------------------------

    async def add_train_request(self, platform: str, channel_id: str, requested_by: str) -> int:
        return await self._write("INSERT INTO train_requests (platform, channel_id, requested_by, created_at) VALUES (?, ?, ?, ?)",
                                 (platform, channel_id, requested_by, time.time()))

    async def train_requests(self, status: str | None = None) -> list[dict]:
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        return [dict(r) for r in await self._all(f"SELECT * FROM train_requests {where} ORDER BY id", args)]

    async def set_request_status(self, request_id: int, status: str, result: str = "") -> None:
        finished = time.time() if status in ("done", "failed") else None
        await self._write("UPDATE train_requests SET status = ?, result = ?, finished_at = ? WHERE id = ?",
                          (status, result, finished, request_id))

    async def unnotified_results(self) -> list[dict]:
        return [dict(r) for r in await self._all(
            "SELECT * FROM train_requests WHERE status IN ('done', 'failed') AND notified_at IS NULL ORDER BY id")]

    async def mark_notified(self, request_id: int) -> None:
        await self._write("UPDATE train_requests SET notified_at = ? WHERE id = ?", (time.time(), request_id))

    async def start_round(self, request_id: int | None, parent: int) -> int:
        return await self._write("INSERT INTO rounds (request_id, parent, started_at) VALUES (?, ?, ?)",
                                 (request_id, parent, time.time()))

    async def finish_round(self, round_id: int, *, status: str, version: int | None = None, n_replies: int = 0,
                           mean_reward: float | None = None, kl: float | None = None, loss: float | None = None,
                           reason: str = "") -> None:
        await self._write(
            "UPDATE rounds SET status = ?, version = ?, n_replies = ?, mean_reward = ?, kl = ?, loss = ?, reason = ?,"
            " finished_at = ? WHERE id = ?",
            (status, version, n_replies, mean_reward, kl, loss, reason, time.time(), round_id))

    async def fail_unfinished_rounds(self, reason: str) -> int:
        """Close rounds left 'running' by a trainer that died; returns how many."""
        return await self._write("UPDATE rounds SET status = 'failed', reason = ?, finished_at = ? WHERE status = 'running'",
                                 (reason, time.time()))

    async def rounds(self) -> list[dict]:
        return [dict(r) for r in await self._all("SELECT * FROM rounds ORDER BY id")]

    async def round_statuses(self) -> dict[str, int]:
        """Round status → how many rounds ended (or are running) with it (for /metrics)."""
        rows = await self._all("SELECT status, COUNT(*) AS n FROM rounds GROUP BY status")
        return {r["status"]: int(r["n"]) for r in rows}

    async def last_round(self, status: str) -> dict | None:
        """The newest round with this status, or None."""
        row = await self._one("SELECT * FROM rounds WHERE status = ? ORDER BY id DESC LIMIT 1", (status,))
        return dict(row) if row else None

    async def last_trained_reply_id(self) -> int:
        """Highest reply id used by a published round (stored in the version metrics)."""
        row = await self._one("SELECT MAX(json_extract(metrics, '$.last_reply_id')) AS v FROM model_versions")
        return int(row["v"] or 0)

    # -- state and counts -----------------------------------------------------

    async def get_state(self, key: str, default: str | None = None) -> str | None:
        row = await self._one("SELECT value FROM state WHERE key = ?", (key,))
        return row["value"] if row else default

    async def set_state(self, key: str, value: str) -> None:
        await self._write("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))

    async def counts(self) -> dict[str, int]:
        row = await self._one(
            "SELECT (SELECT COUNT(*) FROM messages) AS messages, (SELECT COUNT(*) FROM replies) AS replies,"
            " (SELECT COUNT(*) FROM votes) AS votes,"
            f" (SELECT COUNT(*) FROM replies r WHERE {RATED_SQL}) AS rated")
        return dict(row)

    # -- deletion -------------------------------------------------------------

    async def forget_user(self, platform: str, user_id: str) -> dict[str, Any]:
        """Delete everything stored of one person on one platform, in one transaction:

        * their messages;
        * every reply whose prompt may hold their words: the replies that answered them, and
          every reply whose recorded context authors (``reply_context_authors``, written by
          ``add_reply``) name them: their messages, or the bot's replies to them, were in its
          context. A reply without that record (stored before migration 3, or with an author no
          one could name) goes when it came later in a channel where they wrote, as it may
          hold their words. Votes on those replies go with them, and so do the replies'
          context-author rows, theirs among them (ON DELETE CASCADE);
        * their votes on any reply;
        * their id on the train requests they made (it becomes ``FORGOTTEN``).

        Returns the counts (``messages``, ``replies``, ``replies_to_others``, ``votes``: theirs,
        ``other_votes``: others' votes on the deleted replies), ``trained``: the published
        versions (ids, oldest first) made after their earliest deleted row, so whose training
        (rated replies, the reward model's votes, explored prompts, or a parent's weights) may
        have used it, and ``untouched``: the published versions made before it, newest first
        (0, the base model, last)."""
        who = {"platform": platform, "user": user_id}
        gone = f"SELECT r.id FROM replies r WHERE {_FORGET_REPLIES}"
        async with self.transaction():
            sizes = (await self.db.execute_fetchall(
                "SELECT (SELECT COUNT(*) FROM messages WHERE platform = :platform AND author_id = :user) AS messages,"
                f" (SELECT COUNT(*) FROM replies r WHERE {_FORGET_REPLIES}) AS replies,"
                f" (SELECT COUNT(*) FROM replies r WHERE {_FORGET_REPLIES} AND (r.message_id IS NULL OR"
                "   r.message_id NOT IN (SELECT id FROM messages WHERE platform = :platform AND author_id = :user)))"
                "   AS replies_to_others,"
                f" (SELECT COUNT(*) FROM votes WHERE user_id = :user AND reply_id IN ({_PLATFORM_REPLIES})) AS votes,"
                f" (SELECT COUNT(*) FROM votes WHERE user_id != :user AND reply_id IN ({gone})) AS other_votes,"
                " (SELECT MIN(t) FROM ("
                "   SELECT MIN(created_at) AS t FROM messages WHERE platform = :platform AND author_id = :user"
                f"  UNION ALL SELECT MIN(r.created_at) FROM replies r WHERE {_FORGET_REPLIES}"
                f"  UNION ALL SELECT MIN(created_at) FROM votes WHERE user_id = :user AND reply_id IN ({_PLATFORM_REPLIES})"
                " )) AS earliest", who))[0]
            out: dict[str, Any] = {k: sizes[k] for k in ("messages", "replies", "replies_to_others", "votes",
                                                         "other_votes")}
            await self.db.execute(f"DELETE FROM votes WHERE user_id = :user AND reply_id IN ({_PLATFORM_REPLIES})", who)
            await self.db.execute(f"DELETE FROM replies WHERE id IN ({gone})", who)
            await self.db.execute("DELETE FROM reply_context_authors WHERE platform = :platform AND user_id = :user",
                                  who)    # none is left (their replies went): said here, not assumed
            await self.db.execute("DELETE FROM messages WHERE platform = :platform AND author_id = :user", who)
            await self.db.execute("UPDATE train_requests SET requested_by = :gone"
                                  " WHERE platform = :platform AND requested_by = :user", {**who, "gone": FORGOTTEN})
            earliest = sizes["earliest"]
            published = await self._all("SELECT id, created_at FROM model_versions WHERE status = 'published'"
                                        " ORDER BY id")
        out["trained"] = [v["id"] for v in published
                          if earliest is not None and v["id"] > 0 and v["created_at"] >= earliest]
        out["untouched"] = [v["id"] for v in published[::-1] if v["id"] not in out["trained"]]
        return out

    # -- retention --------------------------------------------------------------

    async def prune_before(self, cutoff: float, keep_reply_ids: Iterable[int] = (),
                           keep_newest: int = RETENTION_KEEP_NEWEST, batch: int = RETENTION_BATCH) -> dict[str, int]:
        """Retention (``storage.retention_days``): delete what is older than ``cutoff`` and that
        nothing needs, ``batch`` rows per transaction (a backlog of months does not hold the write
        lock for long; the result is the same as in one go). Returns how many ``replies`` and
        ``messages`` were deleted and how many old messages were ``blanked``.

        * Replies created before ``cutoff`` that have no vote, are not among the newest
          ``keep_newest`` replies and are not in ``keep_reply_ids`` (the replies published
          versions name in their meta.json) are deleted. Rated replies are never deleted:
          they are the trainer's window, the reward model's data and every version's
          like-rate (``/status``, the auto-rollback).
        * Messages created before ``cutoff`` that ``forget_user`` no longer needs (no reply
          answered them, and no later reply in their channel lacks its record of context
          authors) are deleted. The others keep who wrote where and when, with the text and
          the name blanked, so ``/forget`` still finds the replies whose prompts may hold
          their words. (A reply with that record names its authors itself.)

        The registry, train requests, rounds and state are never touched."""
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch!r}")
        args = {"cutoff": cutoff, "keep": json.dumps(sorted({int(i) for i in keep_reply_ids})),
                "newest": int(keep_newest), "batch": int(batch)}
        held = ("EXISTS (SELECT 1 FROM replies r WHERE r.message_id = m.id) OR EXISTS (SELECT 1 FROM replies r"
                " WHERE r.platform = m.platform AND r.channel_id = m.channel_id AND r.created_at >= m.created_at"
                f" AND {_UNRECORDED})")
        # Deleting a row never changes whether another one is to go (the messages' rule reads the
        # replies, so it runs after them): in batches, the same rows go as in one go.
        replies = await self._in_batches(
            f"DELETE FROM replies WHERE id IN (SELECT r.id FROM replies r WHERE r.created_at < :cutoff AND NOT {RATED_SQL}"
            " AND r.id NOT IN (SELECT value FROM json_each(:keep))"
            " AND (:newest = 0 OR r.id < (SELECT MIN(id) FROM (SELECT id FROM replies ORDER BY id DESC LIMIT :newest)))"
            " ORDER BY r.id LIMIT :batch)", args)
        messages = await self._in_batches(
            "DELETE FROM messages WHERE id IN (SELECT m.id FROM messages m WHERE m.created_at < :cutoff"
            f" AND NOT ({held}) ORDER BY m.id LIMIT :batch)", args)
        blanked = await self._in_batches(
            "UPDATE messages SET text = '', author_name = '' WHERE id IN (SELECT id FROM messages"
            " WHERE created_at < :cutoff AND (text != '' OR author_name != '') ORDER BY id LIMIT :batch)", args)
        return {"replies": replies, "messages": messages, "blanked": blanked}

    async def _in_batches(self, sql: str, args: dict) -> int:
        """Run ``sql`` (which changes at most ``args["batch"]`` rows) in its own transaction until
        it changes fewer; returns how many rows it changed in all."""
        total = 0
        while True:
            async with self.transaction():
                n = (await self.db.execute(sql, args)).rowcount
            total += n
            if n < args["batch"]:
                return total


# A reply whose context authors are not (all) known: recorded before migration 3, without
# them, or with an author no one could name (''). /forget and retention judge it by its channel.
_UNRECORDED = ("(NOT EXISTS (SELECT 1 FROM reply_context_authors a WHERE a.reply_id = r.id)"
               " OR EXISTS (SELECT 1 FROM reply_context_authors a WHERE a.reply_id = r.id AND a.user_id = ''))")
# The replies /forget deletes (see Store.forget_user), as a condition on ``replies r`` with the
# named parameters :platform and :user.
_FORGET_REPLIES = (
    "r.platform = :platform AND (r.message_id IN (SELECT id FROM messages WHERE platform = :platform AND author_id = :user)"
    " OR r.id IN (SELECT reply_id FROM reply_context_authors WHERE platform = :platform AND user_id = :user)"
    f" OR ({_UNRECORDED} AND EXISTS (SELECT 1 FROM messages m WHERE m.platform = :platform AND m.author_id = :user"
    " AND m.channel_id = r.channel_id AND m.created_at <= r.created_at)))")
_PLATFORM_REPLIES = "SELECT id FROM replies WHERE platform = :platform"
FORGOTTEN = "(forgotten)"   # what a forgotten person's id becomes where a row must stay (train requests)


def _version(r: aiosqlite.Row) -> Version:
    return Version(id=r["id"], parent=r["parent"], path=r["path"], sha256=r["sha256"], status=r["status"],
                   reason=r["reason"], metrics=json.loads(r["metrics"]), created_at=r["created_at"])


def _statements(script: str) -> list[str]:
    """Split a migration into statements (no ';' inside our string literals)."""
    lines = [ln.split("--", 1)[0] for ln in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
