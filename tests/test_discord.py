"""The Discord adapter end to end: the real discord.py client against the loopback fake
Discord (tests/fakes/discord/), with the real ChatCore, Store and Policy on the
tiny random model. Nothing of the project is mocked; assertions read the fake's records
(what reached "Discord"), the SQLite file (what the trainer will see) and what the real
ChatCore.on_reaction returned for each reaction (recorded around the call)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from bot.adapters.discord import LIMIT, DiscordAdapter, split_text
from bot.chat import STORE_TEXT, ChatCore
from bot.config import Config, validate
from bot.events import Reaction
from bot.limits import FLOOD_WRITES
from bot.policy import Policy
from bot.store import Store
from tests.conftest import STREAMING, make_config
from tests.tiny_model import build_endless_model
from tests.fakes.discord import (
    ALICE_ID,
    BOB_ID,
    BOT_CHAT_ID,
    BOT_ID,
    CAROL_ID,
    FAKE_TOKEN,
    GENERAL_ID,
    REGULAR_ROLE_ID,
    FakeDiscord,
    running_client,
 SlashNotPermitted)

UP, DOWN = "\N{THUMBS UP SIGN}", "\N{THUMBS DOWN SIGN}"
OTHER_BOT_ID = 3001


# -- harness --------------------------------------------------------------------------


@dataclass
class Bot:
    fake: FakeDiscord
    adapter: DiscordAdapter
    core: ChatCore
    store: Store
    cfg: Config

    async def ask(self, channel_id: int | None, author_id: int, text: str, **kw) -> tuple[dict, dict]:
        """Post a user message; return (user message, the bot's first answer message)."""
        msg = await self.fake.user_message(channel_id, author_id, text, **kw)
        where = self.fake.dm_channel_id(author_id) if channel_id is None else channel_id
        answer = await self.fake.wait_bot_message(where, timeout=20)
        return msg, answer

    async def reply_id(self, discord_message: dict) -> int:
        """The store's reply id linked to a bot message (waits for the link)."""
        return await eventually(lambda: self.store.reply_for_message("discord", discord_message["id"]))

    async def seeded(self, discord_message: dict) -> list[str]:
        """Wait until the bot's own 👍/👎 are on its reply, and until it has ignored their echo."""
        mid = int(discord_message["id"])
        await self.fake.wait_for(lambda: len([r for r in self.fake.reactions_by_bot if r["message_id"] == mid]) >= 2)
        for emoji in (UP, DOWN):
            assert (await reaction_outcome(mid, BOT_ID, emoji)) == "ignored: reaction by a bot"
        return [r["emoji"] for r in self.fake.reactions_by_bot if r["message_id"] == mid]

    async def one(self, sql: str, *args):
        async with self.store.db.execute(sql, args) as cur:
            return await cur.fetchone()

    async def count(self, table: str, where: str = "1", *args) -> int:
        return (await self.one(f"SELECT COUNT(*) FROM {table} WHERE {where}", *args))[0]


async def eventually(fn, timeout: float = 60.0, interval: float = 0.02):
    """Poll an async ``fn`` until it returns something truthy (not None/False/0/[])."""
    deadline = time.monotonic() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {value!r})")
        await asyncio.sleep(interval)


# What the real ChatCore.on_reaction returned for each reaction event the adapter handed it,
# in order; start_bot records them around the real call. Once an outcome is here the event has
# been fully handled (a barrier), including the ones that change nothing in the store.
_outcomes: list[tuple[Reaction, str]] = []


def record_reaction_outcomes(core: ChatCore) -> None:
    """Keep what ``core.on_reaction`` returns; the real method still does all the work."""
    real = core.on_reaction

    async def on_reaction(reaction: Reaction) -> str:
        outcome = await real(reaction)
        _outcomes.append((reaction, outcome))
        return outcome

    core.on_reaction = on_reaction


async def reaction_outcome(message_id: int, user_id: int, emoji: str, since: int = 0,
                           timeout: float = 10.0) -> str:
    """What ChatCore answered for the first reaction event of ``user_id`` with ``emoji`` on
    ``message_id`` after event number ``since`` (waits for it)."""
    key = (str(message_id), str(user_id), emoji)

    async def found():
        for reaction, outcome in _outcomes[since:]:
            if (reaction.message_id, reaction.user_id, reaction.emoji) == key:
                return outcome
        return None

    return await eventually(found, timeout)


async def react(fake: FakeDiscord, channel_id: int, message_id, user_id: int, emoji: str, add: bool = True,
                **kw) -> str:
    """A person adds (or removes) a reaction; returns what the bot made of it."""
    mark = len(_outcomes)
    await fake.react(channel_id, message_id, user_id, emoji, add, **kw)
    return await reaction_outcome(int(message_id), user_id, emoji, since=mark)


def discord_config(tmp_path: Path, model_dir: Path, **sections) -> Config:
    chat = {"channels": [str(BOT_CHAT_ID)], "admin_user_ids": [str(CAROL_ID)], "rate_limit_per_minute": 0,
            **sections.pop("chat", {})}
    return validate(make_config(tmp_path, model_dir, chat=chat, discord={"guild_ids": [1]}, **sections))


@pytest_asyncio.fixture
async def fake():
    async with FakeDiscord() as f:
        yield f
        f.assert_clean()


@pytest_asyncio.fixture
async def start_bot(fake, tmp_path, tiny_model_dir):
    """``await start_bot(background=False, model_dir=None, edit_seconds=None, **config sections)``
    → a running Bot."""
    stack = contextlib.AsyncExitStack()
    _outcomes.clear()

    async def start(*, background: bool = False, model_dir: Path | None = None, edit_seconds: float | None = None,
                    **sections) -> Bot:
        cfg = discord_config(tmp_path, model_dir or tiny_model_dir, **sections)
        store = await Store.open(cfg.db_path)
        stack.push_async_callback(store.close)
        policy = Policy.from_config(cfg)
        stack.callback(policy.close)
        core = ChatCore(cfg, store, policy)
        record_reaction_outcomes(core)
        adapter = DiscordAdapter(core, cfg, guild_ready_timeout=0.1,
                                 **({"edit_seconds": edit_seconds} if edit_seconds is not None else {}))
        await stack.enter_async_context(running_client(fake, adapter.client, token=FAKE_TOKEN))
        if background:
            task = asyncio.create_task(core.run_background({"discord": adapter.post}))

            async def stop() -> None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

            stack.push_async_callback(stop)
        return Bot(fake, adapter, core, store, cfg)

    yield start
    await stack.aclose()


