"""Process set-up shared by every entry point: the bot, the trainer, the simulation, the benchmarks.

    from bot import process
    process.quiet_threads()          # first, before anything imports torch
    ...
    process.setup_logging("INFO")    # one format everywhere; noisy libraries kept at WARNING
    return process.fail(f"config error: {e}")   # one clear line on stderr, exit code 2
    ...
    if __name__ == "__main__":
        process.run_main(main)       # sys.exit(main()) that no leftover thread can keep alive

Why ``quiet_threads``: the bot and the trainer share a small box. With OpenMP's default
busy-wait policy, two torch processes on 2 cores slowed each other down 10-30x in our
measurements (bench/round_time.py); with ``OMP_WAIT_POLICY=PASSIVE`` idle worker threads
sleep and cost almost nothing. OpenMP reads the variable once, when torch loads, so it must
be set before the first ``import torch``. A value already in the environment wins.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NoReturn

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("discord.gateway", "httpx", "urllib3", "filelock")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
EXIT_GRACE_S = 10.0          # how long exit_process waits for leftover threads before it leaves anyway


class StartupError(Exception):
    """The process can't start; ``str(e)`` is the one line to print: what failed, the setting or
    file, and the fix."""


def quiet_threads() -> None:
    """Idle OpenMP threads sleep instead of spinning. Call before torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def set_torch_threads(n: int) -> None:
    """``torch.set_num_threads(n)`` when n > 0; 0 keeps torch's default (one per core)."""
    if n:
        import torch

        torch.set_num_threads(n)


def setup_logging(level: str | int = "INFO", *, log_file: Path | None = None) -> None:
    """Logs go to stderr, or to ``log_file`` with only warnings on stderr (the console
    playground, where the terminal is the chat)."""
    if isinstance(level, str):
        level = getattr(logging, level.upper())
    handlers: list[logging.Handler] = []
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
        warnings = logging.StreamHandler(sys.stderr)
        warnings.setLevel(logging.WARNING)
        handlers.append(warnings)
    else:
        handlers.append(logging.StreamHandler(sys.stderr))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> int:
    """Print ``message`` as one line on stderr (a library's multi-line error joined) and return the
    exit code for ``sys.exit``."""
    print(" ".join(part.strip() for part in message.splitlines() if part.strip()), file=sys.stderr)
    return code


def port_arg(text: str) -> int:
    """argparse type of ``--health-port``: 0 (off) or a TCP port."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or a port from 1 to 65535, got {text!r}")
    return port


def writable_dir_problem(path: Path, setting: str) -> str:
    """'' when ``path`` exists or can be created and a file can be written in it; else one
    line naming the setting, the folder, what went wrong and the fix, in the words
    ``check_paths`` uses for what it finds without writing (``bot.config.folder_line``)."""
    from bot.config import folder_line, folder_problem

    path = Path(path).expanduser()
    why, fix = folder_problem(path), ""
    if not why:
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as e:
            why = f"{path} can't be created or written ({e.strerror or e})"
            if e.errno in DISK_FULL:
                fix = f"Free some space on that disk, or point {setting} at another one."
            elif e.errno in (errno.ENOTDIR, errno.EEXIST):
                fix = f"A file is in the way: point {setting} at a folder in the config."
    return f"cannot start: {folder_line(setting, why, fix)}" if why else ""


def disk_problem(e: BaseException) -> str:
    """'full' or 'read-only' when ``e`` (an OSError or a sqlite3 error) says so about the disk, else ''."""
    code = getattr(e, "errno", None) if isinstance(e, OSError) else None
    name = getattr(e, "sqlite_errorname", "")
    if code in DISK_FULL or name == "SQLITE_FULL":
        return "full"
    if code in NOT_WRITABLE or name.startswith("SQLITE_READONLY"):
        return "read-only"
    return ""


def disk_stop_line(who: str, e: BaseException, data_dir: str | Path) -> str:
    """'the bot stopped: the disk holding data_dir X is full (...). Free some space and start it again.'
    when ``e`` is a full or read-only disk (no traceback needed), else ''."""
    disk = disk_problem(e)
    if not disk:
        return ""
    fix = "Free some space" if disk == "full" else "Make it writable by this user"
    return f"the {who} stopped: the disk holding data_dir {data_dir} is {disk} ({e}). {fix} and start it again."


def store_problem(db_path: Path, e: BaseException) -> str:
    """One line for a database that can't be opened at start, naming the file and the fix."""
    name, disk = getattr(e, "sqlite_errorname", ""), disk_problem(e)
    if disk == "full":
        fix = "the disk is full: free some space on it and start again."
    elif disk == "read-only":
        fix = "make the file and its folder (data_dir) writable by this user."
    elif name in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
        fix = ("it is not a SQLite database or it is damaged: move it away and put a backup in its place "
               "(`python -m bot backup PATH` makes them), or point data_dir at another folder.")
    elif name.startswith("SQLITE_IOERR"):
        fix = "the disk could not be written or read: check that it has free space and works, then start again."
    elif name.startswith("SQLITE_CANTOPEN"):
        fix = "it must be a file (not a folder) this user can read and write, in a folder it can write."
    else:
        fix = "check the file and the disk it is on."
    return f"cannot start: the database {db_path} can't be opened ({str(e).rstrip('.')}); {fix}"


def _leave_anyway(code: int) -> None:
    time.sleep(EXIT_GRACE_S)
    stuck = [t.name for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
             and t is not threading.main_thread()]
    print(f"exiting although thread(s) {', '.join(stuck) or '?'} still run", file=sys.stderr, flush=True)
    os._exit(code)


def exit_process(code: int | str | None) -> NoReturn:
    """``sys.exit(code)`` that always ends the process: interpreter shutdown waits for every
    non-daemon thread (a database connection left open on some error path, a stuck worker), so a
    daemon watchdog leaves with ``os._exit`` after ``EXIT_GRACE_S`` if shutdown has not finished by
    then, and a supervisor sees the exit (``Restart=on-failure``) instead of a process that never ends."""
    forced = code if isinstance(code, int) else (0 if code is None else 1)
    threading.Thread(target=_leave_anyway, args=(forced,), name="exit-watchdog", daemon=True).start()
    sys.exit(code)


def run_main(main: Callable[[], int]) -> NoReturn:
    """An entry point's ``sys.exit(main())``: an exception that escapes ``main`` becomes one line on
    stderr (its traceback goes to the log, if one is set up) and exit code 1, and the process
    always ends (:func:`exit_process`)."""
    try:
        code: int | str | None = main()
    except SystemExit as e:          # argparse's usage errors, sys.exit inside main
        code = e.code
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 - whatever it is, one line and a non-zero exit
        if logging.getLogger().handlers:
            logging.getLogger(__name__).error("stopped by an unexpected error", exc_info=e)
        code = fail(f"stopped: {type(e).__name__}: {e}", 1)
    exit_process(code)
