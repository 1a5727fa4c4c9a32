"""Every way a published version folder can be wrong, and what the bot does about it.

Each case publishes a good v1 with the trainer's own publishing code, then stages v2 the same
way, breaks it in one way, and registers it (with the sha256 recomputed, so that the checksum
is not what catches it). The bot must keep serving v1, say why in the log (once) and in
/status, not try v2 again on the next poll, keep nothing of v2 loaded, and a fresh start with
v2 active must serve v1 and say so."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bot import versions
from bot.chat import ChatCore
from bot.events import Command, Message
from bot.policy import Policy
from tests.trainer_helpers import CONSOLE, tiny_config, trainer_config
from trainer.learner import Learner
from trainer.publish import commit, publish, stage

MiB = 1 << 20


# -- ways to break a staged v2 (the folder; the good v1's folder) -------------------------


def edit_json(name: str, change):
    def corrupt(folder: Path, good: Path):
        path = folder / name
        data = json.loads(path.read_text())
        path.write_text(json.dumps(change(data)))
    return corrupt


def write_file(name: str, data: bytes | str):
    def corrupt(folder: Path, good: Path):
        (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return corrupt


def delete_file(name: str):
    def corrupt(folder: Path, good: Path):
        (folder / name).unlink()
    return corrupt


def sparse_file(name: str, size: int):
    """``name`` replaced by a file of ``size`` bytes that takes no disk space (a hole)."""
    def corrupt(folder: Path, good: Path):
        with open(folder / name, "wb") as f:
            f.truncate(size)
    return corrupt


def edit_tensors(change):
    """The weights file rewritten as valid safetensors with ``change(tensors)``."""
    def corrupt(folder: Path, good: Path):
        weights = folder / versions.WEIGHTS_OF[json.loads((folder / versions.META_FILE).read_text())["kind"]]
        state = load_file(str(weights))
        save_file(change(state), str(weights), metadata={"format": "pt"})
    return corrupt


def _set(d: dict, **kv) -> dict:
    return {**d, **kv}


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _first(state: dict, change) -> dict:
    """``state`` with its first lora_A (or first 2-D) tensor changed."""
    name = next((k for k in state if "lora_A" in k), None) or next(k for k, t in state.items() if t.dim() == 2)
    return {**state, name: change(state[name])}


def _poisoned(value: float):
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t.view(-1)[0] = value
        return t
    return change


def link_weights_to_v1(folder: Path, good: Path):
    (folder / versions.LORA_WEIGHTS).unlink()
    (folder / versions.LORA_WEIGHTS).symlink_to(good / versions.LORA_WEIGHTS)


def move_folder_elsewhere(folder: Path, good: Path):
    """v0002 becomes a symbolic link to a folder outside the versions folder."""
    elsewhere = folder.parent.parent / "elsewhere" / folder.name
    elsewhere.parent.mkdir()
    shutil.move(str(folder), str(elsewhere))
    folder.symlink_to(elsewhere, target_is_directory=True)


def registry_dotdot(folder: Path) -> str:
    return str(folder.parent / versions.dirname(1) / ".." / folder.name)


def registry_outside(folder: Path) -> str:
    copy = folder.parent.parent / "copies" / folder.name
    shutil.copytree(folder, copy)
    return str(copy)


LORA = versions.LORA_CONFIG
META = versions.META_FILE
LORA_SHAPED = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)}
# (id, kind, how to break v2, what the refusal says, registry path override)
CASES = [
    ("meta-not-an-object", "lora", write_file(META, "[1, 2]"), "is a JSON array, not an object", None),
    ("meta-not-json", "lora", write_file(META, '{"kind": "lora",'), "meta.json is not valid JSON", None),
    ("meta-not-utf8", "lora", write_file(META, b'\xff\xfe{"kind"}'), "meta.json is not valid JSON", None),
    ("meta-no-kind", "lora", edit_json(META, lambda m: _without(m, "kind")), "has no 'kind'", None),
    ("meta-kind-mistyped", "lora", edit_json(META, lambda m: _set(m, kind=["lora"])), "has kind ['lora']", None),
    ("meta-unknown-kind", "lora", edit_json(META, lambda m: _set(m, kind="qlora")), "has kind 'qlora'", None),
    ("meta-wrong-kind", "lora", edit_json(META, lambda m: _set(m, kind="full")),
     "a full version's is 'model.safetensors'", None),
    ("meta-version-mistyped", "lora", edit_json(META, lambda m: _set(m, version="2")),
     "has version '2', expected a whole number", None),
    ("meta-other-version", "lora", edit_json(META, lambda m: _set(m, version=7)), "says it is version 7", None),
    ("meta-sha-mistyped", "lora", edit_json(META, lambda m: _set(m, sha256=12)), "has sha256 12", None),
    ("meta-parent-mistyped", "lora", edit_json(META, lambda m: _set(m, parent={"v": 1})), "has parent", None),
    ("meta-weights-outside", "lora",
     edit_json(META, lambda m: _set(m, weights_file="../v0001/adapter_model.safetensors")), "names weights file",
     None),
    ("meta-huge", "lora", sparse_file(META, 48 * MiB), "meta.json is 50,331,648 bytes", None),
    ("config-missing", "lora", delete_file(LORA), "adapter_config.json is missing", None),
    ("config-not-an-object", "lora", write_file(LORA, '"r=4"'), "is a JSON string, not an object", None),
    ("config-not-lora", "lora", edit_json(LORA, lambda c: _set(c, peft_type="PREFIX_TUNING")),
     "has peft_type 'PREFIX_TUNING'", None),
    ("config-unknown-targets", "lora", edit_json(LORA, lambda c: _set(c, target_modules=["no_such_proj"])),
     "adapter_config.json does not fit the base model", None),
    ("config-zero-rank", "lora", edit_json(LORA, lambda c: _set(c, r=0)), "has rank r 0", None),
    ("config-rank-mistyped", "lora", edit_json(LORA, lambda c: _set(c, r="4")), "has rank r '4'", None),
    ("config-other-rank", "lora", edit_json(LORA, lambda c: _set(c, r=8)), "has shape (4, 32)", None),
    ("config-fewer-targets", "lora", edit_json(LORA, lambda c: _set(c, target_modules=["q_proj"])),
     "not a LoRA adapter for this base model", None),
    ("config-extra-modules", "lora", edit_json(LORA, lambda c: _set(c, modules_to_save=["lm_head"])),
     "sets modules_to_save", None),
    ("weights-not-safetensors", "lora", write_file(versions.LORA_WEIGHTS, b"\x00" * 64), "not valid safetensors",
     None),
    ("weights-empty", "lora", edit_tensors(lambda s: {}), "holds no tensors", None),
    ("weights-wrong-names", "lora", edit_tensors(lambda s: {k.replace("lora_", "lorb_"): t for k, t in s.items()}),
     "not a LoRA adapter for this base model", None),
    ("weights-missing-tensor", "lora", edit_tensors(lambda s: dict(list(s.items())[1:])), "1 missing", None),
    ("weights-extra-tensor", "lora", edit_tensors(lambda s: {**s, "base_model.model.lm_head.weight": torch.zeros(3)}),
     "1 unexpected", None),
    ("weights-wrong-shape", "lora", edit_tensors(lambda s: _first(s, lambda t: t.T.contiguous())),
     "has shape (32, 4)", None),
    ("weights-wrong-dtype", "lora", edit_tensors(lambda s: _first(s, lambda t: t.to(torch.int32))),
     "is torch.int32", None),
    ("weights-nan", "lora", edit_tensors(lambda s: _first(s, _poisoned(float("nan")))), "NaN or infinite", None),
    ("weights-inf", "lora", edit_tensors(lambda s: _first(s, _poisoned(float("inf")))), "NaN or infinite", None),
    ("weights-overflow", "lora", edit_tensors(lambda s: {k: torch.full_like(t, 1e30) for k, t in s.items()}),
     "is not finite (its weights overflow when applied)", None),
    ("weights-huge", "lora", sparse_file(versions.LORA_WEIGHTS, 64 * MiB), "more than a version of this model", None),
    ("weights-missing", "lora", delete_file(versions.LORA_WEIGHTS), "adapter_model.safetensors is missing", None),
    ("folder-missing", "lora", lambda folder, good: shutil.rmtree(folder), "the version folder is missing", None),
    ("weights-symlink", "lora", link_weights_to_v1, "is a symbolic link", None),
    ("folder-symlink", "lora", move_folder_elsewhere, "not the version folder", None),
    ("registry-dotdot", "lora", None, "not the version folder", registry_dotdot),
    ("registry-outside", "lora", None, "not the version folder", registry_outside),
    ("full-lora-weights", "full", edit_tensors(lambda s: LORA_SHAPED), "not full weights for this base model", None),
    ("full-missing-tensor", "full", edit_tensors(lambda s: dict(list(s.items())[1:])), "1 missing", None),
    ("full-wrong-shape", "full", edit_tensors(lambda s: _first(s, lambda t: t[:-1].contiguous())), "has shape",
     None),
    ("full-wrong-dtype", "full", edit_tensors(lambda s: _first(s, lambda t: t.to(torch.int64))), "is torch.int64",
     None),
    ("full-nan", "full", edit_tensors(lambda s: _first(s, _poisoned(float("nan")))), "NaN or infinite", None),
]
# The default engine too (it merges a version into a fresh copy), for the cases that get furthest.
CT2_CASES = {"config-other-rank", "weights-overflow", "full-wrong-shape"}
# Files too big for a version of the model: refused before they are read (little memory traced).
OVERSIZED = {"meta-huge", "weights-huge"}


PARAMS = [pytest.param(*c[1:], "torch", c[0] in OVERSIZED, id=c[0]) for c in CASES]
PARAMS += [pytest.param(*c[1:], "ctranslate2", c[0] in OVERSIZED, id=f"{c[0]}-ct2") for c in CASES
           if c[0] in CT2_CASES]


@pytest.fixture(scope="module")
def candidates(tiny_model_dir, tmp_path_factory):
    """A LoRA and a full candidate from the trainer (what it would publish), made once."""
    cfg = tiny_config(tmp_path_factory.mktemp("cand"), tiny_model_dir)
    lora = Learner(cfg, trainer_config(cfg)).candidate(None, seed=0)
    full_cfg = tiny_config(tmp_path_factory.mktemp("cand"), tiny_model_dir, trainer={"full_finetune": True})
    full = Learner(full_cfg, trainer_config(full_cfg)).candidate(None, seed=0)
    return {"lora": lora, "full": full}


def reseal(folder: Path, kind: str) -> str:
    """The sha256 of the (broken) weights, also written into meta.json where it has one."""
    weights = folder / versions.WEIGHTS_OF[kind]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.exists() else "0" * 64
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return sha
    if isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and len(meta["sha256"]) == 64:
        (folder / META).write_text(json.dumps({**meta, "sha256": sha}))
    return sha


async def publish_broken(store, cfg, cand, corrupt, registry_path) -> None:
    """v2 through the trainer's own staging and rename, broken in between, then registered and
    made active as publish() does, with its registry sha256 recomputed."""
    tmp, _ = stage(cfg.versions_dir, 2, cand.model, cand.kind, {"parent": 1})
    final = cfg.versions_dir / versions.dirname(2)
    commit(tmp, final)
    if corrupt is not None:
        corrupt(final, cfg.versions_dir / versions.dirname(1))
    sha = reseal(final.resolve() if final.is_symlink() else final, cand.kind)
    path = registry_path(final) if registry_path else str(final.resolve() if not final.is_symlink() else final)
    await store.add_version(2, 1, path, sha, "published", {"last_reply_id": 0}, activate=True)


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "bot.chat" and "refused v2" in r.getMessage()]


def loaded_adapters(policy) -> set[str]:
    """Every LoRA adapter (and full model) the torch engine holds anywhere."""
    from peft.tuners.lora import LoraLayer

    engine = policy.engine
    names = {f"full v{v}" for v in engine._full_models} | set(getattr(engine.model, "peft_config", {}))
    for module in engine.base.modules():
        if isinstance(module, LoraLayer):
            names |= set(module.lora_A)
    return names


async def ask(core) -> int:
    async def send(text):
        return ["p1"]

    return await core.on_message(Message("console", f"m{os.urandom(4).hex()}", "c", "u", "u", "hello", **CONSOLE),
                                 [], send)


@pytest.mark.parametrize("kind, corrupt, says, registry_path, engine, oversized", PARAMS)
async def test_a_broken_version_is_refused_and_the_previous_one_keeps_serving(
        kind, corrupt, says, registry_path, engine, oversized, candidates, tmp_path, tiny_model_dir, store_for,
        caplog):
    cfg = tiny_config(tmp_path, tiny_model_dir, serving={"engine": engine, "poll_seconds": 0.05})
    store = await store_for(cfg)
    cand = candidates[kind]
    await publish(store, cfg.versions_dir, version=1, parent=0, model=cand.model, kind=cand.kind, meta={},
                  metrics={"last_reply_id": 0})
    policy = Policy.from_config(cfg)
    try:
        core = ChatCore(cfg, store, policy)
        await core.sync_version()
        assert policy.active_version == 1
        before = loaded_adapters(policy) if engine == "torch" else None
        await publish_broken(store, cfg, cand, corrupt, registry_path)

        if oversized:
            tracemalloc.start()
        try:
            await core.sync_version()
            peak = tracemalloc.get_traced_memory()[1] if oversized else 0
        finally:
            if oversized:
                tracemalloc.stop()
        if oversized:                           # a huge file (48 or 64 MiB) is refused before it is read
            assert peak < 24 * MiB and "refusing it unread" in core.serving_error
        assert policy.active_version == 1 and not policy.is_loaded(2)
        assert says in core.serving_error and core.serving_error.startswith("v2: ")
        assert len(refusals(caplog)) == 1 and says in refusals(caplog)[0]
        assert says in await store.get_state("serving_error")
        if engine == "torch":
            assert loaded_adapters(policy) == before   # nothing of v2 stayed loaded
        seen = len(caplog.records)
        await core.sync_version()                      # the next poll does not try it again
        assert [r.getMessage() for r in caplog.records[seen:] if r.name.startswith("bot")] == []
        assert (await store.get_reply(await ask(core))).version == 1
        status = (await core.on_command(Command("console", "c", "u", "status"))).text
        assert "Active version: v2 (serving v1)" in status and "Refused checkpoint: v2: " in status and says in status
    finally:
        policy.close()

    fresh = Policy.from_config(cfg)                    # a restart with the broken v2 active
    try:
        core = ChatCore(cfg, store, fresh)
        await core.sync_version()
        assert fresh.active_version == 1 and await store.active_version() == 2
        assert len(refusals(caplog)) == 2 and says in refusals(caplog)[1]
        assert any("serving v1, the newest version that loads, instead of the broken v2" in r.getMessage()
                   for r in caplog.records)
        status = (await core.on_command(Command("console", "c", "u", "status"))).text
        assert "Active version: v2 (serving v1)" in status and says in status
        assert (await store.get_reply(await ask(core))).version == 1
    finally:
        fresh.close()


# -- a good folder whose install fails for another reason (the disk, the converter, memory) --------


async def test_a_version_that_fails_to_install_is_logged_once_shown_and_tried_again_later(
        candidates, tmp_path, tiny_model_dir, store_for, caplog):
    """v2's folder is fine, but its int8 conversion can't be written into serving/ (a file is in
    the way of the folder it goes to, as a disk problem would leave it): not a VersionError. It is
    logged once, shown in /status, not tried every poll; a fresh start serves v1; after
    ``INSTALL_RETRY_SECONDS`` it is tried again and, the obstacle gone, serves."""
    from bot.chat import INSTALL_RETRY_SECONDS

    now = [1000.0]
    cfg = tiny_config(tmp_path, tiny_model_dir, serving={"engine": "ctranslate2"})
    store = await store_for(cfg)
    cand = candidates["lora"]
    for v in (1, 2):
        await publish(store, cfg.versions_dir, version=v, parent=v - 1, model=cand.model, kind=cand.kind, meta={},
                      metrics={"last_reply_id": 0})
        if v == 1:
            policy = Policy.from_config(cfg)
            core = ChatCore(cfg, store, policy, clock=lambda: now[0])
            await core.sync_version()
            assert type(policy.engine).__name__ == "CT2Engine" and policy.active_version == 1
    sha = (await store.get_version(2)).sha256
    blocker = policy.engine._folder(f"v2-{sha[:12]}-{policy.engine._base_id}")    # where v2's conversion goes
    blocker.write_text("in the way")

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "bot.chat" and "could not install v2" in r.getMessage()]

    try:
        for _ in range(2):
            await core.sync_version()                         # two polls: one record, no retry
        assert len(failures()) == 1 and "NotADirectoryError" in failures()[0]
        assert policy.active_version == 1 and not policy.is_loaded(2)
        status = (await core.on_command(Command("console", "c", "u", "status"))).text
        assert "Active version: v2 (serving v1)" in status
        assert "Refused checkpoint: v2: could not install it (NotADirectoryError" in status
        assert "could not install it" in await store.get_state("serving_error")
    finally:
        policy.close()

    fresh = Policy.from_config(cfg)                           # a restart, the obstacle still there
    try:
        core = ChatCore(cfg, store, fresh, clock=lambda: now[0])
        await core.sync_version()
        assert fresh.active_version == 1 and len(failures()) == 2
        assert any("serving v1, the newest version that loads, instead of the broken v2" in r.getMessage()
                   for r in caplog.records)
        blocker.unlink()                                      # the disk problem is fixed
        await core.sync_version()
        assert fresh.active_version == 1 and len(failures()) == 2     # not before the back-off
        now[0] += INSTALL_RETRY_SECONDS
        await core.sync_version()
        assert fresh.active_version == 2 and core.serving_error == "" and await store.get_state("serving_error") == ""
        assert "Refused" not in (await core.on_command(Command("console", "c", "u", "status"))).text
    finally:
        fresh.close()
