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
only when its weights match the registry's sha256, and only as far as it checks out: every
way a folder can be wrong is a VersionError naming the file and what is wrong, raised before
anything is applied (paths outside the versions folder or through a symbolic link, files
larger than a version of the model can be, JSON of the wrong shape, NaN/inf weights, a LoRA
configuration the base can't take) or while applying, with the model left as it was (tensor
names, shapes or dtypes that are not the adapter's or the model's).

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

import errno
import hashlib
import json
import math
import os
import re
import stat
import warnings
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

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
WEIGHTS_OF = {"lora": LORA_WEIGHTS, "full": FULL_WEIGHTS}   # kind → its weights file
TMP_PREFIX = ".tmp-"
TRASH_PREFIX = ".trash-"     # a pruned folder, renamed before it is deleted (trainer/publish.py)
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

MAX_JSON_BYTES = 16 << 20        # meta.json, adapter_config.json: kilobytes (a round's reply ids at most a few MB)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NOT_FOR_VERSIONS = ("modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters")


SLACK_BYTES = 1 << 20            # on top of every size bound: the safetensors header and a margin
_PER_TENSOR = 512                # header bytes one tensor can take (its name, dtype, shape, offsets)


@dataclass(frozen=True)
class WeightLimits:
    """The most a version's weights file can hold for one base model, from its layers
    (:func:`max_weights_bytes`), each bound 8 bytes a number (fp32 twice over: a file may hold
    float64) plus ``SLACK_BYTES``:

    - a full fine-tune: every parameter of the base;
    - a LoRA adapter: what its adapter_config.json allows, ``r × (in + out)`` (and a DoRA
      magnitude) for each of the base's layers its ``target_modules`` name, at the largest rank
      it sets (``r``, ``rank_pattern``): a rank-1024 adapter over every layer is admitted, a file
      bigger than its configuration can make is refused unread."""

    full: int
    layers: tuple[tuple[str, int, int], ...]   # (module name, rows, columns) of each 2-D weight of the base

    def lora(self, config) -> int:
        """The bound for an adapter with peft ``LoraConfig`` ``config`` (checked by ``adapter_config``)."""
        from peft.tuners.tuners_utils import check_target_module_exists

        rank = max([int(config.r), *(int(v) for v in (config.rank_pattern or {}).values())])
        every = config.target_modules == "all-linear"       # peft's shorthand: every linear layer
        numbers = tensors = 0
        for name, rows, cols in self.layers:
            if every or check_target_module_exists(config, name):
                numbers += rank * (rows + cols) + max(rows, cols)
                tensors += 3
        return 8 * numbers + _PER_TENSOR * tensors + SLACK_BYTES

    def of(self, kind: str, config=None) -> int:
        """The bound for a version of ``kind`` ("lora" needs its ``config``)."""
        return self.lora(config) if kind == "lora" else self.full


def max_weights_bytes(model) -> WeightLimits:
    """The most a version's weights file can hold for the base ``model`` (see WeightLimits)."""
    layers = tuple((name, *m.weight.shape) for name, m in model.named_modules()
                   if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2)
    return WeightLimits(8 * sum(p.numel() for p in model.parameters()) + SLACK_BYTES, layers)


