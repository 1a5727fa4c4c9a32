"""A bot that can't start exits non-zero with one clear line, instead of hanging."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bot(tmp_path: Path, toml: str) -> subprocess.CompletedProcess:
    config = tmp_path / "reactlearn.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n' + toml)
    env = {k: v for k, v in os.environ.items() if k not in ("REACTLEARN_CONFIG", "DISCORD_TOKEN", "SLACK_BOT_TOKEN",
                                                           "SLACK_APP_TOKEN")}
    # A hang is the failure this guards against: the timeout turns it into an error.
    return subprocess.run([sys.executable, "-m", "bot", "--config", str(config)], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


def test_a_missing_model_folder_exits_with_one_line(tmp_path):
    done = run_bot(tmp_path, f'[model]\nname = "{tmp_path / "no-such-model"}"\n')
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cannot start:") and "no-such-model" in lines[0]
    assert "model.name" in lines[0] and "Traceback" not in done.stderr


def test_a_data_folder_that_cannot_be_created_exits_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for module in ("bot", "trainer"):
        config = tmp_path / f"{module}.toml"
        config.write_text(f'data_dir = "{blocker / "data"}"\n')
        done = subprocess.run([sys.executable, "-m", module, "--config", str(config)], cwd=ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                              env={k: v for k, v in os.environ.items() if k != "REACTLEARN_CONFIG"})
        assert done.returncode == 2, (module, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("cannot start: data_dir"), (module, lines)
        assert "Traceback" not in done.stderr
