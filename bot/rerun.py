"""``Rerun``: one async job in the background at a time; asked again while it runs, it
runs once more when that run ends, so a burst of asks costs at most two runs.

The adapters use it to reconcile votes after each (re)connect (``backfill``): a reconnect
during a pass must not be lost, and ten reconnects in a row must not start ten passes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

log = logging.getLogger("reactlearn.rerun")


class Rerun:
    def __init__(self, job: Callable[[str], Awaitable[object]], what: str):
        self._job, self._what = job, what       # what: "discord: reconciling votes", for the log
        self._task: asyncio.Task | None = None
        self._again = False

    def ask(self, why: str) -> None:
        """Run the job (``why`` says what asked, for the log), or once more after the running one."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.create_task(self._runs(why))

    async def _runs(self, why: str) -> None:
        while True:
            self._again = False
            try:
                await self._job(why)
            except Exception:  # noqa: BLE001 - the live events go on; the next ask tries again
                log.exception("%s after %s failed", self._what, why)
            if not self._again:
                return
            why = "another ask while it ran"

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