def max_optimizer_bytes(model) -> int:
    """The most ``optimizer.safetensors`` can hold for the trainable ``model`` it is loaded into:
    AdamW's two moments of each trainable parameter and its step, in fp32 (trainer/optim_state.py)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return 8 * sum(p.numel() for p in trainable) + (4 + 3 * _PER_TENSOR) * len(trainable) + SLACK_BYTES


def max_reward_model_bytes(model) -> int:
    """The most ``reward_model.safetensors`` can hold for the base ``model``: a logistic head on
    3 × hidden features (mean, scale and weight of that size, in fp32) and a few numbers
    (trainer/reward_model.py)."""
    hidden = int(model.get_input_embeddings().weight.shape[1])
    return 4 * (3 * 3 * hidden + 16) + 8 * _PER_TENSOR + SLACK_BYTES


@dataclass
class VersionFiles:
    """A version read from disk and verified against the registry."""

    path: Path
    kind: str                       # "lora" | "full"
    state: dict[str, torch.Tensor]  # the parsed weights, every float finite
    meta: dict
    lora: Any = None                # kind "lora": its peft LoraConfig, checked (adapter_config.json)


def read_bounded(folder: Path, name: str, limit: int | None) -> bytes:
    """The bytes of ``folder/name``: a regular file (not a symbolic link, not a device) of at
    most ``limit`` bytes. VersionError otherwise, before anything is read into memory."""
    path = Path(folder) / name
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise VersionError(f"{folder}: {name} is missing") from None
    except OSError as e:
        why = "is a symbolic link (a version's files are its own)" if e.errno == errno.ELOOP else f"can't be read ({e})"
        raise VersionError(f"{folder}: {name} {why}; refusing it") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise VersionError(f"{folder}: {name} is not a regular file; refusing it")
        if limit is not None and st.st_size > limit:
            raise VersionError(f"{folder}: {name} is {st.st_size:,} bytes, more than a version of this model can be "
                               f"({limit:,}); refusing it unread")
        data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise VersionError(f"{folder}: {name} grew past {limit:,} bytes while read; refusing it")
    return data


def _read_json(folder: Path, name: str):
    try:
        return json.loads(read_bounded(folder, name, MAX_JSON_BYTES))
    except ValueError as e:         # not UTF-8, not JSON
        raise VersionError(f"{folder}: {name} is not valid JSON ({e})") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _json_type(v) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def read_meta(folder: Path) -> dict:
    """``meta.json`` of a version folder: a JSON object whose ``kind`` and ``weights_file``
    agree, and whose ``version``, ``parent`` and ``sha256`` (when present) have their types.
    Raises VersionError naming the folder and what is wrong."""
    meta = _read_json(folder, META_FILE)
    where = f"{folder}: {META_FILE}"
    if not isinstance(meta, dict):
        raise VersionError(f"{where} is a JSON {_json_type(meta)}, not an object")
    for key in ("kind", "weights_file"):
        if key not in meta:
            raise VersionError(f"{where} has no {key!r}")
    kind, weights_file = meta["kind"], meta["weights_file"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise VersionError(f"{where} has kind {kind!r}, expected one of {KINDS}")
    if weights_file != WEIGHTS_OF[kind]:
        raise VersionError(f"{where} names weights file {weights_file!r}; a {kind} version's is {WEIGHTS_OF[kind]!r}")
    for key, ok, want in (("version", _is_int, "a whole number"),
                          ("parent", lambda v: v is None or _is_int(v), "a whole number or null"),
                          ("sha256", lambda v: isinstance(v, str) and bool(_SHA256.match(v)), "64 hex digits")):
        if key in meta and not ok(meta[key]):
            raise VersionError(f"{where} has {key} {meta[key]!r}, expected {want}")
    return meta


def read_side_file(folder: Path, name: str, sha256: str | None,
                   limit: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """A side file of a version (``SIDE_FILES``) checked against ``sha256`` (from its meta.json),
    refused unread when it is over ``limit`` bytes (``max_optimizer_bytes``,
    ``max_reward_model_bytes``). Returns (tensors or None, why not): a missing, oversized or
    broken side file never breaks the version."""
    if not sha256 or not isinstance(sha256, str):
        return None, f"the version has no {name}"
    try:
        data = read_bounded(folder, name, limit)
    except VersionError as e:
        return None, str(e).removeprefix(f"{folder}: ")
    if hashlib.sha256(data).hexdigest() != sha256:
        return None, f"{name} does not match its sha256"
    try:
        return parse_safetensors(data), ""
    except Exception as e:  # noqa: BLE001 - a broken side file is reported, not raised
        return None, f"{name} cannot be read ({type(e).__name__})"


def read_version_side_file(folder: Path, name: str, limit: int) -> tuple[dict[str, torch.Tensor] | None, str]:
    """``read_side_file`` with the sha256 the folder's meta.json records."""
    try:
        meta = read_meta(Path(folder))
    except VersionError as e:
        return None, f"meta.json unreadable ({e})"
    return read_side_file(folder, name, meta.get(SIDE_FILES[name]), limit)


def version_folder(path: str | Path, root: Path, version: int | None) -> Path:
    """The registry's ``path`` of a version, refused unless it is the folder ``root/vNNNN``
    itself: no '..', no symbolic link, nothing outside the versions folder."""
    p, root = Path(path), Path(root).resolve()
    want = root / (dirname(version) if version is not None else p.name)
    if ".." in p.parts or p.is_symlink() or p.resolve().parent != root or p.resolve() != want:
        raise VersionError(f"{p}: not the version folder {want} (a symbolic link, '..' or a path outside the "
                           "versions folder); refusing it")
    return want


