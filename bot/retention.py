"""Retention (``storage.retention_days``): the bot prunes old raw messages and unrated replies
once an hour while it runs.

    async with pruning(store, cfg):      # bot/__main__.py, around the chat platforms
        ...

What is deleted and what is kept is :meth:`bot.store.Store.prune_before`: rated replies and
their votes (the trainer's window, the reward model's data, every version's like-rate), the
newest replies (the trainer explores their prompts), the registry, and the replies a published
version's ``meta.json`` names (``reply_ids``), which only the version folders know, so they are
collected here (through ``bot.versions.read_meta``, from the folders in the versions folder
only, checked by ``bot.versions.version_folder`` as a version the bot loads) and handed to
the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import AsyncIterator

from bot.config import Config
from bot.policy_types import VersionError
from bot.store import RETENTION_KEEP_NEWEST, Store, Version

log = logging.getLogger(__name__)
EVERY_SECONDS = 3600.0    # how often the bot prunes
DAY = 86400.0


def named_reply_ids(versions: list[Version], root: Path) -> set[int]:
    """The reply ids the ``meta.json`` of each published version on disk names. Only the version
    folders in ``root`` (the versions folder) are read, checked as the bot checks a version it
    loads (``bot.versions.version_folder``): a registry path elsewhere names none (a warning). A
    folder that is gone (pruned by the trainer) or unreadable names none (logged at debug level)."""
    from bot.versions import read_meta, version_folder

    ids: set[int] = set()
    for v in versions:
        if v.status != "published" or not v.path:
            continue
        try:
            folder = version_folder(v.path, root, v.id)
        except VersionError as e:
            log.warning("retention: v%d names no replies to keep, its registry path is not read: %s", v.id, e)
            continue
        try:
            named = read_meta(folder).get("reply_ids", [])
        except (VersionError, OSError, ValueError) as e:
            log.debug("retention: v%d names no replies to keep: %s", v.id, e)
            continue
        if isinstance(named, list):
            ids |= {i for i in named if isinstance(i, int) and not isinstance(i, bool)}
    return ids


async def prune_once(store: Store, days: float, versions_dir: Path, *, now: float | None = None,
                     keep_newest: int = RETENTION_KEEP_NEWEST) -> dict[str, int]:
    """Prune what is older than ``days`` (see the module doc); ``versions_dir`` holds the version
    folders whose meta.json may name replies to keep. Returns the store's counts."""
    cutoff = (time.time() if now is None else now) - days * DAY
    keep = await asyncio.to_thread(named_reply_ids, await store.versions(), Path(versions_dir))
    counts = await store.prune_before(cutoff, keep, keep_newest)
    if any(counts.values()):
        log.info("retention: older than %g days: %d unrated replies and %d messages deleted, the text of %d "
                 "messages kept only as who wrote where and when", days, counts["replies"], counts["messages"],
                 counts["blanked"])
    return counts


async def _every(store: Store, days: float, versions_dir: Path, seconds: float) -> None:
    while True:
        try:
            await prune_once(store, days, versions_dir)
        except Exception:  # noqa: BLE001 - a full or busy disk now must not stop the next try
            log.exception("retention: pruning failed; trying again in %gs", seconds)
        await asyncio.sleep(seconds)


@contextlib.asynccontextmanager
async def pruning(store: Store, cfg: Config, every: float = EVERY_SECONDS) -> AsyncIterator[None]:
    """Prune now and every ``every`` seconds while the block runs (nothing when
    ``storage.retention_days`` is 0, the default: keep everything)."""
    days = cfg.storage.retention_days
    task = asyncio.create_task(_every(store, days, cfg.versions_dir, every)) if days > 0 else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
