"""Every numeric setting (bot and trainer) has a declared, documented valid range that
validation enforces; bad config files and paths are clear errors, never tracebacks."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import Bound, Config, ConfigError, build, check_paths, load_config, setting, validate
from trainer.config import TrainerConfig, load_trainer_config

ROOT = Path(__file__).resolve().parents[1]


def numeric_settings() -> list[tuple[str, str, dataclasses.Field]]:
    """(section, name, field) of every int or float setting, "trainer" for the trainer's."""
    found = []
    for f in dataclasses.fields(Config):
        section = getattr(Config(), f.name)
        if dataclasses.is_dataclass(section):
            found += [(f.name, g.name, g) for g in dataclasses.fields(section)
                      if type(getattr(section, g.name)) in (int, float)]
    return found + [("trainer", g.name, g) for g in dataclasses.fields(TrainerConfig)
                    if type(getattr(TrainerConfig(), g.name)) in (int, float)]


NUMERIC = numeric_settings()


def load(section: str, name: str, value) -> None:
    if section == "trainer":
        load_trainer_config(build(Config, {"trainer": {name: value}}))
    else:
        validate(build(Config, {section: {name: value}}), need_secrets=False)


def outside(bound: Bound, is_int: bool) -> list:
    """Values just outside each end (the end itself where the end is open), and for floats NaN and ±inf."""
    step = 1 if is_int else max(abs(bound.hi - bound.lo) * 1e-3, 1e-9)
    low = bound.lo if bound.lo_open else bound.lo - step
    high = bound.hi if bound.hi_open else bound.hi + step
    values = [int(low), int(high)] if is_int else [float(low), float(high)]
    return values + ([] if is_int else [float("nan"), float("inf"), float("-inf")])


def test_every_numeric_setting_is_found():
    keys = {f"{s}.{n}" for s, n, _ in NUMERIC}
    assert {"serving.poll_seconds", "sampling.temperature", "health.bot_port", "trainer.lr", "trainer.seed"} <= keys
    assert len(keys) >= 45


@pytest.mark.parametrize("section, name, f", NUMERIC, ids=[f"{s}.{n}" for s, n, _ in NUMERIC])
def test_every_numeric_setting_refuses_values_outside_its_declared_range(section, name, f):
    bound = f.metadata.get("range")
    assert isinstance(bound, Bound), f"{section}.{name} declares no range: add ge=/gt= and le=/lt= to its setting()"
    assert math.isfinite(bound.lo) and math.isfinite(bound.hi), f"{section}.{name}: both ends must be finite"
    assert f.default in bound
    load(section, name, f.default)                          # the default passes
    is_int = type(f.default) is int
    for value in outside(bound, is_int):
        with pytest.raises(ConfigError) as e:
            load(section, name, value)
        message = str(e.value)
        assert f"'{section}.{name}'" in message, message           # the key
        assert f"got {value!r}" in message, message                # the bad value
        assert str(bound) in message, message                      # the valid range
        assert "in the config file" in message, message            # the fix


def test_nan_and_inf_from_a_toml_file_are_refused_naming_the_key(tmp_path):
    for text, key in [("[serving]\npoll_seconds = inf\n", "serving.poll_seconds"),
                      ("[sampling]\ntemperature = nan\n", "sampling.temperature"),
                      ("[trainer]\ninterval_seconds = inf\n", "trainer.interval_seconds"),
                      ("[trainer]\nlr = nan\n", "trainer.lr")]:
        path = tmp_path / "c.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
            load_trainer_config(load_config(path, env={}))


def test_a_range_needs_both_ends_and_must_hold_its_default():
    with pytest.raises(TypeError, match="both ends"):
        setting(1, "a count", ge=0)
    with pytest.raises(TypeError, match="outside its own range"):
        setting(0, "a count", ge=1, le=10)
    assert str(Bound(0, 1, lo_open=True)) == "(0, 1]" and Bound(1, 2048).words() == "between 1 and 2048"
    assert 0.5 in Bound(0, 1) and float("nan") not in Bound(0, 1) and True not in Bound(0, 1)


def comment_above(text: str, section: str, key: str) -> str:
    """The comment lines right above ``key = ...`` in ``[section]`` of a TOML text."""
    current, comments = "", []
    for line in text.splitlines():
        if m := re.match(r"^\[([\w.]+)\]", line):
            current, comments = m.group(1), []
        elif line.startswith("#"):
            comments.append(line)
        elif line.startswith(f"{key} = ") and current == section:
            return "\n".join(comments)
        else:
            comments = []
    raise AssertionError(f"{section}.{key} is not in the file")


@pytest.mark.parametrize("section, name, f", NUMERIC, ids=[f"{s}.{n}" for s, n, _ in NUMERIC])
def test_the_example_file_documents_each_range(section, name, f):
    text = (ROOT / "reactlearn.example.toml").read_text(encoding="utf-8")
    assert f"Valid: {f.metadata['range']}." in comment_above(text, section, name)


