"""The console playground: the whole loop in a terminal or a pipe.

    you> hello                 a message; the reply comes back tagged [#12]
    +  /  -                    vote 👍 / 👎 on the last reply
    /up 12  /down 12           vote on any reply by id (/unvote 12 takes your vote back)
    /retrain /status /rollback N /forget /help /quit

Same chat core, store and policy as Discord and Slack. Input is read line by line
from stdin, so it can be scripted: ``printf 'hi\\n+\\n/status\\n' | python -m bot``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import TextIO

from bot.chat import ChatCore
from bot.events import Command, HistoryItem, Message
from bot.rewards import THUMBS_DOWN, THUMBS_UP

PLATFORM = "console"
CHANNEL = "console"
HELP = __doc__.split("\n\n")[1]


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

        sent: list[str] = []   # printed after on_message returns, tagged with the reply id

        async def send_tagged(reply: str) -> list[str]:
            sent.append(reply)
            return [f"r{time.time_ns()}"]

        reply_id = await self.core.on_message(msg, self.history, send_tagged)
        reply = sent[0] if sent else ""
        if reply_id is not None:
            self.last_reply = reply_id
            self.say(f"bot [#{reply_id}]> {reply}")
            self.history += [HistoryItem(self.user, text, False), HistoryItem("bot", reply, True)]
        elif reply:
            self.say(f"bot> {reply}")

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
        self.say(result.text)
        return True


async def run_console(core: ChatCore, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Read lines until /quit or end of input; trainer results are printed as they come."""
    console = Console(core, out=out)
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
