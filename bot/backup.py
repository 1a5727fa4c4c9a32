"""``python -m bot backup PATH``: a consistent copy of the database while the bot and the trainer run.

SQLite's online backup API copies the pages in steps. In WAL mode (the store always sets it)
the source connection first pins one read snapshot, so the copy is that one moment even while
people keep voting, the steps never restart, and the bot's writes are never blocked (WAL
readers don't block writers). The copy is written to a temp file next to PATH, checked with
``PRAGMA integrity_check``, switched to a single self-contained file (journal_mode DELETE),
fsynced and renamed over PATH: PATH is the old backup or the new one, never half of one.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PAGES_PER_STEP = 1024          # 4 MiB a step at SQLite's default page size


class BackupError(Exception):
    """The backup was refused or failed; the message is one line naming the fix."""


@dataclass
class BackupResult:
    path: Path
    size: int
    replies: int
    votes: int

    def line(self) -> str:
        return (f"backup written: {self.path} ({self.size / 2**20:.1f} MiB, {self.size:,} bytes; "
                f"{self.replies:,} replies, {self.votes:,} votes)")


def backup(db_path: Path, dest: Path, *, pages: int = PAGES_PER_STEP,
           progress: Callable[[int, int, int], object] | None = None) -> BackupResult:
    """Copy ``db_path`` to ``dest`` atomically; raises BackupError with one line on a refusal.
    ``progress(status, remaining, total)`` is called after each step, as sqlite3's backup does."""
    db_path, dest = Path(db_path).expanduser().absolute(), Path(dest).expanduser().absolute()
    _refuse_if_unsafe(db_path, dest)
    tmp = _temp_next_to(dest)
    try:
        _copy(db_path, tmp, pages, progress)
        replies, votes = _check_copy(tmp, dest)
        _fsync(tmp)
        os.replace(tmp, dest)
        _fsync(dest.parent)
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            leftover.unlink(missing_ok=True)
    return BackupResult(dest, dest.stat().st_size, replies, votes)


def _refuse_if_unsafe(db_path: Path, dest: Path) -> None:
    if not db_path.is_file():
        raise BackupError(f"cannot back up: the database {db_path} does not exist. Point data_dir in the config "
                          "(--config or $REACTLEARN_CONFIG) at the bot's data folder.")
    if dest.is_dir():
        raise BackupError(f"cannot back up: {dest} is a folder. Give a file path, e.g. {dest / 'reactlearn.sqlite3'}.")
    if dest.exists() and os.path.samefile(dest, db_path):
        raise BackupError(f"cannot back up: {dest} is the live database itself. Give another PATH.")


def _temp_next_to(dest: Path) -> Path:
    """An empty temp file in dest's folder (same file system, so os.replace is atomic)."""
    try:
        fd, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    except OSError as e:
        raise BackupError(f"cannot back up: the folder {dest.parent} can't be written ({e.strerror or e}). "
                          "Choose a PATH in an existing, writable folder.") from None
    os.close(fd)
    return Path(name)


def _copy(db_path: Path, tmp: Path, pages: int, progress: Callable | None) -> None:
    # mode=rw: never creates a database where there was none
    src = sqlite3.connect(f"{db_path.as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=10)
    try:
        if src.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
            src.execute("BEGIN")       # pin one snapshot for every step (a read: writers go on)
            src.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        dst = sqlite3.connect(tmp, isolation_level=None)
        try:
            src.backup(dst, pages=pages, progress=progress)
            dst.execute("PRAGMA journal_mode = DELETE")     # one self-contained file, no -wal beside it
        finally:
            dst.close()
    finally:
        src.close()                    # ends the read transaction


def _check_copy(tmp: Path, dest: Path) -> tuple[int, int]:
    """integrity_check on the copy, then its numbers of replies and votes."""
    db = sqlite3.connect(tmp)
    try:
        verdict = db.execute("PRAGMA integrity_check(1)").fetchone()[0]
        if verdict != "ok":
            raise BackupError(f"backup failed: the copy does not pass integrity_check ({verdict}); "
                              f"{dest} was left as it was. Check the database with sqlite3's .recover.")
        return tuple(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in ("replies", "votes"))
    finally:
        db.close()


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries (where the OS allows opening a folder)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cli(db_path: Path, dest: Path) -> tuple[int, str]:
    """(exit code, the one line to print): 0 and what was written, or 2 and why not."""
    try:
        return 0, backup(db_path, dest).line()
    except BackupError as e:
        return 2, str(e)
    except (sqlite3.Error, OSError) as e:
        return 2, f"backup failed: {type(e).__name__}: {e}. {Path(dest).expanduser()} was left as it was."