# -- split_text (unit) -------------------------------------------------------------------


def test_split_text_limits_and_content():
    assert split_text("hello") == ["hello"]
    assert split_text("") == [""]
    assert split_text("x" * LIMIT) == ["x" * LIMIT]
    words = " ".join(f"word{i}" for i in range(1500))            # ~12k chars, spaces to cut at
    parts = split_text(words)
    assert len(parts) >= 6 and all(0 < len(p) <= LIMIT for p in parts)
    assert " ".join(parts) == words                                # cut at spaces, nothing lost
    assert all(not p.startswith(" ") and p.strip() for p in parts)
    lines = "\n".join("line %d " % i + "y" * 50 for i in range(200))   # newlines win over spaces
    parts = split_text(lines)
    assert len(parts) >= 6 and all(len(p) <= LIMIT for p in parts)
    assert "\n".join(parts) == lines
    exact = "a" * (LIMIT - 1) + " " + "b" * 10                     # a space right at the limit
    assert split_text(exact) == ["a" * (LIMIT - 1), "b" * 10]
    blob = "z" * 4500                                              # nowhere to cut: hard cuts
    assert split_text(blob) == ["z" * 2000, "z" * 2000, "z" * 500]
    assert all(len(p) <= 10 for p in split_text("a b c d e f g h i j k l m n o p", 10))
    spaces = "a" + " " * 3000 + "b"                                # no whitespace-only chunk (Discord refuses them)
    assert [p.strip() for p in split_text(spaces)] == ["a", "b"]


# -- messages -------------------------------------------------------------------------


async def test_mention_gets_a_recorded_reply_with_seeded_reactions(start_bot):
    bot = await start_bot()
    fake = bot.fake
    msg, reply = await bot.ask(GENERAL_ID, BOB_ID, "hello there, how are you?", mentions_bot=True)

    # delivered through REST as a reply to the message, without pinging the author
    assert reply["author"]["id"] == str(BOT_ID)
    assert reply["message_reference"]["message_id"] == msg["id"]
    assert str(BOB_ID) not in [m["id"] for m in reply["mentions"]]
    mentions = bot.adapter.client.allowed_mentions          # model output can never ping anyone
    assert not (mentions.everyone or mentions.users or mentions.roles or mentions.replied_user)
    assert GENERAL_ID in fake.typing_calls
    assert ("POST", f"/channels/{GENERAL_ID}/messages") in fake.requests

    # the store holds what the trainer needs, linked to the Discord message
    rid = await bot.reply_id(reply)
    r = await bot.store.get_reply(rid)
    assert r.platform == "discord" and r.channel_id == str(GENERAL_ID)
    assert r.version == 0 and r.temperature == pytest.approx(bot.cfg.sampling.temperature)
    assert r.top_p == pytest.approx(bot.cfg.sampling.top_p)
    assert r.prompt_ids and r.output_ids and len(r.logprobs) == len(r.output_ids)
    assert all(lp <= 0 for lp in r.logprobs)
    assert len(r.output_ids) <= bot.cfg.sampling.max_new_tokens
    assert reply["content"] == (r.text or "…")
    prompt = bot.core.policy.tokenizer.decode(r.prompt_ids, clean_up_tokenization_spaces=False)
    assert "hello there, how are you?" in prompt and f"<@{BOT_ID}>" not in prompt   # the mention is cleaned
    row = await bot.one("SELECT m.platform_message_id, m.author_id, m.text, m.channel_id FROM replies r "
                        "JOIN messages m ON m.id = r.message_id WHERE r.id = ?", rid)
    assert tuple(row) == (msg["id"], str(BOB_ID), "hello there, how are you?", str(GENERAL_ID))
    assert await bot.count("reply_messages", "reply_id = ?", rid) == 1

    # 👍 and 👎 seeded on the reply; the echoed own reactions are not votes
    assert await bot.seeded(reply) == [UP, DOWN]
    assert fake.reactions_on(int(reply["id"])) == {UP: [BOT_ID], DOWN: [BOT_ID]}
    assert await bot.count("votes") == 0
    # the bot's own reply (echoed back as MESSAGE_CREATE) got no answer and no message row
    await fake.expect_no_bot_message(within=0.3)
    assert await bot.count("messages") == 1 and await bot.count("replies") == 1


async def test_when_the_bot_answers(start_bot):
    bot = await start_bot()
    fake = bot.fake

    # configured channel: every message, no mention needed
    msg, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "anyone here?")
    assert reply["message_reference"]["message_id"] == msg["id"]

    # other channel without mention: silence, nothing stored
    await fake.user_message(GENERAL_ID, BOB_ID, "just chatting with people")
    await fake.expect_no_bot_message(within=0.5)
    assert await bot.count("messages", "platform_message_id = ?", fake.channel_messages(GENERAL_ID)[-1]["id"]) == 0

    # direct message
    dm, dm_reply = await bot.ask(None, CAROL_ID, "a private question", dm=True)
    assert dm_reply["message_reference"]["message_id"] == dm["id"] and "guild_id" not in dm_reply
    dm_rid = await bot.reply_id(dm_reply)
    await bot.seeded(dm_reply)
    assert await react(fake, fake.dm_channel_id(CAROL_ID), dm_reply["id"], CAROL_ID, DOWN) == "added"
    assert await bot.store.votes_for(dm_rid) == [(str(CAROL_ID), DOWN, -1.0)]

    # a reply to one of the bot's messages (no ping) → answered, with the chain as context
    first, first_reply = await bot.ask(GENERAL_ID, ALICE_ID, "what is the weather like?", mentions_bot=True)
    first_text = first_reply["content"]
    await bot.reply_id(first_reply)
    follow, follow_reply = await bot.ask(GENERAL_ID, BOB_ID, "tell me a joke about cats",
                                         reply_to=int(first_reply["id"]), reply_ping=False)
    assert str(BOT_ID) not in [m["id"] for m in follow["mentions"]]      # answered because it is a reply
    assert follow_reply["message_reference"]["message_id"] == follow["id"]
    r = await bot.store.get_reply(await bot.reply_id(follow_reply))
    prompt = bot.core.policy.tokenizer.decode(r.prompt_ids, clean_up_tokenization_spaces=False)
    a = prompt.index("what is the weather like?")
    b = prompt.index(first_text, a)
    c = prompt.index("tell me a joke about cats", b)
    assert a < b < c
    assert "just chatting with people" not in prompt          # the chain, not the channel history


