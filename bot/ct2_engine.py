"""The fast serving engine: CTranslate2 with int8 weights, one thread per lane.

Why: a decode step reads every weight once. fp32 torch reads ~540 MB per token for the
default model and pays Python overhead per layer; CTranslate2's int8 kernels read ~135 MB
and run the whole step in C++. On 2 cores, one thread per batch beats two threads on one
batch (thread hand-offs cost more than they give at this size), so the engine runs
``lanes`` batches side by side, each on one thread (docs/PERFORMANCE.md has the numbers).

Exact behaviour logprobs: the model is converted with its output layer divided by the
sampling temperature T, and sampled at temperature 1 with top-p. So the engine samples from
softmax(logits / T) truncated by top-p, exactly as the torch path does, and the
log-probability it reports for each token, log softmax(logits / T)[token] before the top-p
cut, is the probability under the distribution the token was really drawn from. The
trainer recomputes it in fp32; the small int8 difference is treated as off-policy data
(trainer/loss.py, truncated importance sampling).

Versions: a LoRA version is merged into a copy of the fp32 base and converted; a full
version is converted as it is. Conversions are cached in ``work_dir`` (a few seconds each
for the default model) and loaded beside the others, so a swap is a dictionary update.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from bot import versions
from bot.policy_types import VersionError
from bot.torch_engine import OnStep

log = logging.getLogger(__name__)
QUANTIZATION = "int8"


def available() -> str:
    """'' when CTranslate2 can be used here, else why not."""
    try:
        import ctranslate2
    except ImportError as e:
        return f"ctranslate2 is not installed ({e})"
    if QUANTIZATION not in ctranslate2.get_supported_compute_types("cpu"):
        return f"this CPU has no {QUANTIZATION} kernels in ctranslate2"
    return ""


def fingerprint(model) -> str:
    """A short id of a model's weights: its config, size and a few tensors' bytes."""
    h = hashlib.sha256(model.config.to_json_string().encode())
    params = list(model.state_dict().values())
    h.update(str(sum(p.numel() for p in params)).encode())
    for p in params[:2] + params[-2:]:
        h.update(p.detach().to(torch.float32).contiguous().numpy().tobytes()[:1 << 20])
    return h.hexdigest()[:16]


def convert(model, tokenizer, out_dir: Path, temperature: float) -> Path:
    """Convert a torch causal LM to a CTranslate2 folder with the output layer scaled by
    1/temperature (see the module doc). ``model`` is changed (its head scaled and untied):
    pass a copy. Atomic: a crash leaves no half folder at ``out_dir``."""
    out_dir = Path(out_dir)
    if (out_dir / "model.bin").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    hf_logging.disable_progress_bar()            # no "Writing model shards" bar in the bot's log
    with tempfile.TemporaryDirectory(prefix="reactlearn-ct2-", dir=out_dir.parent) as tmp:
        model = model.to(torch.float32)
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone() / temperature, requires_grad=False)
        model.config.tie_word_embeddings = False
        hf_dir, staging = Path(tmp) / "hf", Path(tmp) / "ct2"
        model.save_pretrained(hf_dir, safe_serialization=True)
        tokenizer.save_pretrained(hf_dir)
        _run_converter(hf_dir, staging)
        try:
            os.rename(staging, out_dir)
        except OSError:                  # another process converted it meanwhile
            if not (out_dir / "model.bin").is_file():
                raise
    log.info("converted to CTranslate2 %s in %.1fs: %s", QUANTIZATION, time.monotonic() - started, out_dir)
    return out_dir


def _save_atomically(model, folder: Path) -> None:
    """``model.save_pretrained`` into a temp folder, then rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():
            raise


def _run_converter(hf_dir: Path, out_dir: Path) -> None:
    """CTranslate2's converter in a child process: it is Python-heavy, and in this process it
    would hold the GIL for seconds and stall the bot's event loop (docs/PERFORMANCE.md)."""
    cmd = [sys.executable, "-W", "ignore", "-c", "from ctranslate2.converters.transformers import main; main()",
           "--model", str(hf_dir), "--output_dir", str(out_dir), "--quantization", QUANTIZATION]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the CTranslate2 converter failed (exit {done.returncode}): {last}")


