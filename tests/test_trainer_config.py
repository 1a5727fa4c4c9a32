"""[trainer] settings: defaults are valid, every error names its key and the fix."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import Config, ConfigError, build
from trainer.config import TrainerConfig, load_trainer_config

REPO = Path(__file__).resolve().parents[1]


def trainer(table: dict) -> TrainerConfig:
    return load_trainer_config(build(Config, {"trainer": table}))


def test_defaults_are_valid_and_documented():
    t = trainer({})
    assert t.baseline == "mean" and not t.full_finetune and t.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    for f in dataclasses.fields(TrainerConfig):
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert trainer({"max_kl": 1, "epochs": 3}).max_kl == 1.0     # ints are fine where floats are expected


@pytest.mark.parametrize("table, key, hint", [
    ({"lr": -1.0}, "trainer.lr", "(0, 0.01]"),
    ({"baseline": "median"}, "trainer.baseline", "mean_std"),
    ({"epochs": 0}, "trainer.epochs", "between 1 and 1000"),
    ({"clip_eps": 1.5}, "trainer.clip_eps", "(0, 1)"),
    ({"min_new_ratings": 1}, "trainer.min_new_ratings", "between 2 and 100000"),
    ({"keep_versions": 1}, "trainer.keep_versions", "one to roll back to"),
    ({"target_modules": []}, "trainer.target_modules", "non-empty list"),
    ({"max_kl": 0}, "trainer.max_kl", "in (0, 100]"),
    ({"max_kl": float("inf")}, "trainer.max_kl", "got inf"),
    ({"seed": -1}, "trainer.seed", "[0, 4294967295]"),
    ({"epochs": "two"}, "trainer.epochs", "must be int"),
    ({"full_finetune": "yes"}, "trainer.full_finetune", "must be bool"),
    ({"epoch": 3}, "trainer.epoch", "Check the spelling"),
])
def test_errors_name_the_key(table, key, hint):
    with pytest.raises(ConfigError) as e:
        trainer(table)
    assert f"'{key}'" in str(e.value) and hint in str(e.value)


def run_check(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    path = tmp_path / "c.toml"
    path.write_text(text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("REACTLEARN_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "trainer", "--config", str(path), "--check-config"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)


def test_check_config_command(tmp_path):
    bad = run_check(tmp_path, "[trainer]\nlr = 0.5\n")
    assert bad.returncode == 2 and "'trainer.lr'" in bad.stderr and bad.stderr.startswith("config error:")
    good = run_check(tmp_path, f'data_dir = "{tmp_path}"\n[trainer]\nlr = 0.0003\nepochs = 3\n')
    assert good.returncode == 0 and good.stdout.startswith("config OK:") and "epochs 3" in good.stdout


def test_help_config_is_a_valid_trainer_table_of_the_defaults():
    import tomllib

    from trainer.__main__ import config_help

    text = config_help()
    assert text.startswith("[trainer]\n# ") and "# Gate: mean per-token KL" in text
    assert trainer(tomllib.loads(text)["trainer"]) == trainer({})


def test_example_file_has_every_trainer_setting_at_its_default():
    import dataclasses
    from pathlib import Path

    from bot.config import load_config
    from trainer.config import TrainerConfig, load_trainer_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "reactlearn.example.toml", env={})
    assert set(cfg.trainer) == {f.name for f in dataclasses.fields(TrainerConfig)}
    assert load_trainer_config(cfg) == TrainerConfig()
