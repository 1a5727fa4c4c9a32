"""A process that can't start exits non-zero with one clear line, instead of hanging.

Each case runs the real ``python -m bot`` / ``python -m trainer`` in a subprocess; the timeout
turns a hang (a non-daemon database thread keeping a failed process alive) into a failure."""

from __future__ import annotations

import asyncio
import ctypes
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
PR_CAPBSET_DROP = 24
DAC_CAPS = (1, 2, 3)        # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER: what lets root write anywhere


def start(module: str, tmp_path: Path, toml: str, *args: str, preexec=None) -> subprocess.CompletedProcess:
    config = tmp_path / f"{module}.toml"
    config.write_text(toml)
    env = {k: v for k, v in os.environ.items() if k not in ("REACTLEARN_CONFIG", "DISCORD_TOKEN", "SLACK_BOT_TOKEN",
                                                           "SLACK_APP_TOKEN")}
    return subprocess.run([sys.executable, "-m", module, "--config", str(config), *args], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S,
                          preexec_fn=preexec)


def one_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The process exited with ``code`` and wrote exactly one line on stderr, no traceback."""
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


def console(data_dir: Path, model: Path | str, extra: str = "") -> str:
    return (f'platforms = []\ndata_dir = "{data_dir}"\n{extra}'
            f'[model]\nname = "{model}"\n[serving]\nengine = "torch"\n')


def unprivileged() -> None:
    """preexec_fn: root gives up the capabilities that let it write into any folder, so a mode-0555
    folder is read-only to it as to everyone else (a no-op for other users)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in DAC_CAPS:
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def disk_holds(nbytes: int):
    """preexec_fn: no file may grow past ``nbytes`` (RLIMIT_FSIZE; Python ignores SIGXFSZ, so a write
    past it fails with EFBIG, as on a full disk)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))


@pytest.fixture
def read_only_dir(tmp_path) -> Path:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    folder.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"], preexec_fn=unprivileged,
                               capture_output=True, timeout=TIMEOUT_S)
    except subprocess.SubprocessError as e:
        pytest.skip(f"can't make a folder read-only for this user here: {e}")
    if probe.returncode == 0:
        pytest.skip("this user can write into a mode-0555 folder here")
    return folder


def test_a_missing_model_folder_exits_with_one_line(tmp_path):
    for module in ("bot", "trainer"):
        line = one_line(start(module, tmp_path, console(tmp_path / "data", tmp_path / "no-such-model")))
        assert line.startswith("cannot start:") and "no-such-model" in line and "model.name" in line, line


def test_a_model_folder_that_can_not_be_loaded_exits_the_bot_with_one_line(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    line = one_line(start("bot", tmp_path, console(tmp_path / "data", broken)))
    assert line.startswith("cannot start:") and "broken-model" in line and "model.name" in line, line


def test_a_data_folder_that_cannot_be_created_exits_with_one_line(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for module in ("bot", "trainer"):
        line = one_line(start(module, tmp_path, console(blocker / "data", tiny_model_dir)))
        assert line.startswith("cannot start:") and "data_dir" in line and "is a file" in line, (module, line)


def test_a_read_only_data_folder_exits_with_one_line(tmp_path, tiny_model_dir, read_only_dir):
    for module in ("bot", "trainer"):
        for data_dir in (read_only_dir, read_only_dir / "data"):
            done = start(module, tmp_path, console(data_dir, tiny_model_dir), preexec=unprivileged)
            line = one_line(done)
            assert line.startswith("cannot start:") and "data_dir" in line and "not writable" in line, (module, line)
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.parametrize("nbytes, says", [(1, "Free some space"),            # not even the write probe fits
                                          (3000, "can't be opened")])         # the probe fits, the database not
def test_a_full_disk_at_start_exits_with_one_line(tmp_path, tiny_model_dir, nbytes, says):
    for module in ("bot", "trainer"):
        data_dir = tmp_path / module
        done = start(module, tmp_path, console(data_dir, tiny_model_dir, 'log_level = "ERROR"\n'),
                     preexec=disk_holds(nbytes))
        line = one_line(done)
        assert line.startswith("cannot start:") and str(data_dir) in line and says in line, (module, line)


def test_a_database_that_is_not_sqlite_exits_with_one_line(tmp_path, tiny_model_dir):
    garbage, folder = tmp_path / "garbage", tmp_path / "folder"
    (garbage / "reactlearn.sqlite3").parent.mkdir()
    (garbage / "reactlearn.sqlite3").write_bytes(b"this is not a database" * 400)
    (folder / "reactlearn.sqlite3").mkdir(parents=True)
    for module in ("bot", "trainer"):
        for data_dir, says in ((garbage, "not a SQLite database"), (folder, "not a folder")):
            line = one_line(start(module, tmp_path, console(data_dir, tiny_model_dir)))
            assert line.startswith("cannot start: the database") and str(data_dir / "reactlearn.sqlite3") in line \
                and says in line, (module, line)
    assert (garbage / "reactlearn.sqlite3").read_bytes() == b"this is not a database" * 400     # nothing lost


def test_a_broken_active_version_does_not_stop_or_hang_start_up(tmp_path, tiny_model_dir):
    from bot.store import Store
    from bot.versions import dirname as version_dirname

    data_dir = tmp_path / "data"
    folder = data_dir / "versions" / version_dirname(1)
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text("{not json")

    async def register():
        store = await Store.open(data_dir / "reactlearn.sqlite3")
        await store.add_version(1, 0, str(folder), "0" * 64, "published", {}, activate=True)
        await store.close()

    asyncio.run(register())
    bot = start("bot", tmp_path, console(data_dir, tiny_model_dir))         # stdin at its end: the console quits
    assert bot.returncode == 0 and "Traceback" not in bot.stderr, bot.stderr
    assert "refused v1" in (data_dir / "bot.log").read_text()
    trainer = start("trainer", tmp_path, console(data_dir, tiny_model_dir), "--once")
    assert trainer.returncode == 0 and "Traceback" not in trainer.stderr, trainer.stderr


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def test_a_database_left_open_can_not_keep_a_failed_process_alive(tmp_path):
    # The hang the issue saw: aiosqlite's non-daemon thread outlives main() when some path forgets
    # to close the store. Plain sys.exit(main()) waits for it forever; run_main leaves anyway.
    done = run_python(f"""
        import asyncio
        from bot import process
        from bot.store import Store
        process.EXIT_GRACE_S = 0.5
        def main():
            asyncio.run(Store.open({str(tmp_path / "db.sqlite3")!r}))   # opened, never closed
            return process.fail("cannot start: something went wrong", 2)
        process.run_main(main)
        """)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[0] == "cannot start: something went wrong"


def test_an_error_that_escapes_main_is_one_line_and_a_non_zero_exit():
    done = run_python("""
        from bot import process
        def main():
            raise LookupError("no such thing")
        process.run_main(main)
        """)
    assert one_line(done, 1) == "stopped: LookupError: no such thing"