async def test_channel_history_is_context(start_bot):
    bot = await start_bot()
    bot.fake.add_member(5001, r"odd\1name")                             # a name that is no regex replacement
    await bot.fake.user_message(BOT_CHAT_ID, ALICE_ID,
                                f"<@{BOB_ID}> the river bank in <#{GENERAL_ID}> is sunny, ask <@5001>")
    await bot.fake.wait_bot_message(BOT_CHAT_ID, timeout=20)
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "and the fox?")
    r = await bot.store.get_reply(await bot.reply_id(reply))
    prompt = bot.core.policy.tokenizer.decode(r.prompt_ids, clean_up_tokenization_spaces=False)
    # mentions read as people see them, not as <@id> markup
    assert prompt.index(r"alice: @bob the river bank in #general is sunny, ask @odd\1name") < prompt.index(
        "bob: and the fox?")
    assert "<@" not in prompt and "<#" not in prompt


async def test_bot_authors_are_ignored(start_bot):
    bot = await start_bot()
    await bot.fake.user_message(BOT_CHAT_ID, OTHER_BOT_ID, "I am a bot, answer me", bot_author=True)
    await bot.fake.user_message(GENERAL_ID, OTHER_BOT_ID, "me too", bot_author=True, mentions_bot=True)
    await bot.fake.user_message(None, OTHER_BOT_ID, "and in private", bot_author=True, dm=True)
    await bot.fake.expect_no_bot_message(within=0.7)
    assert await bot.count("messages") == 0 and await bot.count("replies") == 0


async def test_system_messages_are_ignored(start_bot):
    """A member joining posts a system message (type 7) in the channel; it is not a question."""
    bot = await start_bot()
    fake = bot.fake
    await fake.system_message(BOT_CHAT_ID, 4001, msg_type=7)          # 4001 joined the server
    await fake.expect_no_bot_message(within=0.7)
    assert await bot.count("messages") == 0


async def test_message_deleted_before_the_reply(start_bot):
    """Deleted while the bot was thinking: the reply still goes out (unlinked) and is recorded."""
    bot = await start_bot()
    fake = bot.fake
    msg = await fake.user_message(BOT_CHAT_ID, BOB_ID, "oops, never mind")
    await fake.delete_message(BOT_CHAT_ID, msg["id"])
    reply = await fake.wait_bot_message(BOT_CHAT_ID, timeout=20)
    assert "message_reference" not in reply and reply["content"]
    rid = await bot.reply_id(reply)
    assert await bot.seeded(reply) == [UP, DOWN]
    assert await react(fake, BOT_CHAT_ID, reply["id"], ALICE_ID, UP) == "added"
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), UP, 1.0)]


@pytest.mark.parametrize("kind", ["long", "zero_width", "rtl", "emoji_flood", "combining"])
async def test_hostile_text_is_handled(start_bot, kind):
    texts = {
        "long": ("the quick brown fox " * 500)[:-9] + "ends HERE",          # 10,000 chars
        "zero_width": "he\u200bll\u200do\u200b " * 300 + "\u200b\u200d",
        "rtl": "\u202e" + "emosewa si siht " * 100 + "\u202c\u200f end",
        "emoji_flood": "😀🔥👍🏽🇺🇳" * 125,                 # 500 emoji, some of 2 code points
        "combining": "Z\u0351\u0358\u0306\u0310a\u0344\u0352l\u0313\u0316g\u0357o\u0301" * 200,
    }
    text = texts[kind]
    if kind == "long":
        assert len(text) == 10_000
    bot = await start_bot(chat={"max_message_chars": 300})
    msg, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, text)
    assert reply["message_reference"]["message_id"] == msg["id"]
    assert 0 < len(reply["content"]) <= LIMIT
    rid = await bot.reply_id(reply)
    stored = (await bot.one("SELECT m.text FROM replies r JOIN messages m ON m.id = r.message_id WHERE r.id = ?",
                            rid))[0]
    assert len(stored) == min(300, len(text.strip())) and text.strip().endswith(stored)
    r = await bot.store.get_reply(rid)
    assert len(r.prompt_ids) <= bot.cfg.model.max_context_tokens and len(r.logprobs) == len(r.output_ids)


async def test_rate_limit_notice(start_bot):
    bot = await start_bot(chat={"rate_limit_per_minute": 2})
    for i in range(2):
        _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, f"question {i}")
        await bot.reply_id(reply)
        await bot.seeded(reply)
    msg, notice = await bot.ask(BOT_CHAT_ID, BOB_ID, "question 2")
    assert "faster than I can learn" in notice["content"]
    assert notice["message_reference"]["message_id"] == msg["id"]
    # not a model reply: no rows, no vote buttons, votes on it do not count
    assert await bot.count("replies") == 2 and await bot.count("messages") == 2
    assert await bot.store.reply_for_message("discord", notice["id"]) is None
    assert await react(bot.fake, BOT_CHAT_ID, notice["id"], ALICE_ID, UP) == "ignored: not one of the bot's replies"
    assert not [r for r in bot.fake.reactions_by_bot if r["message_id"] == int(notice["id"])]
    # more messages in the same minute get no more notices (a flood gets one)
    sent_before = len(bot.fake.bot_messages)
    for i in range(3, 6):
        await bot.fake.user_message(BOT_CHAT_ID, BOB_ID, f"question {i}")
    _, reply = await bot.ask(BOT_CHAT_ID, CAROL_ID, "my turn")
    await bot.reply_id(reply)
    await bot.fake.expect_no_bot_message(BOT_CHAT_ID, within=0.5)      # nothing else comes
    assert "faster than I can learn" not in reply["content"]
    assert len(bot.fake.bot_messages) == sent_before + 1               # Carol's reply, no notice for Bob
    assert await bot.count("messages") == 3
    # someone else is not limited
    await bot.reply_id(reply)


