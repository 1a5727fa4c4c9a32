"""The benchmark suite (python -m bench) on the tiny model with its shortest settings.

A check of the plumbing, not of speed: each benchmark runs once end to end, exits 0 (so all
of its own ``checks`` held), writes NAME.json and NAME.md, and its JSON holds the figures
with the counts that must add up (replies recorded, votes stored, no failed replies during
hot-swaps). No timing is asserted: on a shared CPU any number is possible."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pytest

from bench import common
from bench.__main__ import known, split
from tests.trainer_helpers import FAST_TRAINER

NEW_TOKENS = "6"


@pytest.fixture(scope="module")
def tiny_toml(tiny_model_dir, tmp_path_factory) -> Path:
    """A reactlearn TOML on the tiny model, with trainer gates loose enough for random weights."""
    folder = tmp_path_factory.mktemp("bench")
    trainer = {**FAST_TRAINER, "epochs": 1, "minibatch_size": 4}
    lines = [f'data_dir = "{folder / "unused"}"', "", "[model]", f'name = "{tiny_model_dir}"',
             'system_prompt = "Be brief."', "max_context_tokens = 128", "", "[serving]", "poll_seconds = 0.05", "",
             "[trainer]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in trainer.items()]
    path = folder / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_bench(name: str, toml: Path, out: Path, *flags: str) -> dict:
    module = importlib.import_module(f"bench.{name}")
    rc = module.main(["--config", str(toml), "--out-dir", str(out), "--new-tokens", NEW_TOKENS, *flags])
    data = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.md").read_text().startswith(f"## {name}:")
    assert rc == 0, f"failed checks: {common.failed_checks(data)}"
    assert data["benchmark"] == name and all(data["checks"].values())
    m = data["machine"]
    assert m["cores"] >= 1 and len(m["load_avg_before"]) == 3 and len(m["load_avg_after"]) == 3
    assert m["packages"]["torch"] and m["packages"]["transformers"] and "ctranslate2" in m["packages"]
    return data


def test_reply(tiny_toml, tmp_path):
    d = run_bench("reply", tiny_toml, tmp_path, "--runs", "3", "--concurrent", "4", "--concurrent-runs", "1")
    from bot.policy import Policy

    s, c = d["single"], d["concurrent"]
    assert d["ttft_available"] == ("on_partial" in inspect.signature(Policy.generate).parameters)
    assert s["policy"]["runs"] == s["plain"]["runs"] == 3
    assert s["policy"]["total_s"]["n"] == 3 and s["policy"]["tokens_per_s"] > 0
    assert 1 <= s["policy"]["tokens"]["min"] <= s["policy"]["tokens"]["max"] <= int(NEW_TOKENS)
    assert s["plain"]["tokens"]["min"] == s["plain"]["tokens"]["max"] == int(NEW_TOKENS)   # forced
    assert s["plain"]["ttft_s"]["n"] == 3 and s["plain"]["ttft_s"]["max"] <= s["plain"]["total_s"]["max"]
    if d["ttft_available"]:
        assert s["policy"]["ttft_s"]["n"] == 3 and s["policy"]["ttft_s"]["max"] <= s["policy"]["total_s"]["max"]
    else:
        assert s["policy"]["ttft_s"]["n"] == 0 and s["policy"]["ttft_s"]["p50"] is None
    assert c["answered"] == [4] and c["plain"]["tokens"] == 4 * int(NEW_TOKENS)
    assert s["speedup"]["tokens_per_s"] == pytest.approx(s["policy"]["tokens_per_s"] / s["plain"]["tokens_per_s"],
                                                         rel=0.02)


def test_load(tiny_toml, tmp_path):
    d = run_bench("load", tiny_toml, tmp_path, "--duration", "0.5", "--baseline-runs", "1")
    assert [lv["people"] for lv in d["levels"]] == [1, 4, 16]
    for lv in d["levels"]:
        assert lv["replies"] > 0 and lv["recorded"] == lv["replies"]
        assert lv["messages"] == lv["replies"] + lv["busy"] + lv["errors"]
        assert lv["errors"] == 0 and lv["busy"] == 0
        assert lv["max_queue_depth"] is not None and 0 <= lv["max_queue_depth"] <= lv["people"]
        assert lv["tokens"] >= lv["replies"] and lv["latency_s"]["n"] == lv["replies"]
        assert lv["plain"]["tokens_per_s"] > 0


def test_lag(tiny_toml, tmp_path):
    d = run_bench("lag", tiny_toml, tmp_path, "--duration", "0.5", "--installs", "1", "--talkers", "2")
    assert set(d["phases"]) == {"idle", "plain generate in a thread", "policy replies", "plain adapter load",
                                "version install", "install while replying"}
    for name, phase in d["phases"].items():
        lag = phase["lag_ms"]
        assert lag["n"] > 0 and 0 <= lag["p50"] <= lag["p99"] <= lag["max"], name
    assert d["counts"]["installed"] == [True, True] and d["counts"]["failed"] == 0 and d["counts"]["replies"] > 0


def test_swap(tiny_toml, tmp_path):
    d = run_bench("swap", tiny_toml, tmp_path, "--swaps", "3", "--talkers", "2", "--baseline-seconds", "0.3")
    assert d["swaps"] == 3 and d["failed_replies"] == 0 and d["stale_version_replies"] == 0
    assert [s["version"] for s in d["per_swap"]] == [1, 2, 3]
    for s in d["per_swap"]:
        assert s["replies"] > 0
        assert 0 <= s["to_swapped_s"] <= s["to_first_reply_s"]
    assert d["replies"] + d["busy"] + d["failed_replies"] == d["messages"]
    assert d["baseline_no_swaps"]["replies"] > 0 and d["rss_mib"]["after_swaps"] > 0


def test_votes(tiny_toml, tmp_path):
    d = run_bench("votes", tiny_toml, tmp_path, "--votes", "300", "--reply-rows", "10", "--concurrency", "4")
    assert d["expected_votes_in_store"] == d["votes_in_store"] == 3 * 300
    assert all(p["added"] == 300 for p in d["phases"].values())
    assert d["db_growth_bytes"] > 0 and d["mib_per_million_votes"] > 0 and d["plain_mib_per_million_votes"] > 0


def test_train(tiny_toml, tmp_path):
    d = run_bench("train", tiny_toml, tmp_path, "--replies", "8", "--baseline-steps", "2")
    r = d["round"]
    assert d["replies_sampled"] == 8 and r["replies"] == 8
    # the 8 voted replies, and 4 samples for each of their 8 prompts when the reward model fitted
    # on these random votes is trusted at all: 1 epoch × (8 + samples) / 4 steps
    assert r["explored_samples"] in (0, 32)
    assert r["status"] in ("published", "rejected") and r["optimizer_steps"] == (8 + r["explored_samples"]) // 4
    assert r["rated_replies_per_s"] > 0 and d["plain"]["steps"] == 2 and d["plain"]["train_replies_per_s"] > 0


def test_memory(tiny_toml, tmp_path):
    d = run_bench("memory", tiny_toml, tmp_path)
    stages = {s["stage"]: s for s in d["stages"]}
    for name in ("imports", "model loaded", "+ 1 version", "+ 3 versions", "one reply on the last version"):
        assert stages[name]["bot_mib"] > 0 and stages[name]["plain_mib"] > 0, name
    assert d["bot_peak_mib"] >= d["bot_with_versions_mib"] > 0


def test_the_runner_routes_flags_to_the_benchmarks_that_take_them():
    from bench import load, reply

    assert split(["reply", "load", "--duration", "2"]) == (["reply", "load"], ["--duration", "2"])
    assert split(["--runs", "2"])[0] == ["reply", "load", "lag", "swap", "votes", "train", "memory"]
    with pytest.raises(SystemExit, match="unknown benchmark"):
        split(["nope"])
    flags = ["--config", "x.toml", "--duration", "2", "--runs=3", "--people", "1,4"]
    assert known(reply.build_parser(), flags) == (["--config", "x.toml", "--runs=3"], {"--duration", "--people"})
    assert known(load.build_parser(), flags) == (["--config", "x.toml", "--duration", "2", "--people", "1,4"],
                                                 {"--runs"})


def test_percentiles_and_stats():
    assert common.percentile([], 50) is None
    assert common.percentile([3.0], 99) == 3.0
    assert common.percentile([1, 2, 3, 4], 50) == 2.5
    assert common.percentile(list(range(101)), 95) == 95
    s = common.stats([0.1, 0.2, None, 0.3])
    assert s["n"] == 3 and s["p50"] == 0.2 and s["max"] == 0.3
    assert common.ratio(1, 0) is None and common.ratio(None, 2) is None and common.ratio(3, 2) == 1.5


def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[serving]\nbatch_sise = 4\n")
    rc = importlib.import_module("bench.reply").main(["--config", str(bad), "--out-dir", str(tmp_path / "out")])
    assert rc == 2
    (line,) = capsys.readouterr().err.strip().splitlines()           # one line, no traceback
    assert line.startswith("config error: unknown setting 'serving.batch_sise'"), line
    assert not (tmp_path / "out" / "reply.json").exists()
