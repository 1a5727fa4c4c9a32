"""Publishing model versions so that a crash never leaves a half-written one visible.

What a version folder holds is ``bot/versions.py``; this module makes one appear atomically:

    versions_dir/
      .tmp-v0007-4242/    being written by trainer pid 4242 (removed at the next start)
      v0007/              published
      .trash-v0002-4242/  being pruned by trainer pid 4242 (removed at the next start)

Steps (:func:`publish`): write everything into the tmp folder, fsync each file and the
folder, ``os.rename`` it to ``vNNNN`` (atomic on one filesystem), fsync ``versions_dir``,
then one transaction registers the version and makes it active. A write that fails (a full
disk, a file-size limit) removes the tmp folder at once; the round fails with the reason and
the trainer goes on. The bot only loads
versions it finds in the registry and checks the weights' sha256 against it, so:

- a crash before the rename leaves only a ``.tmp-*`` folder, which nobody reads;
- a crash between the rename and the registry commit leaves a ``vNNNN`` folder without
  a registry row; :func:`clean_stale` removes both kinds at trainer start;
- a crash after the commit leaves a published, active version whose round was not marked
  done: ``trainer/recover.py`` records it as published at the next start.

Pruning (:func:`prune`) renames an old folder to ``.trash-vNNNN-PID`` (atomic) before
deleting it, so a crash mid-delete never leaves a half-deleted ``vNNNN`` that the registry
still points to: the version is whole or gone (its row stays, and ``/rollback`` says it was
pruned); :func:`clean_stale` deletes the leftover trash at the next start.

A rejected candidate gets a registry row (status "rejected", the reason) and no files.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from bot import versions
from bot.models import fsync_dir, sha256_file
from bot.store import Store

log = logging.getLogger(__name__)


def _fsync_folder(folder: Path) -> None:
    """fsync every file in ``folder`` (flat) and then the folder itself."""
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def stage(versions_dir: Path, version: int, model, kind: str, meta: dict,
          side: dict[str, dict[str, torch.Tensor]] | None = None) -> tuple[Path, str]:
    """Write weights + meta.json into ``versions_dir/.tmp-vNNNN-PID`` and fsync them.

    ``side``: optional side files (``versions.SIDE_FILES``: the optimizer state, the reward
    model) by file name; each is saved with its sha256 in meta.json.
    Returns (tmp folder, sha256 of the weights). Nothing is visible yet."""
    versions_dir.mkdir(parents=True, exist_ok=True)
    tmp = versions_dir / f"{versions.TMP_PREFIX}{versions.dirname(version)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights_file = versions.write_weights(tmp, model, kind)
        sha = sha256_file(tmp / weights_file)
        meta = {**meta, "version": version, "kind": kind, "weights_file": weights_file, "sha256": sha}
        for name, tensors in (side or {}).items():
            if tensors:
                save_file(tensors, str(tmp / name), metadata={"format": "pt"})
                meta[versions.SIDE_FILES[name]] = sha256_file(tmp / name)
        versions.write_meta(tmp, meta)
        for p in tmp.iterdir():
            p.chmod(0o644)       # readable by the bot even if it runs as another user of the group
        _fsync_folder(tmp)
    except BaseException as e:   # a full disk, a file-size limit, a read-only folder: leave nothing half-written
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("writing v%d failed (%s: %s); removed its temp folder %s", version, type(e).__name__, e, tmp)
        raise
    return tmp, sha


def commit(tmp: Path, final: Path) -> None:
    """Atomically make the staged folder visible under its final name."""
    if final.exists():   # only possible after a crash between rename and registry commit
        log.warning("replacing unregistered version folder %s", final)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


async def publish(store: Store, versions_dir: Path, *, version: int, parent: int, model, kind: str,
                  meta: dict, metrics: dict, before_rename: Callable[[Path], None] | None = None,
                  side: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Stage, rename and register+activate version ``version``. Returns its folder.

    ``before_rename(tmp)`` runs after the files are written and synced and before the
    rename (tests use it to simulate a crash there). On any error the tmp folder is
    removed and nothing is registered."""
    import asyncio

    versions_dir = Path(versions_dir)
    final = versions_dir / versions.dirname(version)
    meta = {**meta, "parent": parent, "metrics": metrics, "created_at": time.time()}
    tmp, sha = await asyncio.to_thread(stage, versions_dir, version, model, kind, meta, side)
    try:
        if before_rename is not None:
            before_rename(tmp)
        await asyncio.to_thread(commit, tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        await store.add_version(version, parent, str(final.resolve()), sha, "published", metrics, activate=True)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    log.info("published v%d (%s, parent v%d) at %s", version, kind, parent, final)
    return final


async def reject(store: Store, *, version: int, parent: int, reason: str, metrics: dict) -> None:
    """Register a rejected candidate: a row with the reason, no files, nothing activated."""
    await store.add_version(version, parent, None, None, "rejected", metrics, reason=reason, activate=False)
    log.warning("rejected v%d: %s", version, reason)


async def clean_stale(store: Store, versions_dir: Path) -> list[Path]:
    """Remove leftovers of crashed publishes and prunes: every ``.tmp-*`` and ``.trash-*``
    folder, and ``vNNNN`` folders the registry does not know as published. Call only while
    holding the trainer lock."""
    versions_dir = Path(versions_dir)
    if not versions_dir.is_dir():
        return []
    published = {v.id for v in await store.versions() if v.status == "published"}
    removed = []
    for p in sorted(versions_dir.iterdir()):
        number = versions.number_of(p.name)
        leftover = p.name.startswith((versions.TMP_PREFIX, versions.TRASH_PREFIX))
        if leftover or (number is not None and p.is_dir() and number not in published):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
            log.info("removed stale %s", p)
    if removed:
        fsync_dir(versions_dir)
    return removed


def trash(folder: Path) -> Path:
    """Take a version folder out of sight in one atomic rename to ``.trash-vNNNN-PID`` (fsynced):
    from then on no reader finds it, however its deletion ends. Returns the new path."""
    dest = folder.parent / f"{versions.TRASH_PREFIX}{folder.name}-{os.getpid()}"
    if dest.exists():
        shutil.rmtree(dest, ignore_errors=True)
    os.rename(folder, dest)
    fsync_dir(folder.parent)
    return dest


async def prune(store: Store, versions_dir: Path, keep: int) -> list[Path]:
    """Keep the newest ``keep`` published version folders, plus the active one and its parent.
    Each other one is renamed to a trash name first, then deleted (see the module doc)."""
    versions_dir = Path(versions_dir)
    if not versions_dir.is_dir():
        return []
    registry = {v.id: v for v in await store.versions()}
    active = await store.active_version()
    protected = {active}
    if active in registry and registry[active].parent is not None:
        protected.add(registry[active].parent)
    on_disk = sorted(n for p in versions_dir.iterdir() if (n := versions.number_of(p.name)) is not None)
    published = [v for v in on_disk if v in registry and registry[v].status == "published"]
    protected |= set(published[-keep:])
    removed = []
    for v in published:
        if v not in protected:
            path = versions_dir / versions.dirname(v)
            try:
                gone = trash(path)
            except OSError as e:
                log.warning("could not prune %s (%s); it stays as it is", path, e)
                continue
            shutil.rmtree(gone, ignore_errors=True)
            removed.append(path)
            log.info("pruned old version folder %s", path)
    return removed