# -- long replies --------------------------------------------------------------------------


def build_wordy_model(folder: Path, base: Path) -> Path:
    """A tiny model that talks long: 600 extra ~120-character "word" tokens (about 2 of 3 sampled
    tokens from the near-uniform random model), and an end-of-turn token outside the model's
    output vocabulary, so every reply runs to max_new_tokens (50 tokens: ~3,900 characters)."""
    words = [f" lorem{i}" + " ipsum dolor sit amet consectetur" * 3 + f" end{i}" for i in range(600)]
    return build_endless_model(folder, base, words)


async def test_long_reply_is_split(start_bot, tiny_model_dir, tmp_path):
    wordy = build_wordy_model(tmp_path / "wordy", tiny_model_dir)
    bot = await start_bot(model_dir=wordy, sampling={"max_new_tokens": 50})
    msg, first = await bot.ask(BOT_CHAT_ID, BOB_ID, "tell me everything", mentions_bot=True)
    rid = await bot.reply_id(first)
    r = await bot.store.get_reply(rid)
    assert len(r.text) > LIMIT, "the wordy model should talk past Discord's limit"
    expected = split_text(r.text)
    parts = [first] + [await bot.fake.wait_bot_message(BOT_CHAT_ID) for _ in expected[1:]]
    assert [p["content"] for p in parts] == expected
    assert len(parts) >= 2 and all(0 < len(p["content"]) <= LIMIT for p in parts)
    assert " ".join(" ".join(p["content"] for p in parts).split()) == " ".join(r.text.split())   # nothing lost
    assert first["message_reference"]["message_id"] == msg["id"]
    assert all("message_reference" not in p for p in parts[1:])
    await eventually(lambda: _equals(bot.count("reply_messages", "reply_id = ?", rid), len(parts)))
    # a vote on any part counts for the whole reply; vote buttons only on the first part
    assert await react(bot.fake, BOT_CHAT_ID, parts[-1]["id"], ALICE_ID, DOWN) == "added"
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), DOWN, -1.0)]
    assert await bot.seeded(first) == [UP, DOWN]
    assert {r["message_id"] for r in bot.fake.reactions_by_bot} == {int(first["id"])}


async def _equals(awaitable, value) -> bool:
    return (await awaitable) == value


# -- streamed replies ----------------------------------------------------------------------

EDIT = 0.15      # seconds between edits here (Discord's pace is EDIT_SECONDS, 1.2)
EDIT_ROUTE = r"/channels/\d+/messages/\d+"


async def test_streamed_reply_is_edited_in_place(start_bot, endless_model_dir):
    bot = await start_bot(model_dir=endless_model_dir, edit_seconds=EDIT, **STREAMING)
    fake = bot.fake
    msg, first = await bot.ask(BOT_CHAT_ID, BOB_ID, "tell me a long story")
    rid = await bot.reply_id(first)
    r = await bot.store.get_reply(rid)
    assert len(r.output_ids) == len(r.logprobs) == 300 and len(r.text) <= LIMIT
    # one message, posted with the first words, then edited in place as the reply grew
    history = fake.content_history(first["id"])
    assert len(history) >= 3, history                               # posted, >= 1 edit on the way, final
    assert history[-1] == first["content"] == r.text                # the stored text is what people see
    assert all(len(a) < len(b) and b.startswith(a) for a, b in zip(history, history[1:]))
    assert first["message_reference"]["message_id"] == msg["id"]
    assert len(fake.bot_messages_in(BOT_CHAT_ID)) == 1
    paced = [e["at"] for e in fake.edits_of(first["id"])][:-1]      # the last edit is the final text
    # the pace, as the fake saw it: one request's latency can shorten one gap, not the mean
    assert len(paced) < 2 or (paced[-1] - paced[0]) / (len(paced) - 1) >= EDIT - 0.05, paced
    # vote buttons on the final reply; a vote counts
    assert await bot.seeded(first) == [UP, DOWN]
    assert await react(fake, BOT_CHAT_ID, first["id"], ALICE_ID, UP) == "added"
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), UP, 1.0)]


@pytest.mark.parametrize("failing", [1, None], ids=["one-edit-fails", "every-edit-fails"])
async def test_a_failing_edit_never_loses_the_reply(start_bot, endless_model_dir, failing):
    bot = await start_bot(model_dir=endless_model_dir, edit_seconds=EDIT, **STREAMING)
    fake = bot.fake
    fake.fail("PATCH", EDIT_ROUTE, times=failing)
    msg, first = await bot.ask(BOT_CHAT_ID, BOB_ID, "tell me a long story")
    if failing == 1:       # streaming stopped at the failed edit; the final edit still went through
        final = first
    else:                  # the final edit failed too: the reply is posted afresh
        final = await bot.fake.wait_bot_message(BOT_CHAT_ID, timeout=20)
    rid = await bot.reply_id(final)
    r = await bot.store.get_reply(rid)
    assert final["content"] == r.text and final["message_reference"]["message_id"] == msg["id"]
    assert [m["id"] for m in fake.bot_messages_in(BOT_CHAT_ID)] == \
        [first["id"]] + ([final["id"]] if final is not first else [])
    # one failed edit stops the streaming: then only the final text is tried
    assert [m for m, _ in fake.failed_requests] == ["PATCH"] * (1 if failing == 1 else 2)
    assert len(fake.message_edits) == (1 if failing == 1 else 0)
    assert await bot.seeded(final) == [UP, DOWN]
    assert {x["message_id"] for x in fake.reactions_by_bot} == {int(final["id"])}
    assert await react(fake, BOT_CHAT_ID, final["id"], ALICE_ID, DOWN) == "added"
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), DOWN, -1.0)]


# -- reactions -----------------------------------------------------------------------------


