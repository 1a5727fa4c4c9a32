"""Smoke test of the learning simulation: two short rounds on the tiny model, in-process.

No learning claim (a random 2-layer model cannot learn a taste in two rounds); it checks
the whole loop runs through the real chat core, store and trainer and writes its outputs.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from bot.store import Store
from tests.tiny_model import build_tiny_model
from trainer import simulate


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    model = build_tiny_model(tmp / "tiny")
    argv = ["--rounds", "2", "--replies", "6", "--voters", "5", "--flip", "0.1", "--taste", "regex:e",
            "--model", str(model), "--data-dir", str(tmp / "data"), "--out", str(tmp / "out"),
            "--max-new-tokens", "8", "--epochs", "1", "--lr", "1e-3", "--lora-rank", "4", "--lora-alpha", "8",
            "--probe-max-new-tokens", "6", "--max-kl", "50", "--max-repetition", "1.0", "--max-empty-share", "1.0",
            "--system-prompt", "Be brief.", "--seed", "3", "--eval-extra", "2"]
    results = simulate.main(argv)
    return tmp, results


def test_json_has_two_rounds_with_fields(sim_run):
    tmp, results = sim_run
    saved = json.loads((tmp / "out" / "simulate.json").read_text())
    assert saved["rounds"] == json.loads(json.dumps(results["rounds"]))
    assert len(saved["rounds"]) == 2
    for row in saved["rounds"]:
        for key in ("like_rate", "mean_reward", "kl", "mean_words", "symbol_spam_share", "serving_version", "seconds",
                    "train"):
            assert key in row, key
        assert 0.0 <= row["like_rate"] <= 1.0
        assert -1.0 <= row["mean_reward"] <= 1.0
        assert row["n_replies"] == 6 and row["n_votes"] == 30
        # a round whose replies all got the same reward is skipped: nothing to learn from
        assert row["train"]["status"] in ("published", "rejected", "skipped")
    assert {row["train"]["status"] for row in saved["rounds"]} - {"skipped"}, "no round trained"
    assert saved["final"]["train"] is None and saved["final"]["n_replies"] == 8
    assert saved["final"]["served_kl"] >= 0.0 and saved["final"]["base_nll"] > 0.0
    assert saved["rounds"][0]["served_kl"] == 0.0 and saved["rounds"][0]["base_nll"] > 0.0
    assert saved["examples"] and {"prompt", "before", "after"} <= set(saved["examples"][0])
    # the final evaluation asks round 1's prompts again, and the 2 extra ones the base answered first
    first = [r["prompt"] for r in saved["rounds"][0]["replies"]]
    extra = [r["prompt"] for r in saved["base_eval"]["replies"]]
    assert len(extra) == 2 and not set(extra) & set(first)
    assert saved["base_eval"]["serving_version"] == 0 and saved["base_eval"]["n_votes"] == 0
    assert [r["prompt"] for r in saved["final"]["replies"]] == first + extra
    ev = saved["eval"]
    assert ev["prompts"] == 8 and ev["same_prompts"] and ev["base_version"] == 0
    liked = saved["rounds"][0]["replies"] + saved["base_eval"]["replies"]
    assert ev["base_like_rate"] == sum(r["liked"] for r in liked) / 8
    assert ev["final_like_rate"] == saved["final"]["like_rate"]
    assert [e["prompt"] for e in saved["examples"]] == first[:len(saved["examples"])]


def test_png_written(sim_run):
    tmp, _ = sim_run
    png = tmp / "out" / "learning_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_store_holds_replies_and_votes(sim_run):
    tmp, _ = sim_run

    async def check():
        store = await Store.open(tmp / "data" / "reactlearn.sqlite3")
        try:
            counts = await store.counts()
            # 2 unvoted base-eval replies, 2 rounds of 6, the final evaluation of 6 + 2; 5 voters per reply
            assert counts["replies"] == 22 and counts["rated"] == 20 and counts["votes"] == 100
            assert counts["messages"] == 22
            reply = await store.get_reply(1)
            assert reply.platform == "sim" and reply.output_ids and len(reply.logprobs) == len(reply.output_ids)
            assert await store.votes_for(1) == []            # reply 1 is a base-eval reply: not voted on
            voters = {u for u, _, _ in await store.votes_for(3)}
            assert voters == {f"sim-voter-{k}" for k in range(5)}
            assert len(await store.rounds()) == 2
        finally:
            await store.close()

    asyncio.run(check())


def test_tastes():
    short = simulate.parse_taste("short")
    assert short.liked("Sure, sounds good!") and not short.liked("") and not short.liked("word " * 20)
    rx = simulate.parse_taste(r"regex:\?")
    assert rx.liked("How about you?") and not rx.liked("Fine.")
    py = simulate.parse_taste("python:tests.test_simulate:half_liking")
    assert py.p_up("x") == 0.75 and py.liked("x")
    with pytest.raises(ValueError):
        simulate.parse_taste("nonsense")


def half_liking(text: str) -> float:
    return 0.5


def test_example_taste_calls_someone_by_name():
    taste = simulate.parse_taste("python:trainer.simulate.example_tastes:calls_someone_by_name")
    assert taste.liked("Sure, Mia! Here's a quick idea.")
    assert taste.liked("That sounds fun, Tomás.")
    assert not taste.liked("Mia: I think so too.")          # a speaker label, not talking to Mia
    assert not taste.liked("That's the same as before.")    # "same" is not Sam
    assert not taste.liked("")


def test_sparse_voters_sample_one_person_of_the_crowd():
    import random

    from trainer.simulate.people import Asked, Voters

    liked_all = simulate.parse_taste("regex:.")          # every non-empty reply is liked
    voters = Voters(liked_all, flip=0.0, rng=random.Random(0), vote_rate=0.5, crowd=10, dissent=0.3)
    replies = [Asked(f"p{i}", sent_text=f"reply {i}") for i in range(2000)]
    votes = [v for a in replies for v in voters.votes_for(a)]
    assert 900 < len(votes) < 1100                         # about half the replies get a vote, one each
    assert {v.user_id for v in votes} == {f"sim-person-{k}" for k in range(10)}
    honest = [v.up for v in votes if int(v.user_id.rsplit("-", 1)[1]) >= 3]
    dissent = [v.up for v in votes if int(v.user_id.rsplit("-", 1)[1]) < 3]
    assert all(honest)                                     # the crowd votes its taste (no flips here)
    assert 0.35 < sum(dissent) / len(dissent) < 0.65       # 3 of 10 vote by a coin of their own
    dense = Voters(liked_all, flip=1.0, rng=random.Random(0), voters=3)
    assert [(v.user_id, v.up) for v in dense.votes_for(replies[0])] == [(f"sim-voter-{k}", False) for k in range(3)]


def test_coin_taste_is_random_but_stable():
    coin = simulate.parse_taste("coin")
    texts = [f"reply number {i}" for i in range(1000)]
    assert 0.45 < sum(coin.liked(t) for t in texts) / 1000 < 0.55
    assert [coin.liked(t) for t in texts] == [coin.liked(t) for t in texts]


def test_sparse_late_votes_and_a_taste_change(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    argv = ["--rounds", "3", "--replies", "6", "--vote-rate", "0.7", "--crowd", "3", "--late", "0.5",
            "--max-user-share", "1",
            "--taste", "regex:e", "--taste-after", "3:regex:a", "--model", str(model),
            "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--max-new-tokens", "6",
            "--epochs", "1", "--lora-rank", "4", "--lora-alpha", "8", "--probe-max-new-tokens", "4",
            "--max-kl", "50", "--max-repetition", "1.0", "--max-empty-share", "1.0", "--seed", "1",
            "--eval-extra", "0"]
    results = simulate.main(argv)
    rounds = results["rounds"]
    assert sum(r["n_late_votes"] for r in rounds) > 0               # late votes came in at a later round
    assert rounds[0]["n_late_votes"] == 0
    taste = simulate.parse_taste("regex:a")                         # round 3 and the evaluation judge by 'a'
    assert rounds[2]["like_rate"] == sum(taste.liked(r["text"]) for r in rounds[2]["replies"]) / 6
    assert results["eval"]["base_like_rate"] == sum(taste.liked(r["text"]) for r in rounds[0]["replies"]) / 6
    cast = sum(r["n_votes"] + r["n_late_votes"] for r in rounds + [results["final"]])
    assert results["store_counts"]["votes"] == cast
    assert results["vote_rate"] == 0.7 and results["crowd"] == 3

    async def voters():
        store = await Store.open(tmp_path / "data" / "reactlearn.sqlite3")
        try:
            return {u for i in range(1, 25) for u, _, _ in await store.votes_for(i)}
        finally:
            await store.close()

    assert asyncio.run(voters()) <= {"sim-person-0", "sim-person-1", "sim-person-2"}


def test_a_bad_config_is_one_line_and_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nname = 5\n")
    with pytest.raises(SystemExit) as exit_:
        simulate.main(["--config", str(bad), "--rounds", "1", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()           # one line, no traceback
    assert line.startswith("config error: 'model.name' must be str") and "Fix it in the config file" in line
    assert not (tmp_path / "out").exists()                           # nothing ran
