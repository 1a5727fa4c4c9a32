"""Process set-up shared by every entry point: the bot, the trainer, the simulation, the benchmarks.

    from bot import process
    process.quiet_threads()          # first, before anything imports torch
    ...
    process.setup_logging("INFO")    # one format everywhere; noisy libraries kept at WARNING
    return process.fail(f"config error: {e}")   # one clear line on stderr, exit code 2

Why ``quiet_threads``: the bot and the trainer share a small box. With OpenMP's default
busy-wait policy, two torch processes on 2 cores slowed each other down 10-30x in our
measurements (bench/round_time.py); with ``OMP_WAIT_POLICY=PASSIVE`` idle worker threads
sleep and cost almost nothing. OpenMP reads the variable once, when torch loads, so it must
be set before the first ``import torch``. A value already in the environment wins.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS = ("discord.gateway", "httpx", "urllib3", "filelock")


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
    """Print one line on stderr and return the exit code for ``sys.exit``."""
    print(message, file=sys.stderr)
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
    line naming the setting, the folder, what went wrong and the fix."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        return (f"cannot start: {setting} {path} can't be created or written ({e.strerror or e}). "
                f"Point {setting} at a writable folder in the config.")
    return ""
