"""The console playground: the whole loop in a terminal or a pipe.

    you> hello                 a message; the reply is printed as it is written, tagged [#12]
    +  /  -                    vote 👍 / 👎 on the last reply
    /up 12  /down 12           vote on any reply by id (/unvote 12 takes your vote back)
    /retrain /status /rollback N /forget /help /quit

Same chat core, store and policy as Discord and Slack. Input is read line by line
from stdin, so it can be scripted: ``printf 'hi\\n+\\n/status\\n' | python -m bot``.
A reply grows on one line, ``bot> `` and the text, and ends with its id once stored:
``bot> I am fine [#12]``. Notices (busy, errors) are ``bot> `` lines without an id.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from typing import TextIO

from bot.chat import ChatCore
from bot.events import Command, HistoryItem, Message
from bot.rewards import THUMBS_DOWN, THUMBS_UP

PLATFORM = "console"
CHANNEL = "console"
HELP = __doc__.split("\n\n")[1]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    """``text`` with control characters other than newline and tab shown as ``\\xNN``.

    A model's reply may hold a carriage return or an escape sequence; written raw it would
    overwrite the line or drive the terminal. Each character maps on its own, so the
    shown form of a prefix is a prefix of the shown form."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class ConsoleReply:
    """One reply printed as it is written (a ``bot.streaming.ReplyStream``; ``send`` for notices).

    The text grows on one ``bot> `` line (only the new end is written). Should the text
    change anywhere but at its end, the final text is printed afresh on a new ``bot> `` line.
    The line is left open: the console ends it with the reply's id tag (``end``)."""

    min_interval = 0.0      # a terminal takes every token

    def __init__(self, out: TextIO):
        self.out = out
        self.shown: str | None = None    # what the open line shows, None before it is opened
        self.text = ""                   # the final text once finished (or sent)

    def _write(self, s: str) -> None:
        self.out.write(s)
        self.out.flush()

    def _grow(self, text: str, final: bool = False) -> None:
        text = terminal_safe(text)
        if self.shown is None:
            self._write(f"bot> {text}")
        elif text.startswith(self.shown):
            self._write(text[len(self.shown):])
        elif final:
            self._write(f" …\nbot> {text}")
        else:
            return                       # wait for the final text
        self.shown = text

    async def send(self, text: str) -> list[str]:
        self.end()
        self._write(f"bot> {terminal_safe(text)}\n")
        self.text = text
        return [f"r{time.time_ns()}"]

    async def start(self, text: str) -> None:
        self._grow(text)

    async def update(self, text: str) -> None:
        self._grow(text)

    async def finish(self, text: str) -> list[str]:
        self._grow(text, final=True)
        self.text = text
        return [f"r{time.time_ns()}"]

    def end(self, tag: str = "") -> None:
        """Close the open line, if any, with ``tag``."""
        if self.shown is not None:
            self._write(f"{tag}\n")
            self.shown = None


class Console:
    def __init__(self, core: ChatCore, user: str = "you", out: TextIO = sys.stdout):
        self.core = core
        self.user = user
        self.out = out
        self.history: list[HistoryItem] = []
        self.last_reply: int | None = None
        self._n = 0

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def post(self, channel_id: str, text: str) -> None:
        """Where trainer results land (used by ChatCore.post_results)."""
        self.say(f"[trainer] {text}")

    async def handle_line(self, line: str) -> bool:
        """Handle one input line. Returns False when the user quits."""
        line = line.strip()
        if not line:
            return True
        if line in ("+", "-"):
            return await self._vote(self.last_reply, line == "+")
        if line.startswith("/"):
            name, _, rest = line[1:].partition(" ")
            return await self._command(name.lower(), rest.strip())
        await self._message(line)
        return True

    async def _message(self, text: str) -> None:
        self._n += 1
        # Console rules: every line is addressed to the bot, and one person is not rate limited.
        msg = Message(PLATFORM, f"m{time.time_ns()}-{self._n}", CHANNEL, self.user, self.user, text,
                      mentions_bot=True, rate_limited=False)

        reply, reply_id = ConsoleReply(self.out), None
        try:
            reply_id = await self.core.on_message(msg, self.history, reply.send, reply)
        finally:            # the reply's line ends with its id (a notice that replaced it: none)
            reply.end(f" [#{reply_id}]" if reply_id is not None else "")
        if reply_id is not None:
            self.last_reply = reply_id
            self.history += [HistoryItem(self.user, text, False, author_id=self.user),
                             HistoryItem("bot", reply.text, True)]

    async def _vote(self, reply_id: int | None, up: bool | None) -> bool:
        if reply_id is None:
            self.say("(no reply to vote on yet)")
            return True
        emoji = THUMBS_UP if up in (True, None) else THUMBS_DOWN
        if up is None:
            for e in (THUMBS_UP, THUMBS_DOWN):
                await self.core.vote_by_id(reply_id, self.user, e, added=False)
            self.say(f"(vote on #{reply_id} removed)")
            return True
        other = THUMBS_DOWN if up else THUMBS_UP
        await self.core.vote_by_id(reply_id, self.user, other, added=False)   # one click per reply: switching replaces
        outcome = await self.core.vote_by_id(reply_id, self.user, emoji)
        self.say(f"({emoji} on #{reply_id})" if outcome == "added" else f"(there is no reply #{reply_id})")
        return True

    async def _command(self, name: str, rest: str) -> bool:
        if name in ("quit", "exit", "q"):
            return False
        if name == "help":
            self.say(HELP)
            return True
        if name in ("up", "down", "unvote"):
            if not rest.lstrip("#").isdigit():
                self.say(f"usage: /{name} REPLY_ID")
                return True
            return await self._vote(int(rest.lstrip("#")), {"up": True, "down": False}.get(name))
        args = {"version": rest} if name == "rollback" else ({"user": rest} if name == "forget" and rest else {})
        # The playground's one person is its admin.
        result = await self.core.on_command(Command(PLATFORM, CHANNEL, self.user, name, args, is_platform_admin=True))
        self.say(result.text + (f"\nChart: {result.image}" if result.image else ""))
        return True


async def run_console(core: ChatCore, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Read lines until /quit or end of input; trainer results are printed as they come."""
    console = Console(core, out=out)
    if hasattr(stdin, "reconfigure"):      # bytes that are not UTF-8 read as U+FFFD, never end the loop
        stdin.reconfigure(errors="replace")
    interactive = stdin.isatty()
    if interactive:
        console.say("reactlearn playground: type a message; + / - to vote; /help for commands.")
    background = asyncio.create_task(core.run_background({PLATFORM: console.post}))
    loop = asyncio.get_running_loop()
    try:
        while True:
            if interactive:
                out.write("you> ")
                out.flush()
            line = await loop.run_in_executor(None, stdin.readline)
            if not line or not await console.handle_line(line):
                break
    finally:
        background.cancel()