async def test_reactions_become_votes(start_bot):
    bot = await start_bot()
    fake = bot.fake
    msg, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "rate this one")
    rid = await bot.reply_id(reply)
    await bot.seeded(reply)
    mid = int(reply["id"])

    def vote(user, emoji, add=True, **kw):
        return react(fake, BOT_CHAT_ID, mid, user, emoji, add, **kw)

    assert await vote(ALICE_ID, UP) == "added"
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), UP, 1.0)]
    assert (await bot.store.get_reply(rid)).reward == 1.0

    assert await vote(CAROL_ID, "👍🏽") == "added"                         # skin tone counts as 👍
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), UP, 1.0), (str(CAROL_ID), UP, 1.0)]
    assert await vote(CAROL_ID, "👍🏽", add=False) == "removed"
    assert await vote(ALICE_ID, UP, add=False) == "removed"
    assert await bot.store.votes_for(rid) == []
    assert (await bot.store.get_reply(rid)).reward is None

    assert await vote(BOB_ID, DOWN) == "added"
    assert await bot.store.votes_for(rid) == [(str(BOB_ID), DOWN, -1.0)]
    assert (await bot.store.get_reply(rid)).reward == -1.0
    assert await vote(BOB_ID, UP) == "added"                               # both from one user → 0
    r = await bot.store.get_reply(rid)
    assert r.reward == 0.0 and r.n_voters == 1
    assert await vote(ALICE_ID, UP) == "added"                        # mean over users: (0 + 1) / 2
    assert (await bot.store.get_reply(rid)).reward == 0.5

    assert await vote(CAROL_ID, "🎉") == "ignored: not a voting emoji"
    assert await vote(CAROL_ID, "<:party:123456>") == "ignored: not a voting emoji"   # custom emoji
    assert await vote(OTHER_BOT_ID, UP, bot_user=True) == "ignored: reaction by a bot"
    assert await bot.count("votes", "user_id = ?", str(OTHER_BOT_ID)) == 0

    # not one of the bot's replies: the user's own message, and a plain bot message
    assert await react(fake, BOT_CHAT_ID, msg["id"], CAROL_ID, UP) == "ignored: not one of the bot's replies"
    plain = await bot.adapter.client.get_channel(GENERAL_ID).send("not a reply")
    await fake.wait_bot_message(GENERAL_ID)
    assert await react(fake, GENERAL_ID, plain.id, CAROL_ID, UP) == "ignored: not one of the bot's replies"
    assert await bot.count("votes") == 3


async def test_malformed_and_odd_payloads_are_skipped(start_bot, caplog):
    """Gateway payloads discord.py cannot parse are logged and dropped (the connection stays up);
    odd but valid values reach the adapter's handlers and change nothing; the bot keeps serving."""
    bot = await start_bot()
    fake = bot.fake
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "first")
    rid = await bot.reply_id(reply)
    await bot.seeded(reply)
    identified = fake.identify_count
    chat = str(BOT_CHAT_ID)

    def raw_reaction(emoji, **extra) -> dict:
        return {"user_id": str(ALICE_ID), "channel_id": chat, "guild_id": "1", "message_id": reply["id"],
                "emoji": emoji, "burst": False, "type": 0, **extra}

    # a message without author (discord.py builds a Message lacking .author), and what discord.py's
    # own parsers raise on: an emoji that is not an object, a member without its user
    await fake.dispatch("MESSAGE_CREATE", {"id": "90001", "channel_id": chat, "guild_id": "1", "content": "x",
                                           "type": 0})
    await fake.dispatch("MESSAGE_REACTION_ADD", raw_reaction(None))
    await fake.dispatch("MESSAGE_REACTION_ADD", raw_reaction({"id": None, "name": UP}, member={"roles": []}))
    # odd values the adapter's handlers get: an empty message, a bare mention replying to a message
    # that does not exist (answered), emoji without a name (a custom one too)
    await fake.user_message(GENERAL_ID, BOB_ID, "")
    await fake.user_message(GENERAL_ID, BOB_ID, "", mentions_bot=True, reply_to=999999)
    answered = await fake.wait_bot_message(GENERAL_ID, timeout=20)
    await bot.reply_id(answered)
    await bot.seeded(answered)                  # the echo of its own seed emoji is not one of Alice's below
    mark = len(_outcomes)
    for emoji in ({"id": None, "name": None}, {"id": "5", "name": None}, {"id": None, "name": ""}):
        await fake.dispatch("MESSAGE_REACTION_ADD", raw_reaction(emoji))

    def alices() -> list[str]:
        return [o for r, o in _outcomes[mark:] if r.user_id == str(ALICE_ID)]

    await eventually(lambda: _at_least(len(alices()), 3))
    assert alices() == ["ignored: not a voting emoji"] * 3

    # still serving, on the same connection
    msg, second = await bot.ask(BOT_CHAT_ID, ALICE_ID, "still there?")
    assert second["message_reference"]["message_id"] == msg["id"]
    await bot.reply_id(second)
    assert fake.identify_count == identified and bot.adapter.client.is_ready()
    assert await bot.store.votes_for(rid) == [] and await bot.count("votes") == 0
    assert await bot.count("messages", "platform_message_id = ?", "90001") == 0
    skipped = sorted(r.getMessage() for r in caplog.records if "skipped a malformed" in r.getMessage())
    assert skipped[:2] == ["discord: skipped a malformed MESSAGE_REACTION_ADD event"] * 2     # discord.py's parser
    assert skipped[2].startswith("discord: skipped a malformed message 90001: ") and len(skipped) == 3  # no author
    assert not [r for r in caplog.records if r.getMessage().startswith("Ignoring exception")]   # no handler raised


async def _at_least(n: int, k: int) -> bool:
    return n >= k


async def test_reaction_on_uncached_reply_counts(start_bot, fake):
    """Votes arrive long after the reply: a fresh client (empty message cache) still counts them."""
    bot = await start_bot()
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "remember me")
    rid = await bot.reply_id(reply)
    await bot.seeded(reply)
    state = bot.adapter.client._connection          # drop discord.py's message cache, as after a restart
    state._messages.clear()
    assert state._get_message(int(reply["id"])) is None
    assert await react(fake, BOT_CHAT_ID, reply["id"], ALICE_ID, UP) == "added"
    assert await bot.store.votes_for(rid) == [(str(ALICE_ID), UP, 1.0)]


