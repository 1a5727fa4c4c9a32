"""Streamed replies: the protocol an adapter implements to show a reply while it is written,
and the pacing that keeps edits within the platforms' rate limits.

The policy's ``on_partial`` only remembers the newest text; :class:`Pacer` shows the first
text at once (``stream.start``) and then the newest text at most every
``stream.min_interval`` seconds (``stream.update``). ``bot/chat.py`` stores the reply when
generation ends and then calls ``stream.finish(final text)``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

log = logging.getLogger(__name__)


class ReplyStream(Protocol):
    """Where an adapter shows one reply while it is written (the core paces the calls).

    ``start`` shows the first text, ``update`` replaces it with the longer text so far (at most
    every ``min_interval`` seconds), ``finish`` shows the final text (split over several
    messages where the platform needs it) and returns the platform message ids that hold it.
    ``finish`` comes after a failed ``start``/``update`` too, and without any before it when no
    text came while generating; it may also carry an error notice (then nothing is linked)."""

    min_interval: float

    async def start(self, text: str) -> None: ...

    async def update(self, text: str) -> None: ...

    async def finish(self, text: str) -> list[str]: ...


class Pacer:
    """Shows a reply's newest text on a ReplyStream at most every ``min_interval`` seconds."""

    def __init__(self, stream: ReplyStream):
        self.stream = stream
        self.latest = ""            # the newest text the policy reported
        self.shown = ""             # what the stream shows now
        self.started = False        # stream.start succeeded (a failed start or update ends the pacing)
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def on_partial(self, text: str) -> None:
        """The policy's callback (event loop thread): remember, wake the pacing task. A trailing
        U+FFFD (a character not all of whose bytes are sampled yet) waits for the next text."""
        self.latest = text.rstrip("\ufffd")
        self._wake.set()

    def open(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Stop pacing; an update already under way is waited for, so none lands after finish."""
        self._closed.set()
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        next_at = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._closed.is_set() and (delay := next_at - time.monotonic()) > 0:
                try:        # wait out the interval; the end of generation cuts it short
                    await asyncio.wait_for(self._closed.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            text = self.latest
            if self._closed.is_set():
                return
            if not text or text == self.shown:
                continue
            next_at = time.monotonic() + self.stream.min_interval
            if not await self._show(text):
                return

    async def _show(self, text: str) -> bool:
        try:
            await (self.stream.update(text) if self.started else self.stream.start(text))
        except Exception:  # noqa: BLE001 - the final text still goes out through finish
            log.warning("streaming a reply stopped: %s failed; the final text follows",
                        "update" if self.started else "start", exc_info=True)
            return False
        self.started, self.shown = True, text
        return True


class ShownReply:
    """A ReplyStream whose every call makes the platform show one text: the adapter writes
    ``_show(text) -> platform ids`` (edit what changed, post what is missing)."""

    min_interval: float

    async def start(self, text: str) -> None:
        await self._show(text)

    async def update(self, text: str) -> None:
        await self._show(text)

    async def finish(self, text: str) -> list[str]:
        return await self._show(text)

    async def _show(self, text: str) -> list[str]:
        raise NotImplementedError
