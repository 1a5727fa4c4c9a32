"""The Slack adapter: the real slack-bolt AsyncApp in Socket Mode against the loopback fake
(tests/fakes/slack_server.py), with the real chat core, store and a tiny real policy."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path

import pytest

from bot.adapters.slack import SlackAdapter, escape, parse_command, slack_name, split_text
from bot.chat import STORE_TEXT, ChatCore
from bot.limits import FLOOD_WRITES
from bot.policy import Policy
from bot.rewards import THUMBS_DOWN, THUMBS_UP
from bot.store import Store
from tests.conftest import STREAMING, make_config
from tests.fakes.slack_server import FakeSlack

CMD = "/reactlearn"


class Bot:
    """One running bot: config, store, policy, core, and the Slack adapter connected to ``fake``."""

    def __init__(self, cfg, store, policy, core, adapter, fake):
        self.cfg, self.store, self.policy, self.core, self.adapter, self.fake = cfg, store, policy, core, adapter, fake

    async def rows(self, sql: str, args=()) -> list[tuple]:
        return [tuple(r) for r in await self.store._all(sql, args)]

    def prompt_text(self, reply) -> str:
        return self.policy.tokenizer.decode(reply.prompt_ids)


@contextlib.asynccontextmanager
async def running_slack(fake: FakeSlack, core: ChatCore, cfg, **kw):
    """Start SlackAdapter.start() in a task until it is connected; close it afterwards."""
    adapter = SlackAdapter(core, cfg, client=fake.make_client(), **kw)
    task = asyncio.create_task(adapter.start(fake.bot_token, fake.app_token))
    ready = asyncio.create_task(adapter.ready.wait())
    done, _ = await asyncio.wait({task, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
    assert ready in done, "slack adapter did not connect"
    await fake.wait_connected()
    try:
        yield adapter
    finally:
        await adapter.close()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def slack_bot(tmp_path: Path, model_dir: Path, update_seconds: float | None = None, **sections):
    sections.setdefault("chat", {}).setdefault("rate_limit_per_minute", 0)
    cfg = make_config(tmp_path, model_dir, **sections)
    store = await Store.open(cfg.db_path)
    policy = Policy.from_config(cfg)
    core = ChatCore(cfg, store, policy)
    kw = {"update_seconds": update_seconds} if update_seconds is not None else {}
    try:
        async with FakeSlack() as fake:
            async with running_slack(fake, core, cfg, **kw) as adapter:
                yield Bot(cfg, store, policy, core, adapter, fake)
                for env in list(fake.envelopes):      # every envelope was acked (none left to retry)
                    await fake.wait_ack(env, timeout=5)
    finally:
        policy.close()
        await store.close()


async def until(check, timeout: float = 10, what: str = "condition"):
    """Poll an async (or plain) check until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def settle(fake: FakeSlack) -> None:
    """Every envelope acked, then a moment for listeners that run after their ack."""
    for env in list(fake.envelopes):
        await fake.wait_ack(env)
    await asyncio.sleep(0.3)


async def ask(bot: Bot, channel: str, user: str, text: str, **kw) -> tuple[str, dict, int]:
    """Post a message, wait for the bot's threaded reply and its reply row. Returns (ts, reply msg
    as it stands once linked: a streamed reply is updated in place, reply id)."""
    ts = await bot.fake.user_message(channel, user, text, **kw)
    root = kw.get("thread_ts") or ts
    reply = await bot.fake.wait_bot_message(channel, thread_ts=root)
    key = f"{reply['channel']}:{reply['ts']}"
    reply_id = await until(lambda: bot.store.reply_for_message("slack", key), what=f"reply row for {key}")
    return ts, current(bot.fake, reply), reply_id


def current(fake: FakeSlack, message: dict) -> dict:
    """The bot message as it stands now (chat.update keeps ``fake.bot_messages`` current)."""
    return copy.deepcopy(next(m for m in fake.bot_messages
                              if m["channel"] == message["channel"] and m["ts"] == message["ts"]))


def bot_messages_in_thread(fake: FakeSlack, channel: str, ts: str) -> list[dict]:
    return [m for m in fake.bot_messages if m["channel"] == channel and m.get("thread_ts") == ts]


# -- pure helpers --------------------------------------------------------------


def test_split_escape_and_names():
    text = "word " * 2000 + "&" * 3000
    chunks = split_text(escape(text), 4000)
    assert all(len(c) <= 4000 for c in chunks) and len(chunks) >= 5
    assert "".join(chunks).replace(" ", "") == escape(text).replace(" ", "")
    assert all(not c.endswith(("&", "&a", "&am", "&amp")) for c in chunks)   # entities are never cut
    assert split_text("short") == ["short"] and split_text("   ") == ["…"]
    assert escape("<!channel> & <@U1>") == "&lt;!channel&gt; &amp; &lt;@U1&gt;"
    assert [slack_name(e) for e in (THUMBS_UP, THUMBS_DOWN, "👍🏽", "❤️", ":partyparrot:", "🦜")] == \
        ["+1", "-1", "+1", "heart", "partyparrot", None]
    assert parse_command("rollback 3") == ("rollback", {"version": "3"})
    assert parse_command("forget <@U2|bob>") == ("forget", {"user": "U2"})
    assert parse_command("FORGET W123") == ("forget", {"user": "W123"})
    assert parse_command("forget") == ("forget", {})
    assert parse_command("forget @bob") is None
    assert parse_command("") == ("", {}) and parse_command("help") == ("", {})
    assert parse_command("status") == ("status", {})