# -- slash commands --------------------------------------------------------------------------


async def command(bot: Bot, name: str, options: dict | None = None, user: int = BOB_ID, **kw) -> str:
    rec = await bot.fake.slash(name, options or {}, user, **kw)
    ack = await bot.fake.wait_interaction_response(rec)
    assert rec.responded and rec.deferred and rec.ephemeral, ack      # acknowledged at once, privately
    msg = await bot.fake.wait_interaction_message(rec, timeout=20)
    assert msg["flags"] & 64                                          # the answer is ephemeral too
    return msg["content"]


async def test_commands_are_synced_to_the_guild(start_bot):
    bot = await start_bot()
    synced = {c["name"]: c for c in bot.fake.synced_commands[1]}
    assert set(synced) == {"retrain", "status", "rollback", "forget"}
    assert None not in bot.fake.synced_commands                       # nothing global
    # the admin commands are registered for Manage Server only, and never in DMs, even though
    # the test config names Carol an admin (a server admin grants them to her under Integrations)
    manage_guild = str(1 << 5)
    for name in ("retrain", "rollback"):
        assert str(synced[name]["default_member_permissions"]) == manage_guild
        assert synced[name]["dm_permission"] is False and synced[name]["contexts"] == [0]
    for name in ("status", "forget"):
        assert synced[name].get("default_member_permissions") is None


async def test_admin_commands_are_hidden_from_members_without_manage_server(start_bot):
    bot = await start_bot(chat={"admin_user_ids": [], "admin_role_ids": []})
    synced = {c["name"]: c for c in bot.fake.synced_commands[1]}
    manage_guild = str(1 << 5)
    assert [str(synced[n].get("default_member_permissions")) for n in ("retrain", "rollback")] == [manage_guild] * 2
    assert [synced[n].get("default_member_permissions") for n in ("status", "forget")] == [None, None]
    with pytest.raises(SlashNotPermitted):                            # Discord does not offer it to Bob
        await command(bot, "retrain", user=BOB_ID)
    await command(bot, "retrain", user=ALICE_ID)                      # Manage Server via the Admin role
    assert [r["requested_by"] for r in await bot.store.train_requests()] == [str(ALICE_ID)]


async def test_command_failure_still_answers(start_bot):
    bot = await start_bot()
    await bot.store.close()                      # the database is gone: ChatCore raises
    text = await command(bot, "status", user=ALICE_ID)
    assert "/status failed" in text


async def test_retrain_needs_an_admin(start_bot):
    bot = await start_bot()
    for name, options in (("retrain", {}), ("rollback", {"version": 0})):
        with pytest.raises(SlashNotPermitted):                        # Discord does not offer it to Bob
            await command(bot, name, options, user=BOB_ID)
        # a server admin lets Bob's role use it (Integrations): Discord offers it, the core refuses
        bot.fake.set_command_permissions(name, [{"id": REGULAR_ROLE_ID, "type": 1, "permission": True}])
        assert "Only admins" in await command(bot, name, options, user=BOB_ID)
    assert await bot.store.train_requests() == []
    with pytest.raises(SlashNotPermitted):                            # Carol is named in the config only...
        await command(bot, "retrain", user=CAROL_ID)
    bot.fake.set_command_permissions("retrain", [{"id": CAROL_ID, "type": 2, "permission": True}])

    text = await command(bot, "retrain", user=ALICE_ID)              # Manage Server via the Admin role
    reqs = await bot.store.train_requests()
    assert [(r["requested_by"], r["platform"], r["channel_id"], r["status"]) for r in reqs] == [
        (str(ALICE_ID), "discord", str(GENERAL_ID), "pending")]
    assert f"#{reqs[0]['id']}" in text

    text = await command(bot, "retrain", user=CAROL_ID, channel_id=BOT_CHAT_ID)   # ...until allowed there
    reqs = await bot.store.train_requests()
    assert len(reqs) == 2 and reqs[1]["requested_by"] == str(CAROL_ID) and reqs[1]["channel_id"] == str(BOT_CHAT_ID)
    assert f"#{reqs[1]['id']}" in text

    text = await command(bot, "retrain", user=BOB_ID, admin=True)    # BOB given Manage Server
    assert len(await bot.store.train_requests()) == 3 and "queued" in text


async def test_rollback_and_status(start_bot):
    bot = await start_bot()
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "count me")
    rid = await bot.reply_id(reply)
    await bot.seeded(reply)
    assert await react(bot.fake, BOT_CHAT_ID, reply["id"], ALICE_ID, UP) == "added"
    assert await bot.store.votes_for(rid)

    text = await command(bot, "rollback", {"version": 99}, user=ALICE_ID)
    assert "no version 99" in text
    assert await bot.store.active_version() == 0 and bot.core.policy.active_version == 0
    with pytest.raises(SlashNotPermitted):
        await command(bot, "rollback", {"version": 0}, user=BOB_ID)

    rec = await bot.fake.slash("status", {}, BOB_ID)
    msg = await bot.fake.wait_interaction_message(rec, timeout=20)
    assert "Active version: v0" in msg["content"]
    assert "Replies: 1, votes: 1, rated replies: 1" in msg["content"]
    chart = Path(bot.core.cfg.data_dir) / "status.png"                 # the chart goes along as a file
    assert [(a["filename"], a["size"]) for a in msg["attachments"]] == [("status.png", chart.stat().st_size)]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_forget(start_bot):
    bot = await start_bot()
    for user, text in ((BOB_ID, "bob was here"), (ALICE_ID, "alice was here")):
        _, reply = await bot.ask(BOT_CHAT_ID, user, text)
        await bot.reply_id(reply)
        await bot.seeded(reply)
        for voter in (ALICE_ID, BOB_ID):
            assert await react(bot.fake, BOT_CHAT_ID, reply["id"], voter, UP) == "added"
    assert await bot.count("votes") == 4
    # each reply records whose words its context held, as the adapter named them: alice's held bob's
    assert await bot.count("reply_context_authors", "user_id = ?", str(BOB_ID)) == 2
    assert await bot.count("reply_context_authors", "user_id = ''") == 0

    text = await command(bot, "forget", {"user": ALICE_ID}, user=BOB_ID)
    assert "only forget yourself" in text
    assert await bot.count("messages", "author_id = ?", str(ALICE_ID)) == 1

    text = await command(bot, "forget", user=BOB_ID)
    # Alice asked after Bob in the same channel: Bob's words may be in her reply's context, so
    # that reply goes too (with both votes on it); her own message stays
    assert ("1 messages, 2 replies, 2 votes deleted. 1 of the replies answered other people with their words in "
            "the context") in text
    assert await bot.count("messages", "author_id = ?", str(BOB_ID)) == 0
    assert await bot.count("votes", "user_id = ?", str(BOB_ID)) == 0
    assert await bot.count("messages", "author_id = ?", str(ALICE_ID)) == 1
    assert await bot.count("replies") == 0 and await bot.count("votes") == 0

    text = await command(bot, "forget", {"user": ALICE_ID}, user=CAROL_ID)      # configured admin
    assert f"Forgot user {ALICE_ID}" in text
    assert await bot.count("messages") == 0 and await bot.count("replies") == 0 and await bot.count("votes") == 0


