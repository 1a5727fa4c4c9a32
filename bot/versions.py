"""Model versions: the one home for what a published version is on disk and how it is used.

    versions_dir/
      .tmp-v0007-4242/    being written by trainer pid 4242 (trainer/publish.py)
      v0007/              published
        meta.json         {"version", "parent", "kind", "weights_file", "sha256", "trainer", "metrics", ...}
        adapter_model.safetensors + adapter_config.json   kind "lora" (peft's format)
        model.safetensors                                 kind "full" (tied duplicates dropped)
        optimizer.safetensors                             AdamW's moments, LoRA only, optional
        reward_model.safetensors                          the round's reward model head, optional

Version 0 is the base model and has no folder. The registry row in the store
(``model_versions``: path, sha256) says which folders are published; a folder is trusted
only when its weights match the registry's sha256.

Who uses what:
- the trainer writes a version's files with :func:`write_weights` and :func:`write_meta`
  (``trainer/publish.py`` adds the atomic staging and the registry row);
- the bot (``bot/policy.py``) and the trainer (``trainer/learner.py``) read one with
  :func:`read_verified` and apply it to a base model with :func:`add_adapter` or
  :func:`load_full_weights`;
- everything else reads ``meta.json`` through :func:`read_meta`.

Weights are safetensors only: nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
from safetensors.torch import load as parse_safetensors
from safetensors.torch import save_file

from bot.policy_types import VersionError

META_FILE = "meta.json"
LORA_WEIGHTS = "adapter_model.safetensors"
LORA_CONFIG = "adapter_config.json"
FULL_WEIGHTS = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
REWARD_MODEL_FILE = "reward_model.safetensors"
SIDE_FILES = {OPTIMIZER_FILE: "optimizer_sha256", REWARD_MODEL_FILE: "reward_model_sha256"}   # file → meta key
KINDS = ("lora", "full")
TMP_PREFIX = ".tmp-"
_FOLDER = re.compile(r"^v(\d+)$")


# -- the folder layout ----------------------------------------------------------


def dirname(version: int) -> str:
    """``7`` → ``"v0007"``."""
    return f"v{version:04d}"


def number_of(folder_name: str) -> int | None:
    """``"v0007"`` → 7; None for anything that is not a version folder's name."""
    m = _FOLDER.match(folder_name)
    return int(m.group(1)) if m else None


# -- meta.json ------------------------------------------------------------------


def write_meta(folder: Path, meta: dict) -> None:
    """Write ``meta.json`` (the caller fsyncs and renames the folder)."""
    (Path(folder) / META_FILE).write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")


def read_meta(folder: Path) -> dict:
    """``meta.json`` of a version folder, with its ``kind`` and ``weights_file`` checked.
    Raises VersionError naming the folder and what is wrong."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise VersionError(f"{folder}: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
        kind, weights_file = meta["kind"], meta["weights_file"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VersionError(f"{folder}: {META_FILE} is unreadable ({e})") from None
    if kind not in KINDS:
        raise VersionError(f"{folder}: {META_FILE} has kind {kind!r}, expected one of {KINDS}")
    if weights_file not in (LORA_WEIGHTS, FULL_WEIGHTS):
        raise VersionError(f"{folder}: {META_FILE} names weights file {weights_file!r}")
    return meta


def _json_default(o):
    if is_dataclass(o):
        return asdict(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# -- writing weights ---------------------------------------------------------------


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights for safetensors: contiguous, CPU, tied duplicates (lm_head) dropped."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict().items():
        ptr = t.data_ptr()
        if ptr in seen:            # tied to a tensor already saved (e.g. lm_head = embed_tokens)
            continue
        seen.add(ptr)
        out[name] = t.detach().to("cpu").contiguous().clone()
    return out


def write_weights(folder: Path, model, kind: str) -> str:
    """Write a trained model's weights into ``folder``; returns the weights file's name."""
    folder = Path(folder)
    if kind == "lora":
        model.save_pretrained(str(folder), safe_serialization=True)
        if not (folder / LORA_WEIGHTS).is_file():
            raise RuntimeError(f"peft did not write {LORA_WEIGHTS} in {folder}")
        return LORA_WEIGHTS
    if kind == "full":
        save_file(full_state_dict(model), str(folder / FULL_WEIGHTS), metadata={"format": "pt"})
        return FULL_WEIGHTS
    raise ValueError(f"unknown version kind {kind!r}")


# -- reading and verifying ---------------------------------------------------------


@dataclass
class VersionFiles:
    """A version read from disk and verified against the registry."""

    path: Path
    kind: str                       # "lora" | "full"
    state: dict[str, torch.Tensor]  # the parsed weights
    meta: dict


def read_side_file(folder: Path, name: str, sha256: str | None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """A side file of a version (``SIDE_FILES``) checked against ``sha256`` (from its meta.json).
    Returns (tensors or None, why not): a missing or broken side file never breaks the version."""
    from bot.models import sha256_file

    path = Path(folder) / name
    if not sha256:
        return None, f"the version has no {name}"
    if not path.is_file():
        return None, f"{name} is missing"
    if sha256_file(path) != sha256:
        return None, f"{name} does not match its sha256"
    try:
        return parse_safetensors(path.read_bytes()), ""
    except Exception as e:  # noqa: BLE001 - a broken side file is reported, not raised
        return None, f"{name} cannot be read ({type(e).__name__})"


def read_version_side_file(folder: Path, name: str) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``read_side_file`` with the sha256 the folder's meta.json records."""
    try:
        meta = read_meta(Path(folder))
    except VersionError as e:
        return None, f"meta.json unreadable ({e})"
    return read_side_file(folder, name, meta.get(SIDE_FILES[name]))


