"""deploy/: what can be checked without Docker or systemd running (fast, no network, no torch).

The compose file parses and its commands name real entry points and flags, the Dockerfile
copies files that exist and runs as a non-root user, the systemd units name real flags and
carry their hardening, and the configs they ship point everything written into the one
folder that is a volume (Docker) or writable (systemd).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from bot.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
UNITS = DEPLOY / "systemd"
HARDENING = {"User": "reactlearn", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes",
             "ProtectHome": "yes"}
SECRET_ENVS = {f.metadata["env"] for f in dataclasses.fields(Config) if "env" in f.metadata}


@cache
def help_text(module: str, *sub: str) -> str:
    out = subprocess.run([sys.executable, "-m", module, *sub, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    return out.stdout


def check_command(argv: list[str]) -> None:
    """``python -m bot|trainer [backup] --flag ...``: the entry point exists and so does every flag."""
    assert Path(argv[0]).name.startswith("python"), argv
    assert argv[1] == "-m" and argv[2] in ("bot", "trainer"), argv
    sub = [a for a in argv[3:4] if a == "backup"]
    text = help_text(argv[2], *sub)
    for flag in (a for a in argv[3:] if a.startswith("--")):
        assert re.search(rf"(^|\s|\[){re.escape(flag)}\b", text), f"{flag} is not a flag of python -m {argv[2]}"
    if "--health-port" in argv:
        assert argv[argv.index("--health-port") + 1].isdigit()


def health_port(argv: list[str]) -> int:
    return int(argv[argv.index("--health-port") + 1])


def healthcheck_port(test: str) -> int:
    m = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", test)
    assert m, test
    return int(m.group(1))


# -- compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed; the compose file can't be parsed")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_run_real_commands(compose):
    services = compose["services"]
    assert set(services) == {"bot", "trainer"}
    for name, svc in services.items():
        assert svc["command"][:3] == ["python", "-m", name]
        check_command(svc["command"])
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert svc["restart"] in ("unless-stopped", "always", "on-failure")


def test_compose_healthchecks_ask_each_process_its_own_port(compose):
    ports = set()
    for svc in compose["services"].values():
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", "-c"]          # the slim image has no curl
        assert healthcheck_port(test[3]) == health_port(svc["command"])
        ports.add(health_port(svc["command"]))
    assert len(ports) == 2


def test_compose_one_volume_at_the_data_dir(compose):
    (volume,) = compose["volumes"]
    data_dir = load_config(DEPLOY / "docker" / "reactlearn.toml", env={}).data_dir
    for svc in compose["services"].values():
        assert f"{volume}:{data_dir}" in svc["volumes"]


def test_compose_secrets_only_for_the_bot(compose):
    bot, trainer = compose["services"]["bot"], compose["services"]["trainer"]
    assert "env_file" not in trainer
    (env_file,) = bot["env_file"]
    example = DEPLOY / f"{env_file}.example"
    names = {line.split("=", 1)[0] for line in example.read_text().splitlines() if line and not line.startswith("#")}
    assert names == SECRET_ENVS
    ignored = (DEPLOY / ".gitignore").read_text().split()
    assert f"/{env_file}" in ignored


# -- Dockerfile ---------------------------------------------------------------------------


def dockerfile() -> list[str]:
    """Instructions, with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_copies_what_exists_and_the_build_context_sends_it():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    included = {line[1:] for line in ignore if line.startswith("!")}
    copies = [shlex.split(line)[1:-1] for line in dockerfile() if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert not src.startswith("--"), "COPY --from/--chown not expected here"
            assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
            assert any(src == inc or src.startswith(inc + "/") for inc in included), \
                f"COPY {src}: Dockerfile.dockerignore leaves it out of the build context"


def test_dockerfile_runs_the_bot_as_a_user_with_a_healthcheck():
    lines = dockerfile()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    (cmd,) = [line for line in lines if line.startswith("CMD ")]
    argv = json.loads(cmd[4:])
    assert argv[:3] == ["python", "-m", "bot"]
    check_command(argv)
    (health,) = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert healthcheck_port(health) == health_port(argv)
    assert any(line.startswith("VOLUME") and "/data" in line for line in lines)


def test_dockerfile_installs_torch_first_pinned_as_the_makefile_does():
    pin = re.search(r"pip install -q (torch==\S+)", (ROOT / "Makefile").read_text()).group(1)
    runs = [line for line in dockerfile() if line.startswith("RUN ") and "pip install" in line]
    assert pin in runs[0]
    assert any('pip install ".[' in line for line in runs[1:])
    assert not any("bot.models" in line for line in runs), "the model is converted into the volume at first start"


def test_docker_config_keeps_everything_in_the_volume():
    cfg = load_config(DEPLOY / "docker" / "reactlearn.toml", env={})
    assert cfg.data_dir == "/data"
    assert Path(cfg.model.cache_dir).is_relative_to(cfg.data_dir)
    assert "REACTLEARN_CONFIG=/etc/reactlearn/reactlearn.toml" in (DEPLOY / "Dockerfile").read_text()
    assert any(line == "COPY deploy/docker/reactlearn.toml /etc/reactlearn/reactlearn.toml" for line in dockerfile())


# -- systemd ------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, list[str]]:
    """``Key: [values]`` of the [Service] section (systemd allows a key more than once)."""
    keys: dict[str, list[str]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        if section == "[Service]":
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


SERVICES = sorted(UNITS.glob("*.service"))


def test_the_units_are_there():
    assert {p.name for p in SERVICES} >= {"reactlearn-bot.service", "reactlearn-trainer.service"}
    assert (UNITS / "reactlearn-backup.timer").is_file()


@pytest.mark.parametrize("path", SERVICES, ids=lambda p: p.name)
def test_unit_hardening_and_data_folder(path):
    keys = unit(path)
    for key, value in HARDENING.items():
        assert keys.get(key) == [value], f"{path.name}: {key}={value}"
    cfg_path = next(v.split("=", 1)[1] for v in keys["Environment"] if v.startswith("REACTLEARN_CONFIG="))
    assert cfg_path == "/etc/reactlearn/reactlearn.toml"
    cfg = load_config(UNITS / "reactlearn.toml", env={})     # the file installed there
    (writable,) = keys["ReadWritePaths"]
    assert cfg.data_dir == writable
    assert Path(cfg.model.cache_dir).is_relative_to(writable)
    assert "reactlearn" in keys["StateDirectory"][0].split()    # /var/lib/reactlearn, owned by the user


@pytest.mark.parametrize("name, module", [("reactlearn-bot.service", "bot"), ("reactlearn-trainer.service", "trainer")])
def test_unit_runs_a_real_command(name, module):
    keys = unit(UNITS / name)
    (exec_start,) = keys["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0] == "/opt/reactlearn/.venv/bin/python" and argv[1:3] == ["-m", module]
    check_command(argv)
    assert keys["Restart"] == ["on-failure"]


def test_bot_unit_reads_the_secrets_and_the_trainer_does_not():
    assert unit(UNITS / "reactlearn-bot.service")["EnvironmentFile"] == ["/etc/reactlearn/secrets.env"]
    assert "EnvironmentFile" not in unit(UNITS / "reactlearn-trainer.service")


def test_backup_unit_runs_the_backup_command():
    (exec_start,) = unit(UNITS / "reactlearn-backup.service")["ExecStart"]
    inner = shlex.split(exec_start)[-1]          # /bin/sh -c '...'
    argv = shlex.split(inner)[1:]                # after `exec`
    assert argv[1:4] == ["-m", "bot", "backup"]
    check_command(argv)
    assert Path(argv[4]).parent == Path("/var/lib/reactlearn/backups")