@pytest.mark.parametrize("toml, message", [
    ('[slack]\ncommand = "reactlearn"\n', "'slack.command': must be a slash command"),
    ('[slack]\nmessage_chars = 50000\n', "'slack.message_chars': must be between 20 and 40000"),
    ('platforms = ["slack"]\n', "SLACK_BOT_TOKEN and SLACK_APP_TOKEN must both be set"),
])
def test_bad_slack_config_names_the_key(tmp_path, toml, message):
    from bot.config import ConfigError, load_config

    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={"SLACK_BOT_TOKEN": "xoxb-1"})


def test_manifest_asks_for_what_the_adapter_uses():
    yaml = pytest.importorskip("yaml")
    from bot.config import SlackConfig

    manifest = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "slack-manifest.yaml").read_text())
    settings, features = manifest["settings"], manifest["features"]
    assert settings["socket_mode_enabled"] is True
    assert {"app_mention", "message.channels", "message.groups", "message.im", "message.mpim",
            "reaction_added", "reaction_removed"} <= set(settings["event_subscriptions"]["bot_events"])
    assert {"app_mentions:read", "channels:history", "groups:history", "im:history", "mpim:history", "chat:write",
            "commands", "reactions:read", "reactions:write", "users:read",
            "files:write", "im:write"} <= set(manifest["oauth_config"]["scopes"]["bot"])      # the /status chart
    assert set(manifest["oauth_config"]["scopes"]["bot"]) == set(FakeSlack.SCOPES.split(","))   # the fake's token
    (command,) = features["slash_commands"]
    assert command["command"] == SlackConfig().command and command["should_escape"] is True
    assert "url" not in command                      # Socket Mode: commands come over the socket
    assert features["app_home"]["messages_tab_enabled"] is True


# -- messages ------------------------------------------------------------------