class CT2Engine:
    """Serves from CTranslate2 int8 copies only: the fp32 base it was given is saved once to
    ``work_dir`` (to merge versions into, loaded again at each install) and not kept in
    memory, so the bot holds ~135 MB per loaded version instead of 540 MB + that."""

    def __init__(self, base, tokenizer, *, temperature: float, work_dir: Path, lanes: int = 0,
                 cache_dir: Path | None = None):
        """``work_dir``: this bot's version conversions; ``cache_dir`` (default: ``work_dir``):
        the base model's fp32 copy and conversion, shared by every bot on the machine."""
        import ctranslate2

        self.ct2 = ctranslate2
        self.tokenizer = tokenizer
        self.temperature = temperature
        self.work_dir = Path(work_dir)
        self.lanes = lanes or max(1, min(4, os.cpu_count() or 1))
        self._generators: dict[int, object] = {}
        self._base_id = fingerprint(base)
        cache = Path(cache_dir) if cache_dir is not None else self.work_dir
        self._base_dir = cache / f"base-{self._base_id}-fp32"
        if not (self._base_dir / "config.json").is_file():
            _save_atomically(base, self._base_dir)
        base_ct2 = cache / f"base-{self._base_id}-T{temperature:g}-{QUANTIZATION}"
        self._generators[0] = self._load(convert(self._fp32_base(), tokenizer, base_ct2, temperature))

    def _fp32_base(self):
        """A fresh fp32 copy of the base model, from the folder saved at start."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(self._base_dir, dtype=torch.float32).eval()

    def _folder(self, name: str) -> Path:
        return self.work_dir / f"{name}-T{self.temperature:g}-{QUANTIZATION}"

    def _load(self, folder: Path):
        threads = torch.get_num_threads()     # CTranslate2 sets the process's OpenMP threads to intra_threads;
        try:                                  # torch (merging versions, a trainer in the same process) keeps its own
            return self.ct2.Generator(str(folder), device="cpu", compute_type=QUANTIZATION,
                                      inter_threads=self.lanes, intra_threads=1)
        finally:
            torch.set_num_threads(threads)

    # -- sampling ---------------------------------------------------------------

    def sample(self, prompts: list[list[int]], version: int, *, temperature: float, top_p: float,
               max_new_tokens: int, on_step: OnStep | None = None) -> list[tuple[list[int], list[float]]]:
        """One reply per prompt: (sampled ids, end-of-turn included when sampled; their logprobs)."""
        if abs(temperature - self.temperature) > 1e-9:
            raise ValueError(f"this engine samples at temperature {self.temperature}, not {temperature}")
        generator = self._generators.get(version)
        if generator is None:
            raise VersionError(f"version {version} is not loaded")
        ids: list[list[int]] = [[] for _ in prompts]
        logps: list[list[float]] = [[] for _ in prompts]

        def step(s) -> bool:
            ids[s.batch_id].append(s.token_id)
            logps[s.batch_id].append(s.log_prob)
            if on_step is not None:
                on_step(s.batch_id, ids[s.batch_id])
            return False

        eos = self.tokenizer.eos_token_id
        generator.generate_batch(
            [self.tokenizer.convert_ids_to_tokens(p) for p in prompts], max_length=max_new_tokens,
            sampling_temperature=1.0, sampling_topp=top_p, sampling_topk=0, end_token=[eos], return_end_token=True,
            include_prompt_in_result=False, return_scores=True, callback=step)   # scores: log_prob per step
        results = []
        for row_ids, row_logps in zip(ids, logps):
            n = row_ids.index(eos) + 1 if eos in row_ids else len(row_ids)
            results.append((row_ids[:n], row_logps[:n]))
        return results

    # -- versions ---------------------------------------------------------------

    def install(self, version: int, files: versions.VersionFiles) -> None:
        """Convert the version (merged into the fp32 base) unless cached, and load it."""
        label = f"v{version}"
        folder = self._folder(f"{label}-{files.meta.get('sha256', '')[:12]}-{self._base_id}")
        if not (folder / "model.bin").is_file():
            model = self._fp32_base()
            if files.kind == "full":
                versions.load_full_weights(model, files.state, str(files.path))
            else:
                with warnings.catch_warnings():     # peft notes the base folder's name differs: expected here
                    warnings.simplefilter("ignore", UserWarning)
                    model = versions.add_adapter(model, files, "default", str(files.path)).merge_and_unload()
            convert(model, self.tokenizer, folder, self.temperature)
            del model
        self._generators[version] = self._load(folder)

    def seed(self, value: int) -> None:
        self.ct2.set_random_seed(value)

    def close(self) -> None:
        """Unload every version, which joins CTranslate2's threads. Call when no batch is
        running: a process that exits while one runs aborts ("terminate called without an
        active exception"), so the policy closes its engine at exit (bot/policy.py)."""
        self._generators.clear()

    def forget(self, version: int) -> None:
        """Unload a version (a batch still running on it keeps its own reference)."""
        self._generators.pop(version, None)
        for old in self.work_dir.glob(f"v{version}-*"):
            shutil.rmtree(old, ignore_errors=True)