def read_verified(path: Path, sha256: str, *, version: int | None = None, root: Path | None = None,
                  max_bytes: int | WeightLimits | None = None) -> VersionFiles:
    """Read a version folder, check its weights against the registry's sha256, parse them.

    ``version``: the registry's number (meta.json must agree); ``root``: the versions folder
    the path must be in; ``max_bytes``: the most its weights can be (``max_weights_bytes``: by
    kind, a LoRA adapter's from its adapter_config.json, which is read first), checked before
    they are read. Raises VersionError for every way a folder can be wrong:
    missing or oversized files, bad JSON, a mismatch, not safetensors, NaN/inf, a bad
    adapter_config.json. Whether the weights fit a model is checked when they are applied."""
    path = Path(path) if root is None else version_folder(path, root, version)
    if not path.is_dir():
        raise VersionError(f"{path}: the version folder is missing")
    meta = read_meta(path)
    if version is not None and meta.get("version") != version:
        raise VersionError(f"{path}: {META_FILE} says it is version {meta.get('version')!r}, the registry's "
                           f"v{version}; refusing it")
    lora = adapter_config(path) if meta["kind"] == "lora" else None     # its own small bound (MAX_JSON_BYTES)
    limit = max_bytes.of(meta["kind"], lora) if isinstance(max_bytes, WeightLimits) else max_bytes
    data = read_bounded(path, meta["weights_file"], limit)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256 or meta.get("sha256") not in (None, sha256):
        raise VersionError(f"{path}: sha256 mismatch (registry {str(sha256)[:12]}…, file {got[:12]}…); refusing it")
    try:
        state = parse_safetensors(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise VersionError(f"{path}: {meta['weights_file']} is not valid safetensors ({e})") from None
    check_tensors(state, f"{path}: {meta['weights_file']}")
    return VersionFiles(path, meta["kind"], state, meta, lora)


def check_tensors(state: dict[str, torch.Tensor], where: str) -> None:
    """VersionError unless ``state`` holds tensors and every float in them is finite."""
    if not state:
        raise VersionError(f"{where} holds no tensors; refusing it")
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise VersionError(f"{where}: tensor {name} holds NaN or infinite values; refusing it")


# -- applying a version to a base model ------------------------------------------


def check_lora_dict(d, where: str) -> None:
    """VersionError unless ``d`` (adapter_config.json) is a LoRA configuration of the kind the
    trainer writes: positive rank and alpha, named target modules, no extra trained modules."""
    if not isinstance(d, dict):
        raise VersionError(f"{where} is a JSON {_json_type(d)}, not an object")
    if d.get("peft_type") != "LORA":
        raise VersionError(f"{where} has peft_type {d.get('peft_type')!r}, expected 'LORA'")
    if not _is_int(d.get("r")) or d["r"] < 1:
        raise VersionError(f"{where} has rank r {d.get('r')!r}, expected a whole number of at least 1")
    if not _is_number(d.get("lora_alpha", 8)) or d.get("lora_alpha", 8) <= 0:
        raise VersionError(f"{where} has lora_alpha {d.get('lora_alpha')!r}, expected a positive number")
    targets = d.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
        raise VersionError(f"{where} has target_modules {targets!r}, expected module names")
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = d.get(key) or {}
        if not isinstance(pattern, dict) or not all(_is_number(v) and v > 0 for v in pattern.values()):
            raise VersionError(f"{where} has {key} {pattern!r}, expected module names → positive numbers")
    for key in _NOT_FOR_VERSIONS:
        if d.get(key):
            raise VersionError(f"{where} sets {key} ({d[key]!r}); a version only adapts its target modules")


def adapter_config(path: Path):
    """The peft ``LoraConfig`` a LoRA version was trained with (its adapter_config.json,
    checked by ``check_lora_dict``). Raises VersionError."""
    from peft import LoraConfig

    where = f"{path}: {LORA_CONFIG}"
    d = _read_json(path, LORA_CONFIG)
    check_lora_dict(d, where)
    try:
        with warnings.catch_warnings():         # keys from a newer peft are dropped with a warning
            warnings.simplefilter("ignore")
            lora = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**d))
    except Exception as e:  # noqa: BLE001 - peft refuses it
        raise VersionError(f"{where} is not a LoRA configuration peft accepts ({type(e).__name__}: {e})") from None
    if not isinstance(lora, LoraConfig):
        raise VersionError(f"{where} is a {type(lora).__name__}, not a LoRA configuration")
    return lora


