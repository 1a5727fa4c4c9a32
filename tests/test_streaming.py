"""Streamed replies through the real ChatCore, Store and Policy (the tiny model that writes to
max_new_tokens every time): how start/update are paced, finish with the stored text, what a
failed start, update or finish leaves, notices, and the console printing a reply as it grows.
The platform edge is a recording ``ReplyStream``; the Discord and Slack adapters have their
own streaming tests against the loopback fakes (tests/test_discord.py, tests/test_slack.py)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from bot.adapters.console import Console, terminal_safe
from bot.chat import ChatCore
from bot.events import Message
from bot.policy import Policy
from bot.store import Store
from tests.conftest import STREAMING, make_config

INTERVAL = 0.1


@dataclass
class Call:
    name: str
    text: str
    began: float
    ended: float = 0.0


@dataclass
class Recorder:
    """A ReplyStream (plus the notice ``send``) that records each call; each start/update takes
    a few milliseconds, like a request; ``fail`` names the calls that raise."""

    min_interval: float = INTERVAL
    fail: set = field(default_factory=set)
    slow: dict = field(default_factory=dict)      # call number -> an asyncio.Event it waits for instead
    calls: list = field(default_factory=list)
    sent: list = field(default_factory=list)

    async def _call(self, name: str, text: str) -> None:
        call = Call(name, text, time.monotonic())
        self.calls.append(call)
        hold = self.slow.get(len(self.calls) - 1)
        await (hold.wait() if hold is not None else asyncio.sleep(0.005))
        call.ended = time.monotonic()
        if name in self.fail:
            raise RuntimeError(f"{name} failed (test)")

    async def start(self, text: str) -> None:
        await self._call("start", text)

    async def update(self, text: str) -> None:
        await self._call("update", text)

    async def finish(self, text: str) -> list[str]:
        await self._call("finish", text)
        return [f"part-{len(self.calls)}"]

    async def send(self, text: str) -> list[str]:
        self.sent.append(text)
        return [f"sent-{len(self.sent)}"]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]


@pytest_asyncio.fixture
async def core(tmp_path, endless_model_dir):
    cfg = make_config(tmp_path, endless_model_dir, chat={"rate_limit_per_minute": 1}, **STREAMING)
    store = await Store.open(cfg.db_path)
    policy = Policy.from_config(cfg)
    try:
        yield ChatCore(cfg, store, policy)
    finally:
        policy.close()
        await store.close()


def message(n: int = 1, user: str = "u1") -> Message:
    return Message("test", f"m{n}", "c1", user, user, "tell me a long story", mentions_bot=True)


async def test_reply_is_paced_then_finished_with_the_stored_text(core):
    rec = Recorder()
    rid = await core.on_message(message(), [], rec.send, rec)
    r = await core.store.get_reply(rid)
    assert len(r.output_ids) == len(r.logprobs) == 300 and r.text
    assert rec.names[0] == "start" and rec.names[-1] == "finish" and rec.sent == []
    assert rec.names.count("update") >= 1 and set(rec.names[1:-1]) == {"update"}
    shown, final = rec.calls[:-1], rec.calls[-1]
    assert final.text == r.text                               # finish carries the stored text
    assert all(r.text.startswith(c.text) for c in shown)      # each shown text is a beginning of it
    assert all(len(b.text) > len(a.text) for a, b in zip(shown, shown[1:]))      # and it grew
    gaps = [b.began - a.began for a, b in zip(shown, shown[1:])]
    assert min(gaps) >= INTERVAL - 0.002, gaps                # never faster than min_interval
    assert final.began >= max(c.ended for c in shown)          # no update lands after finish
    assert await core.store.reply_for_message("test", f"part-{len(rec.calls)}") == rid


async def test_an_update_under_way_when_generation_ends_is_waited_for(core):
    real, ended, generated = core.policy.generate, [], asyncio.Event()

    async def generate(turns, on_partial=None):       # the real policy; note when it returns
        try:
            return await real(turns, on_partial=on_partial)
        finally:
            ended.append(time.monotonic())
            generated.set()

    core.policy.generate = generate
    rec = Recorder(slow={1: generated})               # the first update lasts until generation has ended
    rid = await core.on_message(message(), [], rec.send, rec)
    update, final = rec.calls[1], rec.calls[-1]
    assert rec.names == ["start", "update", "finish"]
    assert update.began < ended[0] < update.ended, "generation should end while the update is under way"
    assert final.began >= update.ended                # so it can't overwrite the final text
    assert final.text == (await core.store.get_reply(rid)).text


@pytest.mark.parametrize("failing", ["start", "update"])
async def test_a_failed_start_or_update_stops_streaming_but_not_the_reply(core, failing):
    rec = Recorder(fail={failing})
    rid = await core.on_message(message(), [], rec.send, rec)
    r = await core.store.get_reply(rid)
    expected = ["start", "finish"] if failing == "start" else ["start", "update", "finish"]
    assert rec.names == expected                              # the first failure ends the streaming
    assert rec.calls[-1].text == r.text and rec.sent == []    # the final text still goes out
    assert await core.store.reply_for_message("test", f"part-{len(rec.calls)}") == rid
    assert await core.vote_by_id(rid, "u2", "👍") == "added"


async def test_a_failed_finish_falls_back_to_a_fresh_send(core):
    rec = Recorder(fail={"finish"})
    rid = await core.on_message(message(), [], rec.send, rec)
    r = await core.store.get_reply(rid)
    assert rec.names[-1] == "finish" and rec.sent == [r.text]
    assert await core.store.reply_for_message("test", "sent-1") == rid
    assert await core.store.reply_for_message("test", f"part-{len(rec.calls)}") is None


async def test_notices_are_sent_not_streamed(core):
    first = Recorder()
    assert await core.on_message(message(1), [], first.send, first) is not None
    rec = Recorder()
    assert await core.on_message(message(2), [], rec.send, rec) is None     # over the limit of 1/min
    assert rec.calls == [] and len(rec.sent) == 1 and "faster than I can learn" in rec.sent[0]


class Written:
    """A text stream that keeps every write."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return len(s)

    def flush(self) -> None:
        pass


async def test_console_prints_the_reply_as_it_grows(core):
    out = Written()
    console = Console(core, out=out)
    await console.handle_line("tell me a long story")
    r = await core.store.get_reply(console.last_reply)
    shown = terminal_safe(r.text)                # the random model writes control characters too
    assert "".join(out.writes) == f"bot> {shown} [#{console.last_reply}]\n"
    assert out.writes[0].startswith("bot> ") and len(out.writes[0]) < len("bot> " + shown)
    assert len(out.writes) >= 4                  # the first words, more of them, the rest, the tag
    assert console.history[-1].text == r.text