def test_help_config_shows_each_trainer_range():
    from trainer.__main__ import config_help

    text = config_help()
    for section, name, f in NUMERIC:
        if section == "trainer":
            flat = " ".join(line.removeprefix("# ") for line in comment_above(text, "trainer", name).splitlines())
            assert f"Valid: {f.metadata['range']}." in flat, name


def test_a_config_file_that_is_not_utf8_is_one_clear_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[model]\nsystem_prompt = "Sé breve."\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert str(path) in str(e.value) and "not UTF-8" in str(e.value) and "line 2" in str(e.value)
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path, env={})


def test_check_paths_names_the_setting_without_creating_anything(tmp_path, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = [({"data_dir": str(blocker / "data")}, "'data_dir'", "is a file"),
             ({"data_dir": str(blocker)}, "'data_dir'", "is a file, not a folder"),
             ({"model": {"name": str(tmp_path / "no-such-model")}}, "'model.name'", "does not exist"),
             ({"model": {"name": str(tmp_path)}}, "'model.name'", "no config.json"),
             ({"model": {"name": str(blocker)}}, "'model.name'", "is a file"),
             ({"model": {"cache_dir": str(blocker / "cache")}}, "'model.cache_dir'", "is a file")]
    for data, key, why in cases:
        cfg = validate(build(Config, {"data_dir": str(tmp_path / "data"), **data}), need_secrets=False)
        with pytest.raises(ConfigError) as e:
            check_paths(cfg)
        assert key in str(e.value) and why in str(e.value), str(e.value)
    good = validate(build(Config, {"data_dir": str(tmp_path / "new" / "data"),
                                   "model": {"name": str(tiny_model_dir)}}), need_secrets=False)
    check_paths(good)
    check_paths(validate(build(Config, {"model": {"name": "HuggingFaceTB/SmolLM2-135M-Instruct"}})))  # a hub id
    assert not (tmp_path / "new").exists() and not (tmp_path / "data").exists()


def test_a_data_folder_that_can_not_be_used_is_said_one_way_before_and_at_start(tmp_path):
    """check_paths (nothing created) and the start-up write probe say the same line."""
    from bot.process import writable_dir_problem

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for data_dir in (blocker, blocker / "data"):
        with pytest.raises(ConfigError) as e:
            check_paths(validate(build(Config, {"data_dir": str(data_dir)}), need_secrets=False))
        assert writable_dir_problem(data_dir, "data_dir") == f"cannot start: {e.value}"
        assert str(e.value).startswith("'data_dir': ") and "is a file" in str(e.value)
    assert writable_dir_problem(tmp_path / "new" / "data", "data_dir") == ""   # created and written
    assert (tmp_path / "new" / "data").is_dir() and list((tmp_path / "new" / "data").iterdir()) == []


@pytest.mark.parametrize("ids, key", [({"discord": {"guild_ids": ["my-server"]}}, "discord.guild_ids"),
                                      ({"chat": {"admin_user_ids": [True]}}, "chat.admin_user_ids"),
                                      ({"chat": {"channels": [{"id": 1}]}}, "chat.channels")])
def test_id_lists_are_checked(ids, key):
    with pytest.raises(ConfigError, match=re.escape(f"'{key}'")):
        validate(build(Config, ids), need_secrets=False)
    validate(build(Config, {"discord": {"guild_ids": [123, "456"]}, "chat": {"admin_user_ids": ["U1", 7]}}))


def check_config(module: str, tmp_path: Path, content: bytes) -> subprocess.CompletedProcess:
    path = tmp_path / f"{module}.toml"
    path.write_bytes(content)
    env = {k: v for k, v in os.environ.items() if k != "REACTLEARN_CONFIG"}
    return subprocess.run([sys.executable, "-m", module, "--config", str(path), "--check-config"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module", ["bot", "trainer"])
def test_check_config_catches_what_start_up_would_trip_on(module, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    data = f'data_dir = "{tmp_path / "data"}"\n'.encode()
    cases = [(b"\xff\xfe[model]\n", "not UTF-8"),
             (data + b"[serving]\npoll_seconds = 0\n", "'serving.poll_seconds'"),
             (data + b"[chat]\nhistory_messages = -5\n", "'chat.history_messages'"),
             (data + b"[sampling]\nmax_new_tokens = 1000000000\n", "'sampling.max_new_tokens'"),
             (data + f'[model]\nname = "{tmp_path / "no-such-model"}"\n'.encode(), "'model.name'"),
             (f'data_dir = "{blocker / "data"}"\n'.encode(), "'data_dir'")]
    if module == "trainer":
        cases.append((data + b"[trainer]\nheartbeat_seconds = nan\n", "'trainer.heartbeat_seconds'"))
    for content, key in cases:
        done = check_config(module, tmp_path, content)
        assert done.returncode == 2, (content, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("config error:") and key in lines[0], (content, done.stderr)
    assert not (blocker.parent / "data").exists()