# -- trainer results -------------------------------------------------------------------------


async def test_trainer_results_are_posted(start_bot):
    bot = await start_bot(background=True)
    rid = await bot.store.add_train_request("discord", str(GENERAL_ID), str(ALICE_ID))
    await bot.store.set_request_status(rid, "done", "v1 published: 3 rated replies, mean reward +0.33, KL 0.01")
    msg = await bot.fake.wait_bot_message(GENERAL_ID, timeout=10)
    assert msg["content"] == f"Retrain #{rid}: v1 published: 3 rated replies, mean reward +0.33, KL 0.01"
    await eventually(lambda: _notified(bot.store, rid))
    await bot.fake.expect_no_bot_message(within=0.6)              # posted once


async def _notified(store: Store, rid: int) -> bool:
    return [r for r in await store.train_requests() if r["id"] == rid][0]["notified_at"] is not None


# -- the whole loop ----------------------------------------------------------------------------

# The gates are opened wide and degenerate replies are not punished: the tiny random model's
# replies are random bytes, which the spam checks sometimes count as emoji spam (then a gate
# rejects the candidate, or every reply counts as disliked and the round is skipped); this
# test is about the path.
TRAINER = {"epochs": 4, "minibatch_size": 8, "lr": 5e-3, "lora_rank": 4, "lora_alpha": 8,
           "probe_max_new_tokens": 8, "max_kl": 50.0, "max_repetition": 1.0, "max_empty_share": 1.0,
           "max_spam_share": 1.0, "punish_degenerate": False,
           "settle_seconds": 0.0, "heartbeat_seconds": 0.2, "interval_seconds": 0.5, "min_new_ratings": 2,
           "max_user_share": 1.0}      # two people vote in this guild; the cap itself: tests/test_influence.py


async def test_retrain_end_to_end(start_bot):
    from trainer.__main__ import Trainer
    from trainer.config import load_trainer_config

    bot = await start_bot(background=True, trainer=TRAINER)
    fake = bot.fake
    replies = []
    for i, (user, vote) in enumerate([(BOB_ID, UP), (ALICE_ID, DOWN), (CAROL_ID, UP), (BOB_ID, DOWN)]):
        _, reply = await bot.ask(GENERAL_ID, user, f"hello there {i}", mentions_bot=True)
        rid = await bot.reply_id(reply)
        await bot.seeded(reply)
        voter = ALICE_ID if user != ALICE_ID else BOB_ID
        assert await react(fake, GENERAL_ID, reply["id"], voter, vote) == "added"
        replies.append(rid)
    assert (await bot.store.counts())["rated"] == 4

    await command(bot, "retrain", user=ALICE_ID)
    [req] = await bot.store.train_requests("pending")

    # what `python -m trainer` does with a pending request, on its own connection
    tcfg = load_trainer_config(bot.cfg)
    trainer = Trainer(bot.cfg, tcfg)
    trainer.store = await Store.open(bot.cfg.db_path)
    try:
        assert await trainer.serve_requests()
    finally:
        await trainer.store.close()
    [done] = [r for r in await bot.store.train_requests() if r["id"] == req["id"]]
    assert done["status"] == "done" and done["result"].startswith("v1 published"), done
    assert await bot.store.active_version() == 1

    # the bot hot-swaps and tells the channel where /retrain was asked
    posted = await fake.wait_bot_message(GENERAL_ID, timeout=120,
                                         predicate=lambda m: m["content"].startswith(f"Retrain #{req['id']}:"))
    assert posted["content"] == f"Retrain #{req['id']}: {done['result']}"

    async def swapped() -> bool:
        return bot.core.policy.active_version == 1

    await eventually(swapped, timeout=120)
    await eventually(lambda: _notified(bot.store, req["id"]))
    assert await bot.store.get_state("serving_version") == "1"

    _, reply = await bot.ask(GENERAL_ID, BOB_ID, "and now?", mentions_bot=True)
    r = await bot.store.get_reply(await bot.reply_id(reply))
    assert r.version == 1 and len(r.logprobs) == len(r.output_ids)
    assert {(await bot.store.get_reply(i)).version for i in replies} == {0}
    assert "Active version: v1 (serving v1)" in await command(bot, "status", user=BOB_ID)


# -- trust: any text, failures, floods, gone channels ------------------------------------------


def core_records(caplog, level=30) -> list:
    return [r for r in caplog.records if r.levelno >= level and r.name == "bot.chat"]


# The gateway carries JSON: a lone surrogate arrives as a "\ud800" escape (the fake's json.dumps
# writes it so) and discord.py's json.loads turns it into a lone surrogate in a str.
ANY_TEXT = {
    "surrogates": "lone \ud800 surrogates \udfff here",
    "nul": "nul\x00 bytes\x00\x00 inside",
    "controls": "controls \x1b[31m red \r\x07\x08\x7f\x85 end",
    "4MB": "y" * (4 * 1024 * 1024) + " what now?",
}


