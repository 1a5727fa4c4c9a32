"""The chat core's own rules, with the real store and policy (the tiny model)."""

from __future__ import annotations

import asyncio

import pytest

from bot.chat import POST_TRIES, _version_list
from bot.events import Command


async def test_a_result_that_can_never_be_posted_is_given_up_after_a_few_tries(core):
    rid = await core.store.add_train_request("discord", "gone-channel", "admin")
    await core.store.set_request_status(rid, "done", "v1 published: ...")
    attempts = []

    async def channel_is_gone(channel_id: str, text: str) -> None:     # the platform edge: 404 every time
        attempts.append(channel_id)
        raise RuntimeError("404 Unknown Channel")

    for _ in range(POST_TRIES - 1):
        assert await core.post_results({"discord": channel_is_gone}) == 0
        assert [r["id"] for r in await core.store.unnotified_results()] == [rid]   # tried again next poll
    assert await core.post_results({"discord": channel_is_gone}) == 1              # the last try gives up
    assert await core.store.unnotified_results() == []
    assert len(attempts) == POST_TRIES
    assert await core.post_results({"discord": channel_is_gone}) == 0 and len(attempts) == POST_TRIES


@pytest.mark.parametrize("pruned", [False, True])
async def test_forget_answers_what_went_and_the_versions_trained_on_it(core, tmp_path, pruned):
    s = core.store
    folders = [tmp_path / f"v{i:04d}" for i in (1, 2, 3)]
    for f in folders[int(pruned):]:               # pruned: v1's folder is gone (prune keeps the newest)
        f.mkdir()
    await s.add_version(1, 0, str(folders[0]), "aa", "published", {}, activate=True)
    await asyncio.sleep(0.005)
    bob = await s.add_message("discord", "m1", "c1", "bob", "Bob", "hi there")
    await s.add_reply("discord", "c1", bob, 1, "hello", [1], [2], [-1.0], 0.8, 0.95, 12)
    await asyncio.sleep(0.005)
    alice = await s.add_message("discord", "m2", "c1", "alice", "Alice", "and me?")        # bob's words in context
    to_alice = await s.add_reply("discord", "c1", alice, 1, "you too", [1], [2], [-1.0], 0.8, 0.95, 12)
    await s.set_vote(to_alice, "alice", "👍", 1.0)
    await s.set_vote(to_alice, "bob", "👍", 1.0)
    await asyncio.sleep(0.005)
    await s.add_version(2, 1, str(folders[1]), "bb", "published", {}, activate=True)
    await s.add_version(3, 2, str(folders[2]), "cc", "published", {}, activate=True)
    await s.add_version(4, 3, None, None, "rejected", {}, reason="KL too high")

    refused = await core.on_command(Command("discord", "c1", "alice", "forget", {"user": "bob"}))
    assert not refused.ok and (await s.counts())["messages"] == 2
    nobody = await core.on_command(Command("discord", "c1", "carol", "forget"))
    assert nobody.text == ("Forgot user carol: 0 messages, 0 replies, 0 votes deleted. "
                           "No published version was trained on their data.")
    result = await core.on_command(Command("discord", "c1", "bob", "forget", prefix="/reactlearn "))
    back = "0 to serve the base model" if pruned else "1 to serve v1"
    assert result.ok and result.text == (
        "Forgot user bob: 1 messages, 2 replies, 1 votes deleted. 1 of the replies answered other people in "
        "channels where they wrote (their words may have been in the context), with 1 vote on them. "
        f"Versions trained on their data: v2, v3. An admin can /reactlearn rollback {back}, the newest version "
        "made before their data.")
    assert await s.counts() == {"messages": 1, "replies": 0, "votes": 0, "rated": 0}   # alice's message stays


def test_a_long_list_of_versions_keeps_its_ends():
    assert _version_list([3, 4]) == "v3, v4"
    assert _version_list(list(range(3, 23))) == "v3, v4, v5, … v21, v22 (20 versions)"
