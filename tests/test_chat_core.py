"""The chat core's own rules, with the real store and policy (the tiny model)."""

from __future__ import annotations

from bot.chat import POST_TRIES


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