def _few(names: list[str], what: str) -> str:
    """``3 missing (a, b, …)``"""
    return f"{len(names)} {what}" + (f" ({', '.join(names[:2])}{', …' if len(names) > 2 else ''})" if names else "")


def check_fit(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str, what: str,
              may_miss: set[str] = frozenset()) -> None:
    """VersionError unless ``state`` has exactly ``expected``'s tensors (less ``may_miss``), each
    of its shape, floats where it has floats and its dtype otherwise."""
    missing = sorted(set(expected) - set(state) - set(may_miss))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VersionError(f"{label}: the weights are not {what} for this base model (tensors: "
                           f"{_few(missing, 'missing')}, {_few(unexpected, 'unexpected')})")
    for name, got in sorted(state.items()):
        want = expected[name]
        if tuple(got.shape) != tuple(want.shape):
            raise VersionError(f"{label}: tensor {name} has shape {tuple(got.shape)}, the base model's is "
                               f"{tuple(want.shape)}")
        if got.dtype != want.dtype and not (got.is_floating_point() and want.is_floating_point()):
            raise VersionError(f"{label}: tensor {name} is {got.dtype}, the base model's is {want.dtype}")


def set_adapter_weights(peft_model, state: dict, adapter_name: str, label: str) -> None:
    """Load a LoRA state dict into ``peft_model``'s adapter ``adapter_name``; VersionError
    (and nothing loaded) when its tensors are not exactly that adapter's: names, shapes, dtypes."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    check_fit(state, get_peft_model_state_dict(peft_model, adapter_name=adapter_name), label, "a LoRA adapter")
    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if bad:
        raise VersionError(f"{label}: adapter does not fit the base model ({bad[:3]})")


def add_adapter(model, files: VersionFiles, adapter_name: str, label: str):
    """Add a LoRA version to ``model`` (a base model, or a PeftModel holding other adapters)
    under ``adapter_name``. Returns the PeftModel. When anything about it does not fit, the
    adapter is removed again (``model`` is as it was) and VersionError is raised."""
    from peft import PeftModel, get_peft_model

    lora = files.lora or adapter_config(files.path)
    created = not isinstance(model, PeftModel)
    try:                                    # peft leaves the model as it was when this fails
        if created:
            model = get_peft_model(model, lora, adapter_name=adapter_name)
        else:
            model.add_adapter(adapter_name, lora)
    except Exception as e:  # noqa: BLE001 - target modules the base lacks, a rank peft refuses, ...
        raise VersionError(f"{label}: {LORA_CONFIG} does not fit the base model ({type(e).__name__}: {e})") from None
    try:
        set_adapter_weights(model, files.state, adapter_name, label)
        check_deltas(model, adapter_name, label)
    except Exception as e:
        if created:
            model.unload()          # the base model's own layers again, no LoRA wrappers
        else:
            model.delete_adapter(adapter_name)
        if isinstance(e, VersionError):
            raise
        raise VersionError(f"{label}: the adapter's weights do not load ({type(e).__name__}: {e})") from None
    return model


def check_deltas(peft_model, adapter_name: str, label: str) -> None:
    """VersionError when adapter ``adapter_name`` changes a layer by a non-finite amount: finite
    weights whose product overflows (1e30 × 1e30) would make every reply NaN."""
    from peft.tuners.lora import LoraLayer

    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter_name in module.lora_A:
            with torch.no_grad():
                delta = module.get_delta_weight(adapter_name)
            if not bool(torch.isfinite(delta).all()):
                raise VersionError(f"{label}: the adapter's change to {name} is not finite (its weights overflow "
                                   "when applied); refusing it")


def _tied(state: dict[str, torch.Tensor]) -> set[str]:
    """Names whose tensor shares memory with an earlier one (``full_state_dict`` drops them)."""
    seen: set[int] = set()
    tied = set()
    for name, t in state.items():
        if t.data_ptr() in seen:
            tied.add(name)
        seen.add(t.data_ptr())
    return tied


def load_full_weights(model, state: dict, label: str) -> None:
    """Load a full fine-tune's weights into ``model`` (same architecture as the base) in
    place; VersionError (and nothing loaded) when they are not exactly its tensors. A tied
    tensor (lm_head = embed_tokens) may be missing."""
    expected = model.state_dict()
    check_fit(state, expected, label, "full weights", may_miss=_tied(expected))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
