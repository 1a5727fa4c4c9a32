"""The console playground driven through a pipe, as a person would script it."""

import asyncio
import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bot.adapters.console import ConsoleReply

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, model_dir: Path, extra: str = "") -> Path:
    path = tmp_path / "reactlearn.toml"
    path.write_text(f'data_dir = "{tmp_path / "data"}"\n\n[model]\nname = "{model_dir}"\n\n'
                    f'[sampling]\nmax_new_tokens = 8\n{extra}')
    return path


def run_bot(args, stdin="", env_extra=None, timeout=120):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "bot", *args], input=stdin, capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def shown_form(text: str) -> str:
    """How the console should print a reply: newline and tab as they are, other controls as \\xNN."""
    control = lambda c: (ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f) and c not in "\n\t"
    return "".join(f"\\x{ord(c):02x}" if control(c) else c for c in text)


def test_a_reply_cannot_drive_the_terminal():
    out = io.StringIO()
    reply = ConsoleReply(out)
    asyncio.run(reply.start("one\rtwo"))
    asyncio.run(reply.finish("one\rtwo\x1b[31m red\n\tok é"))
    reply.end("[#1]")
    assert out.getvalue() == "bot> one\\x0dtwo\\x1b[31m red\n\tok é[#1]\n"


def test_console_through_a_pipe(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    script = "hello there\n+\nwhat is the weather like?\n/down 1\n-\n/status\n/up 99\n/rollback 7\n/quit\n"
    out = run_bot(["--config", str(config)], stdin=script)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    db = sqlite3.connect(tmp_path / "data" / "reactlearn.sqlite3")
    texts = dict(db.execute("SELECT id, text FROM replies"))
    # each reply is printed as it grows on a "bot> " line, ended by its id once stored;
    # control characters the random model writes are shown escaped, never sent raw
    shown = {i: shown_form(t) or "…" for i, t in texts.items()}
    assert lines[0].startswith("bot> ") and out.stdout.startswith(f"bot> {shown[1]} [#1]\n")
    assert "(👍 on #1)" in lines
    assert f"\nbot> {shown[2]} [#2]\n" in out.stdout
    assert not any(ch in out.stdout for ch in "\r\x1b\x00\x1a")
    assert "(👎 on #1)" in lines and "(👎 on #2)" in lines
    assert "Replies: 2, votes: 2, rated replies: 2" in out.stdout
    assert "  v0 (active): liked 0% of 2" in lines      # the versions list in /status
    chart = tmp_path / "data" / "status.png"                 # and its chart, saved where it says
    assert f"Chart: {chart}" in lines and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(there is no reply #99)" in lines
    assert "There is no version 7." in lines
    votes = db.execute("SELECT reply_id, user_id, emoji, value FROM votes ORDER BY reply_id").fetchall()
    assert votes == [(1, "you", "👎", -1.0), (2, "you", "👎", -1.0)]      # /down replaced the earlier +
    prompt, output, logprobs = db.execute("SELECT prompt_ids, output_ids, logprobs FROM replies WHERE id = 1").fetchone()
    assert len(prompt) > 2 and output.count(",") == logprobs.count(",")
    assert db.execute("SELECT COUNT(*) FROM replies").fetchone() == (2,)     # both replies recorded
    assert (tmp_path / "data" / "bot.log").is_file()       # the log goes to a file: the terminal is the chat


def test_console_retrain_and_forget(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    out = run_bot(["--config", str(config)], stdin="hi\n/retrain\n/forget\n/status\n")
    assert out.returncode == 0, out.stderr
    assert "Retrain request #1 queued" in out.stdout
    assert "Forgot user you: 1 messages, 1 replies, 0 votes deleted." in out.stdout
    assert "Replies: 0, votes: 0" in out.stdout


@pytest.mark.parametrize("toml, env, message", [
    ('[model]\nnmae = "x"\n', {}, "unknown setting 'model.nmae'"),
    ('[sampling]\ntemperature = "hot"\n', {}, "'sampling.temperature' must be float"),
    ('platforms = ["discord"]\n', {}, "DISCORD_TOKEN is not set"),
    ('platforms = ["irc"]\n', {}, "unknown platform 'irc'"),
    ('[sampling\n', {}, "is not valid TOML"),
])
def test_bad_config_names_the_key_and_the_fix(tmp_path, toml, env, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    out = run_bot(["--config", str(path), "--check-config"], env_extra=env)
    assert out.returncode == 2
    assert message in out.stderr


def test_check_config_never_prints_secrets(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('platforms = ["discord"]\n')
    out = run_bot(["--config", str(path), "--check-config"], env_extra={"DISCORD_TOKEN": "sekrit-token-123"})
    assert out.returncode == 0, out.stderr
    assert "discord_token set" in out.stdout
    assert "sekrit" not in out.stdout + out.stderr


def test_example_config_is_valid_and_covers_every_setting():
    import dataclasses

    from bot.config import Config, load_config

    example = ROOT / "reactlearn.example.toml"
    cfg = load_config(example, env={})
    text = example.read_text()
    for f in dataclasses.fields(Config):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            assert f"[{f.name}]" in text
            for sub in dataclasses.fields(section):
                assert f"{sub.name} =" in text or f"[{f.name}.{sub.name}]" in text, \
                    f"{f.name}.{sub.name} missing from the example"
        elif "env" not in f.metadata and f.name != "trainer":
            assert f"{f.name} =" in text, f"{f.name} missing from the example"


@pytest.mark.parametrize("env, expected", [
    ({}, []),
    ({"DISCORD_TOKEN": "t"}, ["discord"]),
    ({"SLACK_BOT_TOKEN": "xoxb-1"}, []),                       # Slack needs both tokens
    ({"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_APP_TOKEN": "xapp-1", "DISCORD_TOKEN": "t"}, ["discord", "slack"]),
])
def test_platforms_follow_the_tokens_unless_set(tmp_path, env, expected):
    from bot.config import load_config

    assert load_config(None, env=env).platforms == expected
    path = tmp_path / "console.toml"
    path.write_text("platforms = []\n")
    assert load_config(path, env=env).platforms == []          # an explicit [] keeps the console


def test_only_the_bot_needs_the_chat_tokens(tmp_path, tiny_model_dir):
    """A config that names Discord: the bot refuses to start without DISCORD_TOKEN, the
    trainer (which never connects to a chat) and `python -m bot backup` do not need it."""
    config = write_config(tmp_path, tiny_model_dir, extra="")
    config.write_text('platforms = ["discord"]\n' + config.read_text())
    bot = run_bot(["--config", str(config), "--check-config"])
    assert bot.returncode == 2 and "DISCORD_TOKEN is not set" in bot.stderr
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    trainer = subprocess.run([sys.executable, "-m", "trainer", "--config", str(config), "--check-config"],
                             capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert trainer.returncode == 0, trainer.stderr


@pytest.mark.parametrize("env", [{}, {"LC_ALL": "C.UTF-8"}], ids=["surrogateescape-stdin", "strict-utf8-stdin"])
def test_any_bytes_get_a_reply_and_the_console_goes_on(tmp_path, tiny_model_dir, env):
    """Bytes that are not UTF-8 (Python reads them as lone surrogates, or raises, depending on
    the locale), NUL, control characters and a 2 MB line: each line is answered, and the next."""
    config = write_config(tmp_path, tiny_model_dir)
    lines = [b"caf\xe9 \xff\xfe not utf-8", b"nul\x00 inside\x00", b"ctl \x1b[31m\x07\x08 end",
             b"z" * (2 * 1024 * 1024) + b" what now?", b"hello there", b"/status"]
    run_env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **env}
    out = subprocess.run([sys.executable, "-m", "bot", "--config", str(config)], input=b"\n".join(lines) + b"\n",
                         capture_output=True, cwd=ROOT, env=run_env, timeout=300)
    stdout = out.stdout.decode("utf-8", "replace")
    assert out.returncode == 0, out.stderr.decode("utf-8", "replace")[-2000:]
    for i in range(1, 6):
        assert f" [#{i}]\n" in stdout                        # five replies, each tagged with its id
    assert "Replies: 5, votes: 0" in stdout
    db = sqlite3.connect(tmp_path / "data" / "reactlearn.sqlite3")
    texts = [t for (t,) in db.execute("SELECT text FROM messages ORDER BY id")]
    assert texts[0] == "caf\ufffd \ufffd\ufffd not utf-8" and texts[1] == "nul\x00 inside\x00"
    assert texts[2] == "ctl \x1b[31m\x07\x08 end" and texts[3].endswith(" what now?") and len(texts[3]) == 4000
    assert "Traceback" not in out.stderr.decode("utf-8", "replace")


async def test_a_failing_store_is_an_apology_and_the_console_goes_on(cfg, store, shared_policy):
    from bot.adapters.console import Console
    from bot.chat import STORE_TEXT, ChatCore

    out = io.StringIO()
    console = Console(ChatCore(cfg, store, shared_policy), out=out)
    await store.db.execute("PRAGMA query_only = 1")          # SQLite refuses writes: a read-only data folder
    assert await console.handle_line("hello?") is True
    assert await console.handle_line("/retrain") is True
    assert out.getvalue().splitlines() == [f"bot> {STORE_TEXT}", "Sorry, /retrain failed; the error is in the bot's log."]
    await store.db.execute("PRAGMA query_only = 0")
    assert await console.handle_line("hello again") is True and console.last_reply == 1
