"""A trainer killed around publishing: the next start reports what really happened.

The kill is simulated by raising ``Killed`` (a BaseException nothing in the trainer catches)
at one point of the real code path; nothing after that point runs, as after a SIGKILL. Then
a fresh trainer starts on the same data folder."""

from __future__ import annotations

import pytest

import trainer.round
from tests.trainer_helpers import seed_rated, tiny_config, trainer_config
from trainer.__main__ import Trainer


class Killed(BaseException):
    """SIGKILL, as far as the code after it can tell."""


def kill_before(name: str):
    """``trainer.round.<name>`` dies before it does anything."""
    def install(monkeypatch):
        def killed(*args, **kwargs):
            raise Killed(name)
        monkeypatch.setattr(trainer.round, name, killed)
    return install


def kill_after(name: str):
    """``trainer.round.<name>`` does its work, then the process dies."""
    def install(monkeypatch):
        real = getattr(trainer.round, name)

        async def then_killed(*args, **kwargs):
            await real(*args, **kwargs)
            raise Killed(name)
        monkeypatch.setattr(trainer.round, name, then_killed)
    return install


@pytest.mark.parametrize("kill, outcome", [
    # publish() committed the registry row and the activation; prune is the next thing it does
    pytest.param(kill_before("prune"), "published", id="after-the-registry-commit"),
    # the round's outcome was recorded, its requests were not yet marked
    pytest.param(kill_after("run_round"), "published", id="after-the-round-was-recorded"),
    # killed while publishing, before anything was registered: the round did fail
    pytest.param(kill_before("publish"), "failed", id="before-the-commit"),
])
async def test_a_killed_trainer_reports_the_round_as_it_really_ended(kill, outcome, tmp_path, tiny_model_dir,
                                                                     store_for, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    first = Trainer(cfg, trainer_config(cfg))
    first.store = store = await store_for(cfg)
    first.learner.load()
    await seed_rated(store, first.learner.tokenizer, 4, base=first.learner.base)
    a = await store.add_train_request("console", "c", "admin")
    b = await store.add_train_request("console", "c", "admin")
    with monkeypatch.context() as m:
        kill(m)
        with pytest.raises(Killed):
            await first.serve_requests()
    assert [r["status"] for r in await store.train_requests()] == ["running", "running"]
    published = outcome == "published"
    assert await store.active_version() == (1 if published else 0)

    assert await Trainer(cfg, trainer_config(cfg)).run(once=True) == 0       # the next start
    reqs = await store.train_requests()
    assert [r["id"] for r in reqs] == [a, b]
    rounds = await store.rounds()      # (after a failed one, --once may run a scheduled round of its own)
    assert rounds[0]["request_id"] == b and len(rounds) == (1 if published else 2)
    if published:
        assert [r["status"] for r in reqs] == ["done", "done"]
        assert all(r["result"].startswith("v1 published: 4 rated replies") for r in reqs)
        assert "recorded at its next start" in reqs[0]["result"]
        assert (rounds[0]["status"], rounds[0]["version"], rounds[0]["n_replies"]) == ("published", 1, 4)
        assert rounds[0]["kl"] is not None
    else:
        assert [r["status"] for r in reqs] == ["failed", "failed"]
        assert all("stopped unexpectedly" in r["result"] and "/retrain" in r["result"] for r in reqs)
        assert rounds[0]["status"] == "failed" and rounds[0]["version"] is None
    # what the bot will post: one result per request, as they really ended
    assert [r["status"] for r in await store.unnotified_results()] == [reqs[0]["status"]] * 2


async def test_a_scheduled_round_killed_after_its_commit_is_recorded_as_published(tmp_path, tiny_model_dir,
                                                                                   store_for, monkeypatch):
    cfg = tiny_config(tmp_path, tiny_model_dir, trainer={"epochs": 1})
    first = Trainer(cfg, trainer_config(cfg))
    first.store = store = await store_for(cfg)
    first.learner.load()
    await seed_rated(store, first.learner.tokenizer, 4, base=first.learner.base)
    with monkeypatch.context() as m:
        kill_before("prune")(m)
        with pytest.raises(Killed):
            await first.scheduled_round()
    assert [r["status"] for r in await store.rounds()] == ["running"]
    assert await Trainer(cfg, trainer_config(cfg)).run(once=True) == 0
    rounds = await store.rounds()
    assert len(rounds) == 1 and (rounds[0]["status"], rounds[0]["version"]) == ("published", 1)
    assert (await store.last_round("published"))["id"] == rounds[0]["id"]