@pytest.mark.parametrize("kind", list(ANY_TEXT))
async def test_any_text_gets_a_reply_and_the_bot_keeps_serving(start_bot, caplog, kind):
    text = ANY_TEXT[kind]
    bot = await start_bot()
    msg, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, text)
    assert reply["message_reference"]["message_id"] == msg["id"] and reply["content"]
    rid = await bot.reply_id(reply)
    stored = (await bot.one("SELECT m.text FROM replies r JOIN messages m ON m.id = r.message_id WHERE r.id = ?",
                            rid))[0]
    expected = text.replace("\ud800", "\ufffd").replace("\udfff", "\ufffd").strip()
    assert stored == expected[-bot.cfg.chat.max_message_chars:]
    # the next message (its context holds the odd one, read back over REST) is answered too
    msg2, reply2 = await bot.ask(BOT_CHAT_ID, ALICE_ID, "and now something else")
    assert reply2["message_reference"]["message_id"] == msg2["id"]
    await bot.reply_id(reply2)
    assert core_records(caplog) == []
    assert not [r for r in caplog.records if r.getMessage().startswith("Ignoring exception")]


async def test_a_store_that_refuses_writes_answers_with_an_apology(start_bot, caplog):
    bot = await start_bot()
    await bot.store.db.execute("PRAGMA query_only = 1")        # SQLite refuses writes, as on a read-only disk
    msg, notice = await bot.ask(BOT_CHAT_ID, BOB_ID, "hello?")
    assert notice["content"] == STORE_TEXT and notice["message_reference"]["message_id"] == msg["id"]
    [rec] = core_records(caplog)
    assert "could not store the message" in rec.getMessage()
    assert not [r for r in caplog.records if r.getMessage().startswith("Ignoring exception")]
    await bot.store.db.execute("PRAGMA query_only = 0")
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "hello again")       # it serves again by itself
    await bot.reply_id(reply)
    assert not [r for r in bot.fake.reactions_by_bot if r["message_id"] == int(notice["id"])]   # no vote buttons


async def test_a_reaction_flood_costs_bounded_writes_and_stores_the_final_state(start_bot, caplog):
    bot = await start_bot()
    fake = bot.fake
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "vote on me")
    rid = await bot.reply_id(reply)
    await bot.seeded(reply)
    assert await react(fake, BOT_CHAT_ID, reply["id"], CAROL_ID, DOWN) == "added"
    mark, before = len(_outcomes), bot.store.db.total_changes
    logged = len([r for r in caplog.records if r.name == "bot.chat"])
    for i in range(501):                                    # Alice toggles 👍: add, remove, ..., add
        await fake.react(BOT_CHAT_ID, reply["id"], ALICE_ID, UP, add=i % 2 == 0)
    await eventually(lambda: _at_least(len(_outcomes) - mark, 501), timeout=60)
    outcomes = [o for _, o in _outcomes[mark:]]
    assert outcomes[:FLOOD_WRITES] == ["added", "removed"] * (FLOOD_WRITES // 2)
    assert all(o.startswith("held") for o in outcomes[FLOOD_WRITES:])
    assert bot.store.db.total_changes - before == FLOOD_WRITES
    assert await bot.core.flush_votes() == 1                # what run_background does every poll
    assert sorted(await bot.store.votes_for(rid)) == [(str(ALICE_ID), UP, 1.0), (str(CAROL_ID), DOWN, -1.0)]
    assert fake.reactions_on(int(reply["id"]))[UP] == [BOT_ID, ALICE_ID]     # what Discord shows, the same
    assert bot.store.db.total_changes - before == FLOOD_WRITES + 1
    assert len([r for r in caplog.records if r.name == "bot.chat"]) - logged <= FLOOD_WRITES + 2


async def test_held_votes_are_written_by_the_background_poll(start_bot):
    bot = await start_bot(background=True)
    _, reply = await bot.ask(BOT_CHAT_ID, BOB_ID, "vote on me")
    rid = await bot.reply_id(reply)
    await bot.seeded(reply)
    mark = len(_outcomes)
    for i in range(FLOOD_WRITES + 3):                      # ends on "add": held, then written by the poll
        await bot.fake.react(BOT_CHAT_ID, reply["id"], ALICE_ID, UP, add=i % 2 == 0)
    await eventually(lambda: _at_least(len(_outcomes) - mark, FLOOD_WRITES + 3))
    assert _outcomes[-1][1].startswith("held")
    assert await eventually(lambda: bot.store.votes_for(rid)) == [(str(ALICE_ID), UP, 1.0)]


@pytest.mark.parametrize("gone", ["deleted", "no access"])
async def test_a_result_for_a_gone_channel_is_given_up_at_once(start_bot, caplog, gone):
    bot = await start_bot()
    fake = bot.fake
    if gone == "deleted":
        await fake.delete_channel(GENERAL_ID)
        await eventually(lambda: _true(bot.adapter.client.get_channel(GENERAL_ID) is None))
    else:
        fake.fail("POST", f"/channels/{GENERAL_ID}/messages", status=403, code=50001, message="Missing Access")
    rid = await bot.store.add_train_request("discord", str(GENERAL_ID), str(ALICE_ID))
    await bot.store.set_request_status(rid, "done", "v1 published")
    assert await bot.core.post_results({"discord": bot.adapter.post}) == 1        # given up on the first try
    assert await bot.store.unnotified_results() == []
    tries = [r for r in fake.requests if r[1] in (f"/channels/{GENERAL_ID}", f"/channels/{GENERAL_ID}/messages")]
    assert tries == ([("GET", f"/channels/{GENERAL_ID}")] if gone == "deleted"
                     else [("POST", f"/channels/{GENERAL_ID}/messages")])
    [warning] = [r for r in caplog.records if r.levelno >= 30 and r.name.startswith("bot")]
    assert f"dropped a trainer result for channel {GENERAL_ID}: 40" in warning.getMessage()
    # the bot goes on posting elsewhere
    other = await bot.store.add_train_request("discord", str(BOT_CHAT_ID), str(ALICE_ID))
    await bot.store.set_request_status(other, "done", "v2 published")
    assert await bot.core.post_results({"discord": bot.adapter.post}) == 1
    assert (await fake.wait_bot_message(BOT_CHAT_ID))["content"] == f"Retrain #{other}: v2 published"


async def _true(value: bool) -> bool:
    return value