async def test_mention_gets_one_threaded_reply_with_generation_recorded(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        ts, reply, reply_id = await ask(bot, "C1", "U1", "hello there", mention_bot=True)
        assert reply["thread_ts"] == ts and reply["user"] == fake.bot_user_id

        row = await bot.store.get_reply(reply_id)
        assert row.platform == "slack" and row.channel_id == "C1" and row.version == 0
        assert row.prompt_ids and row.output_ids and len(row.output_ids) == len(row.logprobs)
        assert reply["text"] == split_text(escape(row.text or "…"))[0]
        assert "alice: hello there" in bot.prompt_text(row)          # name from users.info, mention stripped
        assert await bot.rows("SELECT platform_message_id, author_id, text FROM messages") == \
            [(f"C1:{ts}", "U1", "hello there")]

        # the seeds: 👍 and 👎 as Slack names; their echoes are not votes
        await fake.wait_bot_reaction("C1", reply["ts"], "+1")
        await fake.wait_bot_reaction("C1", reply["ts"], "-1")
        await settle(fake)
        # app_mention + message for one mention: exactly one reply, every envelope acked
        assert len(bot_messages_in_thread(fake, "C1", ts)) == 1
        assert (await bot.store.counts())["replies"] == 1 and (await bot.store.counts())["votes"] == 0
        assert {e.event["type"] for e in fake.envelopes if e.event and e.event.get("ts") == ts} == \
            {"app_mention", "message"}
        assert fake.unknown_calls == []


async def test_thread_reply_continues_the_context(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir, sampling={"max_new_tokens": 6}) as bot:
        fake = bot.fake
        ts, first, first_id = await ask(bot, "C1", "U1", "tell me a joke", mention_bot=True)
        # bob answers in that thread without mentioning the bot: it is the bot's thread, so it replies
        _, second, second_id = await ask(bot, "C1", "U2", "and another one", thread_ts=ts)
        assert second["thread_ts"] == ts and second_id != first_id
        prompt = bot.prompt_text(await bot.store.get_reply(second_id))
        first_text = (await bot.store.get_reply(first_id)).text.strip()
        assert "alice: tell me a joke" in prompt and "bob: and another one" in prompt
        assert prompt.index("alice: tell me a joke") < prompt.index("bob: and another one")
        if first_text:
            assert first_text in prompt                  # the bot's own reply is an assistant turn
        assert prompt.count("and another one") == 1      # the message itself is not also history
        # whose words the context held, as the adapter named them (for /forget): alice's and bob's
        assert await bot.rows("SELECT user_id FROM reply_context_authors WHERE reply_id = ? ORDER BY user_id",
                              (second_id,)) == [("U1",), ("U2",)]

        # not addressed: a top-level message, and a thread the bot is not in
        other = await fake.user_message("C1", "U1", "just chatting")
        await fake.user_message("C1", "U2", "me too", thread_ts=other)
        await settle(fake)
        assert bot_messages_in_thread(fake, "C1", other) == []
        assert len(fake.bot_messages) == 2


async def test_dms_and_configured_channels(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir, chat={"channels": ["C2"]}) as bot:
        fake = bot.fake
        ts, reply, _ = await ask(bot, "D1", "U1", "psst")                 # a DM: no mention needed
        assert reply["thread_ts"] == ts
        ts2, reply2, _ = await ask(bot, "C2", "U2", "anyone here?")        # a configured channel
        assert reply2["thread_ts"] == ts2
        await fake.user_message("C1", "U2", "not for you")                # elsewhere: only mentions
        await settle(fake)
        assert len(fake.bot_messages) == 2

    async with slack_bot(tmp_path / "nodm", tiny_model_dir, chat={"reply_in_dms": False}) as bot:
        await bot.fake.user_message("D1", "U1", "psst")
        await settle(bot.fake)
        assert bot.fake.bot_messages == []


async def test_own_and_other_bots_events_are_ignored(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir, chat={"channels": ["C2"]}) as bot:
        fake = bot.fake
        fake.add_user("UOTHERBOT", "otherbot", is_bot=True)
        ts, reply, reply_id = await ask(bot, "C2", "U1", "hi")
        # another bot writing in an answered channel, even mentioning us: no reply
        await fake.user_message("C2", "UOTHERBOT", "beep", bot=True, mention_bot=True)
        # an edit (message_changed) and a join are not messages to answer
        await fake.push_event({"type": "message", "subtype": "message_changed", "channel": "C2", "hidden": True,
                               "ts": "1700000999.000100", "message": {"text": "<@UBOT> edited", "user": "U1"}})
        await fake.push_event({"type": "message", "subtype": "channel_join", "channel": "C2", "user": "U2",
                               "text": "<@U2> has joined the channel", "ts": "1700000999.000200"})
        # the other bot reacting 👍 to our reply, and our own seeds: no votes
        await fake.react("C2", reply["ts"], "UOTHERBOT", "+1")
        await fake.wait_bot_reaction("C2", reply["ts"], "+1")
        await settle(fake)
        assert len(fake.bot_messages) == 1                    # our own echo did not start a loop
        assert (await bot.store.counts())["votes"] == 0
        assert (await bot.store.counts())["messages"] == 1


async def test_seeds_only_on_generated_replies(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir, chat={"rate_limit_per_minute": 1}) as bot:
        fake = bot.fake
        ts, reply, _ = await ask(bot, "C1", "U1", "one", mention_bot=True)
        await fake.wait_bot_reaction("C1", reply["ts"], "+1")
        ts2 = await fake.user_message("C1", "U1", "two", mention_bot=True)      # over the per-user limit
        note = await fake.wait_bot_message("C1", thread_ts=ts2)
        assert "faster than I can learn" in note["text"]
        await settle(fake)
        assert [r["ts"] for r in fake.bot_reactions] == [reply["ts"], reply["ts"]]

    async with slack_bot(tmp_path / "noseed", tiny_model_dir, rewards={"seed_reactions": False}) as bot:
        await ask(bot, "C1", "U1", "one", mention_bot=True)
        await settle(bot.fake)
        assert bot.fake.calls_to("reactions.add") == []


# -- streamed replies ------------------------------------------------------------

UPDATE = 0.15      # seconds between chat.update calls here (the adapter's pace is 1.2)


async def test_streamed_reply_is_updated_in_place(tmp_path, endless_model_dir):
    async with slack_bot(tmp_path, endless_model_dir, update_seconds=UPDATE, **STREAMING) as bot:
        fake = bot.fake
        ts = await fake.user_message("C1", "U1", "tell me a long story", mention_bot=True)
        first = await fake.wait_bot_message("C1", thread_ts=ts)
        key = f"C1:{first['ts']}"
        reply_id = await until(lambda: bot.store.reply_for_message("slack", key), what="reply row")
        row = await bot.store.get_reply(reply_id)
        assert len(row.output_ids) == len(row.logprobs) == 300
        # one message, posted with the first words, then updated in place as the reply grew
        history = fake.text_history("C1", first["ts"])
        assert len(history) >= 3, history                       # posted, >= 1 update on the way, final
        assert history[-1] == current(fake, first)["text"] == split_text(escape(row.text))[0]
        assert all(len(a) < len(b) and b.startswith(a) for a, b in zip(history, history[1:]))
        assert len(bot_messages_in_thread(fake, "C1", ts)) == 1
        paced = [e["at"] for e in fake.edits_of("C1", first["ts"])][:-1]   # the last is the final text
        # the pace, as the fake saw it: one request's latency can shorten one gap, not the mean
        assert len(paced) < 2 or (paced[-1] - paced[0]) / (len(paced) - 1) >= UPDATE - 0.05, paced
        # seeds on the reply; a vote counts
        await fake.wait_bot_reaction("C1", first["ts"], "+1")
        await fake.wait_bot_reaction("C1", first["ts"], "-1")
        await fake.react("C1", first["ts"], "U2", "+1")
        assert await until(lambda: bot.store.votes_for(reply_id), what="vote") == [("U2", THUMBS_UP, 1.0)]
        await settle(fake)
        assert fake.unknown_calls == []


@pytest.mark.parametrize("failing", [1, None], ids=["one-update-fails", "every-update-fails"])
async def test_a_failing_update_never_loses_the_reply(tmp_path, endless_model_dir, failing):
    async with slack_bot(tmp_path, endless_model_dir, update_seconds=UPDATE, **STREAMING) as bot:
        fake = bot.fake
        fake.fail("chat.update", "internal_error", times=failing)
        ts = await fake.user_message("C1", "U1", "tell me a long story", mention_bot=True)
        first = await fake.wait_bot_message("C1", thread_ts=ts)
        # one failed update stops the streaming: then only the final text is tried; when that
        # fails too, the reply is posted afresh in the thread
        final = first if failing == 1 else await fake.wait_bot_message("C1", thread_ts=ts, timeout=20)
        key = f"C1:{final['ts']}"
        reply_id = await until(lambda: bot.store.reply_for_message("slack", key), what="reply row")
        row = await bot.store.get_reply(reply_id)
        assert current(fake, final)["text"] == split_text(escape(row.text))[0]
        assert [c.ok for c in fake.calls_to("chat.update")] == ([False, True] if failing == 1 else [False, False])
        assert len(bot_messages_in_thread(fake, "C1", ts)) == (1 if failing == 1 else 2)
        await fake.wait_bot_reaction("C1", final["ts"], "+1")
        await fake.react("C1", final["ts"], "U2", "-1")
        assert await until(lambda: bot.store.votes_for(reply_id), what="vote") == [("U2", THUMBS_DOWN, -1.0)]
        await settle(fake)
        assert {r["ts"] for r in fake.bot_reactions} == {final["ts"]}


# -- reactions -----------------------------------------------------------------


async def test_reactions_become_votes(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        ts, reply, reply_id = await ask(bot, "C1", "U1", "rate me", mention_bot=True)
        votes = lambda: bot.rows("SELECT reply_id, user_id, emoji, value FROM votes ORDER BY user_id, emoji")

        await fake.react("C1", reply["ts"], "U1", "+1::skin-tone-3")
        await fake.react("C1", reply["ts"], "U2", "thumbsdown")
        expected = [(reply_id, "U1", THUMBS_UP, 1.0), (reply_id, "U2", THUMBS_DOWN, -1.0)]
        await until(lambda: _eq(votes(), expected), what="two votes")

        # removal removes; a second spelling of the same emoji is the same vote
        await fake.react("C1", reply["ts"], "U1", "+1::skin-tone-3", add=False)
        await until(lambda: _eq(votes(), expected[1:]), what="vote removed")
        await fake.react("C1", reply["ts"], "U2", "-1")
        await fake.react("C1", reply["ts"], "U1", "thumbsup")
        await until(lambda: _eq(votes(), expected), what="votes back")

        # not a voting emoji, and a vote on a message that is not a bot reply: ignored
        await fake.react("C1", reply["ts"], "U2", "tada")
        await fake.react("C1", ts, "U2", "+1")
        await settle(fake)
        assert await votes() == expected
        assert (await bot.store.get_reply(reply_id)).reward == 0.0


async def _eq(rows_coro, expected) -> bool:
    return (await rows_coro) == expected


# -- Slack's retries and odd payloads ------------------------------------------


async def test_retried_events_are_handled_once(tmp_path, tiny_model_dir, caplog):
    """Slack delivers an event again (same event_id, retry_attempt 1, "timeout") when its ack did
    not arrive in time: a repeat is acknowledged and skipped."""
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        ts, reply, reply_id = await ask(bot, "C1", "U1", "hello twice", mention_bot=True)
        await fake.wait_bot_reaction("C1", reply["ts"], "-1")
        firsts = fake.envelopes_for(lambda e: e.get("ts") == ts)        # the app_mention and the message
        assert len(firsts) == 2
        for env in firsts:
            again = await fake.redeliver(env)
            assert again.payload["event_id"] == env.payload["event_id"] and again.envelope_id != env.envelope_id
            assert (again.retry_attempt, again.retry_reason) == (1, "timeout")
        await settle(fake)
        assert len(bot_messages_in_thread(fake, "C1", ts)) == 1
        counts = await bot.store.counts()
        assert (counts["messages"], counts["replies"]) == (1, 1)
        assert await bot.rows("SELECT platform_message_id FROM messages") == [(f"C1:{ts}",)]

        # a vote delivered twice is one vote; a retry that arrives after the removal does not bring it back
        add = await fake.react("C1", reply["ts"], "U2", "+1")
        assert await until(lambda: bot.store.votes_for(reply_id), what="vote") == [("U2", THUMBS_UP, 1.0)]
        await fake.redeliver(add)
        await settle(fake)
        assert await bot.store.votes_for(reply_id) == [("U2", THUMBS_UP, 1.0)]
        assert await bot.rows("SELECT COUNT(*) FROM votes") == [(1,)]
        await fake.react("C1", reply["ts"], "U2", "+1", add=False)
        await until(lambda: _eq(bot.store.votes_for(reply_id), []), what="vote removed")
        await fake.redeliver(add, retry_attempt=2)
        await settle(fake)
        assert await bot.store.votes_for(reply_id) == []
        skipped = [r.getMessage() for r in caplog.records if "already delivered" in r.getMessage()]
        assert len(skipped) == 4 and all(r.levelname == "DEBUG" for r in caplog.records
                                         if "already delivered" in r.getMessage())
        assert f"slack: skipped event {add.payload['event_id']} (reaction_added), already delivered: " \
               "retry 2 (timeout)" in skipped


# Each would be answered (a DM) or a vote (on the reply, by U2) if it got through.
MALFORMED = {
    "text not a string": ({"type": "message", "channel": "D1", "user": "U1", "text": 42, "channel_type": "im"},
                          "'text' is int, not str"),
    "message without user": ({"type": "message", "channel": "D1", "text": "hi", "channel_type": "im"},
                             "no 'user' and no 'bot_id'"),
    "user not a string": ({"type": "message", "channel": "D1", "user": {"id": "U1"}, "text": "hi"},
                          "'user' is dict, not str"),
    "ts a number": ({"type": "message", "channel": "D1", "user": "U1", "text": "hi", "ts": 1700000999.5},
                    "'ts' is float, not str"),
    "subtype an object": ({"type": "message", "channel": "D1", "user": "U1", "text": "hi", "subtype": {}},
                          "'subtype' is dict, not str"),
    "mention with null text": ({"type": "app_mention", "channel": "C1", "user": "U1", "text": None}, None),
    "reaction without item": ({"type": "reaction_added", "user": "U2", "reaction": "+1"}, "no 'item'"),
    "item not an object": ({"type": "reaction_added", "user": "U2", "reaction": "+1", "item": "C1"},
                           "'item' is str, not dict"),
    "item without ts": ({"type": "reaction_added", "user": "U2", "reaction": "+1",
                         "item": {"type": "message", "channel": "C1"}}, "no 'ts'"),
    "reaction not a string": ({"type": "reaction_added", "user": "U2", "reaction": ["+1"], "item": "REPLY"},
                              "'reaction' is list, not str"),
    "reaction without user": ({"type": "reaction_removed", "reaction": "+1", "item": "REPLY"}, "no 'user'"),
    "reaction on a file": ({"type": "reaction_added", "user": "U2", "reaction": "+1",
                            "item": {"type": "file", "file": "F1"}}, None),
    "unknown event type": ({"type": "team_join", "user": {"id": "U9"}}, None),
    "type not a string": ({"type": 5, "channel": "D1"}, "'type' is int, not str"),
    "no type": ({"channel": "D1", "text": "hi"}, "no 'type'"),
    "not an object": ("garbage", "the event is str, not an object"),
    "null": (None, "the event is NoneType, not an object"),
}


async def test_malformed_events_are_logged_and_skipped(tmp_path, tiny_model_dir, caplog):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        _, reply, reply_id = await ask(bot, "D1", "U1", "first")
        await fake.wait_bot_reaction("D1", reply["ts"], "-1")
        # a message without text (an optional field) is an empty message: answered in a DM
        blank = fake.next_ts()
        await fake.push_event({"type": "message", "channel": "D1", "user": "U1", "ts": blank, "channel_type": "im"})
        await fake.wait_bot_reaction("D1", (await fake.wait_bot_message("D1", thread_ts=blank))["ts"], "-1")
        await settle(fake)
        assert await bot.rows("SELECT text FROM messages WHERE platform_message_id = ?", (f"D1:{blank}",)) == [("",)]

        for event, _ in MALFORMED.values():
            if isinstance(event, dict):
                event = {"ts": fake.next_ts(), **event}
                if event.get("item") == "REPLY":
                    event["item"] = {"type": "message", "channel": "D1", "ts": reply["ts"]}
            await fake.push_event(event)
        await settle(fake)                                 # every envelope acked: none left to retry
        # still serving
        ts, second, second_id = await ask(bot, "D1", "U1", "still there?")
        assert second["thread_ts"] == ts and second_id != reply_id
        await settle(fake)
        assert len(fake.bot_messages) == 3
        counts = await bot.store.counts()
        assert (counts["messages"], counts["replies"], counts["votes"]) == (3, 3, 0)
        logged = [r.getMessage() for r in caplog.records if r.name.startswith("bot.") and r.levelname == "WARNING"]
        for name, (_, why) in MALFORMED.items():
            if why is not None:
                assert any(why in line for line in logged), (name, why, logged)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= 40]
        assert errors == [], errors                        # no listener raised, bolt failed on none


# -- the slash command ---------------------------------------------------------


async def test_slash_command_as_admin(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir, chat={"admin_user_ids": ["U2"]}) as bot:
        fake = bot.fake
        # a workspace admin (users.info is_admin) asks for a retrain
        rec = await fake.slash(CMD, "retrain", "UADMIN", "C1")
        assert await fake.wait_ack(rec) == {}
        resp = await fake.wait_response(rec)
        assert resp["response_type"] == "ephemeral" and "Retrain request #1 queued" in resp["text"]
        assert await bot.rows("SELECT platform, channel_id, requested_by, status FROM train_requests") == \
            [("slack", "C1", "UADMIN", "pending")]

        # the trainer's result goes back to the channel it came from
        await bot.store.set_request_status(1, "done", "published v1 (mean reward +0.40)")
        assert await bot.core.post_results({"slack": bot.adapter.post}) == 1
        posted = await fake.wait_bot_message("C1")
        assert posted["text"] == "Retrain #1: published v1 (mean reward +0.40)" and "thread_ts" not in posted

        # a configured admin id: rollback, status, forget someone else
        rec = await fake.slash(CMD, "rollback 0", "U2", "C2")
        await fake.wait_ack(rec)
        assert (await fake.wait_response(rec))["text"] == "Rolled back: now serving v0."
        await ask(bot, "C1", "U1", "remember me", mention_bot=True)
        rec = await fake.slash(CMD, "status", "U2", "C1")
        assert "Replies: 1" in (await fake.wait_response(rec))["text"]
        assert (await fake.wait_shared_file("DU2"))["filename"] == "status.png"    # bob's new DM with the bot
        rec = await fake.slash(CMD, "forget <@U1|alice>", "U2", "C1")
        assert (await fake.wait_response(rec))["text"].startswith("Forgot user U1: 1 messages, 1 replies")
        assert (await bot.store.counts())["messages"] == 0
        rec = await fake.slash(CMD, "rollback soon", "U2", "C1")
        assert (await fake.wait_response(rec))["text"] == \
            "Usage: /reactlearn rollback VERSION (a number, see /reactlearn status)."
        rec = await fake.slash(CMD, "", "U2", "C1")
        assert "Usage: /reactlearn retrain" in (await fake.wait_response(rec))["text"]
        for env in fake.envelopes:        # the ack frame may trail respond()'s POST; it still comes
            if env.type == "slash_commands":
                assert await fake.wait_ack(env) == {}


async def test_slash_command_as_non_admin(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        await ask(bot, "C1", "U2", "bob was here", mention_bot=True)
        for text, answer in [("retrain", "Only admins can use /reactlearn retrain."),
                             ("rollback 0", "Only admins can use /reactlearn rollback."),
                             ("forget <@U2|bob>", "You can only forget yourself; admins can forget others.")]:
            rec = await fake.slash(CMD, text, "U1", "C1")
            assert await fake.wait_ack(rec) == {}
            resp = await fake.wait_response(rec)
            assert resp == {"text": answer, "response_type": "ephemeral"} or \
                (resp["text"] == answer and resp["response_type"] == "ephemeral")
        assert await bot.rows("SELECT * FROM train_requests") == []
        assert (await bot.store.counts())["messages"] == 1             # bob's data untouched
        # anyone may forget themselves; status is open to all
        rec = await fake.slash(CMD, "forget", "U2", "C1")
        assert (await fake.wait_response(rec))["text"].startswith("Forgot user U2: 1 messages")
        rec = await fake.slash(CMD, "status", "U1", "C1")
        assert "Active version: v0" in (await fake.wait_response(rec))["text"]
        await fake.wait_shared_file("D1")
        assert fake.bot_messages[1:] == []                              # answers were ephemeral only
        assert fake.files_shared_to("C1") == []                         # the chart went to alice's DM


PNG = b"\x89PNG\r\n\x1a\n"


def chart_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "bot.adapters.slack" and r.levelno >= 30 and "chart" in r.getMessage()]


async def test_status_chart_goes_to_the_askers_dm(tmp_path, tiny_model_dir, caplog):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        rec = await fake.slash(CMD, "status", "U1", "C1")
        text = await fake.wait_response(rec)
        assert text["response_type"] == "ephemeral" and "Active version: v0" in text["text"]
        shared = await fake.wait_shared_file()
        chart = (Path(bot.cfg.data_dir).expanduser() / "status.png").read_bytes()
        assert shared["channel"] == "D1" and shared["data"] == chart and chart.startswith(PNG)
        assert (shared["filename"], shared["title"], shared["thread_ts"]) == ("status.png", "reactlearn status", None)
        assert fake.files[shared["file_id"]]["length"] == len(chart)
        assert [c.args["users"] for c in fake.calls_to("conversations.open")] == ["U1"]
        # not in the channel where it was asked; the ephemeral answer says where it is
        assert [f["channel"] for f in fake.shared_files] == ["D1"] and fake.files_shared_to("C1") == []
        note = await fake.wait_response(rec, index=1)
        assert note == {"text": "The chart is in your direct messages with <@UBOT>.", "response_type": "ephemeral"}

        # asked in that DM: the chart lands there, with no note; the file_share echoes are no messages to answer
        rec = await fake.slash(CMD, "status", "U1", "D1")
        await fake.wait_response(rec)
        assert (await fake.wait_shared_file("D1", index=1))["data"] == \
            (Path(bot.cfg.data_dir).expanduser() / "status.png").read_bytes()
        await settle(fake)
        assert len(rec.responses) == 1 and fake.bot_messages == []
        assert [m.get("subtype") for m in fake.messages["D1"]] == ["file_share", "file_share"]
        assert chart_warnings(caplog) == []


@pytest.mark.parametrize("scopes, failing, reason", [
    ("files:write", None, "missing_scope (the app lacks the files:write scope"),
    ("im:write", None, "missing_scope (the app lacks the im:write scope"),
    ("", "upload", "Failed to upload a file (status: 500"),
    ("", "files.completeUploadExternal", "file_uploads_disabled"),
])
async def test_status_text_arrives_when_the_chart_cannot(tmp_path, tiny_model_dir, caplog, scopes, failing, reason):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        if scopes:
            fake.scopes = ",".join(s for s in fake.SCOPES.split(",") if s != scopes)
        if failing == "upload":
            fake.fail_uploads(status=500)
        elif failing:
            fake.fail(failing, "file_uploads_disabled")
        rec = await fake.slash(CMD, "status", "U1", "C1")
        assert "Active version: v0" in (await fake.wait_response(rec))["text"]
        await until(lambda: chart_warnings(caplog), what="the chart's failure logged")
        await settle(fake)
        (warning,) = chart_warnings(caplog)
        assert warning.startswith("slack: the /status chart was not sent to U1: ") and reason in warning, warning
        assert len(rec.responses) == 1 and fake.shared_files == []     # no note about a chart that isn't there
        assert not any(c.method == "files.completeUploadExternal" and c.ok for c in fake.calls)
        # the same scope missing on the next /status: the text again, the reason logged again, once
        rec = await fake.slash(CMD, "status", "U1", "C1")
        assert "Active version: v0" in (await fake.wait_response(rec))["text"]
        await until(lambda: len(chart_warnings(caplog)) == 2, what="the second failure logged")


# -- limits ----------------------------------------------------------------------


async def test_long_reply_is_split(tmp_path, tiny_model_dir):
    limit = 20
    async with slack_bot(tmp_path, tiny_model_dir, slack={"message_chars": limit},
                         sampling={"max_new_tokens": 64}) as bot:
        fake = bot.fake
        for attempt in range(4):      # a random tiny model may stop early; one long reply is enough
            ts, first, reply_id = await ask(bot, "C1", "U1", f"say a lot {attempt}", mention_bot=True)
            text = (await bot.store.get_reply(reply_id)).text
            if len(escape(text)) > limit:
                break
        else:
            pytest.fail("the tiny model never wrote more than 20 characters")
        chunks = split_text(escape(text), limit)
        assert len(chunks) >= 2
        await until(lambda: len(bot_messages_in_thread(fake, "C1", ts)) == len(chunks), what="all parts")
        posted = bot_messages_in_thread(fake, "C1", ts)
        assert [m["text"] for m in posted] == chunks and all(len(m["text"]) <= limit for m in posted)
        linked = await until(lambda: _linked(bot, reply_id, len(chunks)), what="parts linked")
        assert sorted(linked) == sorted(f"C1:{m['ts']}" for m in posted)
        # a vote on any part counts for the reply; seeds sit on the first part
        await fake.wait_bot_reaction("C1", posted[0]["ts"], "+1")
        await fake.react("C1", posted[-1]["ts"], "U2", "+1")
        await until(lambda: bot.store.votes_for(reply_id), what="vote on the last part")

        # a long trainer result (not generated) is split at the default too
        await bot.store.add_train_request("slack", "C2", "UADMIN")
        bot.cfg.slack.message_chars = 4000
        await bot.store.set_request_status(1, "done", "x" * 9000)
        await bot.core.post_results({"slack": bot.adapter.post})
        parts = [m for m in fake.bot_messages if m["channel"] == "C2"]
        assert [len(m["text"]) for m in parts] == [4000, 4000, 1000 + len("Retrain #1: ")]


async def _linked(bot: Bot, reply_id: int, n: int):
    rows = await bot.rows("SELECT platform_message_id FROM reply_messages WHERE reply_id = ?", (reply_id,))
    return [r[0] for r in rows] if len(rows) == n else None


async def test_rate_limited_calls_are_waited_out(tmp_path, tiny_model_dir):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        fake.rate_limit("chat.postMessage", times=2, retry_after=1)
        fake.rate_limit("reactions.add", times=1, retry_after=1)
        ts, reply, reply_id = await ask(bot, "C1", "U1", "are you there?", mention_bot=True)
        assert [c.status for c in fake.calls_to("chat.postMessage")] == [429, 429, 200]
        assert len(bot_messages_in_thread(fake, "C1", ts)) == 1
        await fake.wait_bot_reaction("C1", reply["ts"], "+1")
        await fake.wait_bot_reaction("C1", reply["ts"], "-1")
        assert [c.status for c in fake.calls_to("reactions.add")][:2] == [429, 200]


# -- trust: any text, a failing store, reaction floods ------------------------------------


def core_errors(caplog) -> list:
    return [r for r in caplog.records if r.levelno >= 30 and r.name == "bot.chat"]


# Socket Mode frames are JSON: a lone surrogate arrives as a "\ud800" escape, which json.loads
# turns into a lone surrogate in a str. 1 MB: slack_sdk's client refuses frames over 4 MiB, and
# Slack itself cuts message text at 40,000 characters.
ANY_TEXT = {
    "surrogates": "lone \ud800 surrogates \udfff here",
    "nul": "nul\x00 bytes\x00\x00 inside",
    "controls": "controls \x1b[31m red \r\x07\x08\x7f\x85 end",
    "1MB": "y" * (1024 * 1024) + " what now?",
}


@pytest.mark.parametrize("kind", list(ANY_TEXT))
async def test_any_text_gets_a_reply_and_the_bot_keeps_serving(tmp_path, tiny_model_dir, caplog, kind):
    text = ANY_TEXT[kind]
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        ts, reply, reply_id = await ask(bot, "C1", "U1", text, mention_bot=True)
        assert reply["thread_ts"] == ts
        [(stored,)] = await bot.rows("SELECT text FROM messages")
        expected = text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd").strip()
        assert stored == expected[-bot.cfg.chat.max_message_chars:]
        _, reply2, _ = await ask(bot, "C1", "U2", "and now something else", mention_bot=True)   # still serving
        assert reply2["text"]
        assert core_errors(caplog) == []


async def test_a_store_that_refuses_writes_answers_with_an_apology(tmp_path, tiny_model_dir, caplog):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        await bot.store.db.execute("PRAGMA query_only = 1")      # SQLite refuses writes, as on a read-only disk
        ts = await fake.user_message("C1", "U1", "hello?", mention_bot=True)
        notice = await fake.wait_bot_message("C1", thread_ts=ts)
        assert notice["text"] == escape(STORE_TEXT)
        [rec] = core_errors(caplog)
        assert "could not store the message" in rec.getMessage()
        await bot.store.db.execute("PRAGMA query_only = 0")
        await ask(bot, "C1", "U1", "hello again", mention_bot=True)    # serving again by itself
        await settle(fake)
        assert not [r for r in fake.bot_reactions if r.get("ts") == notice["ts"]]   # no seeds on the notice


async def test_a_reaction_flood_costs_bounded_work_and_stores_the_final_state(tmp_path, tiny_model_dir, caplog):
    async with slack_bot(tmp_path, tiny_model_dir) as bot:
        fake = bot.fake
        ts, reply, reply_id = await ask(bot, "C1", "U1", "vote on me", mention_bot=True)
        await fake.wait_bot_reaction("C1", reply["ts"], "-1")
        await settle(fake)
        before, lookups = bot.store.db.total_changes, len(fake.calls_to("users.info"))
        handled = lambda: [r for r in caplog.records if r.name == "bot.adapters.slack"
                           and r.getMessage().startswith(f"slack: reaction :+1: on C1/{reply['ts']} by U2")]
        logged = len([r for r in caplog.records if r.name == "bot.chat"])
        for i in range(501):                                  # U2 toggles 👍: add, remove, ..., add
            await fake.react("C1", reply["ts"], "U2", "+1", add=i % 2 == 0)
        await until(lambda: len(handled()) == 501, timeout=60, what="501 reactions handled")
        assert len(fake.calls_to("users.info")) - lookups <= 1      # one lookup of U2, not one per event
        # slack_sdk hands events over concurrently, so toggles may arrive swapped: their event_ts
        # keeps them in order (a late older one is dropped), and the writes stay bounded
        assert bot.store.db.total_changes - before <= FLOOD_WRITES
        assert await bot.core.flush_votes() <= 1                    # what the background poll does
        assert await bot.rows("SELECT user_id, emoji, value FROM votes") == [("U2", THUMBS_UP, 1.0)]
        assert bot.store.db.total_changes - before <= FLOOD_WRITES + 1
        assert len([r for r in caplog.records if r.name == "bot.chat"]) - logged <= FLOOD_WRITES + 2
