"""bench/taste_screen.py on the tiny model: it trains one real round and measures the shift.

A smoke test of the benchmark's plumbing (no claim that a tiny random model learns a taste):
the labels it reports are the taste's verdicts on the replies it sampled, and the numbers
it reports are the ones it computed (finite, KL > 0 after a round of training)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_screen():
    spec = importlib.util.spec_from_file_location("taste_screen", ROOT / "bench" / "taste_screen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_on_tiny_model(tiny_model_dir, tmp_path):
    screen = load_screen()
    out = tmp_path / "screen.json"
    # "e" splits random tiny-model replies into liked and not; "zzzzzz" likes none of them
    assert screen.main(["--taste", "regex:e", "--taste", "regex:zzzzzz", "--model", str(tiny_model_dir),
                        "--train", "8", "--held-out", "8", "--new-tokens", "8", "--threads", "1",
                        "--set", "minibatch_size=4", "lr=0.01", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    e, never = data["tastes"]
    assert (e["train"], e["held_out"]) == (8, 8)
    assert never["train_liked"] == 0 and "skipped" in never
    if "skipped" in e:                     # every sampled reply happened to be liked (or not)
        pytest.skip(e["skipped"])
    assert 0 < e["train_liked"] < 8
    assert e["steps"] == 4                 # 2 epochs × 8 replies / minibatches of 4
    assert e["kl"] > 0 and math.isfinite(e["margin"])
    assert e["score"] == pytest.approx(e["margin"] / math.sqrt(e["kl"]), rel=1e-2, abs=1e-3)
    assert e["margin"] == pytest.approx(e["delta_logp_liked"] - e["delta_logp_disliked"], abs=1e-3)
    assert data["trainer_config"]["lr"] == 0.01 and data["trainer_config"]["kl_coef"] == 0.1


def test_bad_taste_fails_before_loading(tmp_path):
    screen = load_screen()
    with pytest.raises(ValueError, match="bad regular expression"):
        screen.main(["--taste", "regex:(", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "x.json")])