def read_verified(path: Path, sha256: str) -> VersionFiles:
    """Read a version folder, check its weights against the registry's sha256, parse them.
    Raises VersionError (missing files, bad meta.json, mismatch, not safetensors)."""
    path = Path(path)
    meta = read_meta(path)
    weights = path / meta["weights_file"]
    if not weights.is_file():
        raise VersionError(f"{path}: {meta['weights_file']} is missing")
    data = weights.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256 or meta.get("sha256") not in (None, sha256):
        raise VersionError(f"{path}: sha256 mismatch (registry {sha256[:12]}…, file {got[:12]}…); refusing it")
    try:
        state = parse_safetensors(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise VersionError(f"{path}: {meta['weights_file']} is not valid safetensors ({e})") from None
    return VersionFiles(path, meta["kind"], state, meta)


# -- applying a version to a base model ------------------------------------------


def adapter_config(path: Path):
    """The peft ``LoraConfig`` a LoRA version was trained with."""
    from peft import LoraConfig

    try:
        return LoraConfig.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - missing or malformed adapter_config.json
        raise VersionError(f"{path}: {LORA_CONFIG} is unreadable ({type(e).__name__}: {e})") from None


def set_adapter_weights(peft_model, state: dict, adapter_name: str, label: str) -> None:
    """Load a LoRA state dict into ``peft_model``'s adapter ``adapter_name``; VersionError
    when its keys do not fit (another base model or other target modules)."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise VersionError(f"{label}: adapter does not fit the base model ({bad[:3]})")


def add_adapter(model, files: VersionFiles, adapter_name: str, label: str):
    """Add a LoRA version to ``model`` (a base model, or a PeftModel holding other adapters)
    under ``adapter_name``. Returns the PeftModel; on a misfit the adapter is removed again
    and VersionError is raised."""
    from peft import PeftModel, get_peft_model

    lora = adapter_config(files.path)
    created = not isinstance(model, PeftModel)
    if created:
        model = get_peft_model(model, lora, adapter_name=adapter_name)
    else:
        model.add_adapter(adapter_name, lora)
    try:
        set_adapter_weights(model, files.state, adapter_name, label)
    except VersionError:
        if created:
            model.unload()          # the base model's own layers again, no LoRA wrappers
        else:
            model.delete_adapter(adapter_name)
        raise
    return model


def load_full_weights(model, state: dict, label: str) -> None:
    """Load a full fine-tune's weights into ``model`` (same architecture as the base) in
    place; VersionError when they do not fit. A missing lm_head is fine: it is tied."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise VersionError(f"{label}: weights do not fit the base model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
