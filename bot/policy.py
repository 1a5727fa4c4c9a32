"""The model at serving time.

- ``build_prompt`` renders the chat template and cuts old context to the token budget.
- ``generate`` queues a request for one worker thread, which takes up to ``batch_size``
  waiting requests at once and samples them together. The event loop never runs the
  model. Past ``queue_size`` waiting requests, ``generate`` raises ``Busy`` at once.
- Each batch is pinned to the version that is active when the batch starts; the
  version is recorded with every reply, so a swap never mixes versions inside a reply.
- ``install_version`` verifies a published version (sha256 of the weights file) and
  loads it beside the current ones in the worker thread, between batches;
  ``activate`` then points new batches at it. Version 0 is the base model.

Logprobs: for every sampled token we record log softmax(logits / temperature) at that
token, i.e. the tempered distribution the sample came from before top-p truncation.
That is exactly what the trainer can recompute with a forward pass, so the importance
ratio compares like with like.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load as load_safetensors_bytes
from transformers import GenerationConfig


log = logging.getLogger(__name__)
MAX_LOADED_VERSIONS = 3   # active + previous + one being swapped in


class Busy(Exception):
    """The generation queue is full; tell the person to try again shortly."""


class VersionError(Exception):
    """A version's files are missing, corrupt or do not match the registry."""


@dataclass
class Turn:
    role: str          # "user" or "assistant"
    text: str
    name: str = ""     # shown before user text in group chats


@dataclass
class Generation:
    text: str
    prompt_ids: list[int]
    output_ids: list[int]          # sampled tokens, the end-of-turn token included when sampled
    logprobs: list[float]          # one per output id
    version: int
    temperature: float
    top_p: float
    max_new_tokens: int
    seconds: float = 0.0


@dataclass
class _Job:
    prompt_ids: list[int]
    done: Callable[[Any], None]    # called in the worker with a Generation or an Exception


class Policy:
    def __init__(self, model, tokenizer, *, temperature: float = 0.8, top_p: float = 0.95,
                 max_new_tokens: int = 96, system_prompt: str = "", max_context_tokens: int = 512,
                 queue_size: int = 16, batch_size: int = 8):
        self.base = model.eval()
        self.model = self.base            # becomes a PeftModel once a LoRA version is installed
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.system_prompt = system_prompt
        self.max_context_tokens = max_context_tokens
        self.queue_size, self.batch_size = queue_size, batch_size
        self.active_version = 0
        self._loaded: dict[int, str] = {0: "base"}   # version → "base" | "lora" | "full"
        self._full_models: dict[int, Any] = {}
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="policy-worker", daemon=True)
        self._worker.start()

    @classmethod
    def from_config(cls, cfg) -> "Policy":
        """Load the base model named in ``cfg.model`` (blocking; seconds once converted)."""
        from bot.models import load_model_and_tokenizer

        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        model, tokenizer = load_model_and_tokenizer(cfg.model.name, Path(cfg.model.cache_dir).expanduser(),
                                                    cfg.model.dtype)
        s = cfg.sampling
        return cls(model, tokenizer, temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                   system_prompt=cfg.model.system_prompt, max_context_tokens=cfg.model.max_context_tokens,
                   queue_size=cfg.serving.queue_size, batch_size=cfg.serving.batch_size)

    # -- prompts --------------------------------------------------------------

    def _render(self, turns: list[Turn]) -> list[int]:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages += [{"role": t.role, "content": f"{t.name}: {t.text}" if t.name and t.role == "user" else t.text}
                     for t in turns]
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def build_prompt(self, turns: list[Turn]) -> list[int]:
        """Token ids of the prompt: the newest turns that fit in the budget.

        Old turns are dropped first; if the newest turn alone is too long, its text is
        cut from the start (the end of a message usually holds the question)."""
        turns = [t for t in turns if t.text.strip()] or [Turn("user", "...")]
        while len(turns) > 1 and len(self._render(turns)) > self.max_context_tokens:
            turns = turns[1:]
        ids = self._render(turns)
        if len(ids) > self.max_context_tokens:
            last = turns[-1]
            overhead = len(self._render([Turn(last.role, "", last.name)]))
            keep = max(1, self.max_context_tokens - overhead - 2)
            body = self.tokenizer.encode(last.text, add_special_tokens=False)[-keep:]
            ids = self._render([Turn(last.role, self.tokenizer.decode(body), last.name)])[-self.max_context_tokens:]
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    # -- generation -----------------------------------------------------------

    async def generate(self, turns: list[Turn]) -> Generation:
        return (await self.generate_many([self.build_prompt(turns)]))[0]

    async def generate_many(self, prompts: list[list[int]]) -> list[Generation]:
        """Sample one reply per prompt (token ids). Raises Busy if they don't all fit in the queue."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._waiting + len(prompts) > self.queue_size:
                raise Busy(f"{self._waiting} replies are already waiting")
            self._waiting += len(prompts)
        futures = []
        for ids in prompts:
            fut = loop.create_future()

            def done(result, fut=fut):
                loop.call_soon_threadsafe(_settle, fut, result)

            futures.append(fut)
            self._jobs.put(_Job(list(ids), done))
        return list(await asyncio.gather(*futures))

    def _run(self) -> None:
        """Worker thread: take jobs, generate in batches, install versions between batches."""
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if callable(job):          # an install/cleanup task queued by install_version
                job()
                continue
            batch = [job]
            while len(batch) < self.batch_size:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or callable(nxt):
                    self._jobs.put(nxt)   # keep order simple: handle it after this batch
                    break
                batch.append(nxt)
            with self._lock:
                self._waiting -= len(batch)
            try:
                results = self._generate_batch([j.prompt_ids for j in batch], self.active_version)
            except Exception as e:  # noqa: BLE001 - every waiting reply must get an answer
                log.exception("generation failed")
                results = [e] * len(batch)
            for j, r in zip(batch, results):
                j.done(r)

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], version: int) -> list[Generation]:
        start = time.perf_counter()
        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p)
            attention[i, width - len(p):] = 1
        gen_config = GenerationConfig(
            do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=0,
            max_new_tokens=self.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            output_logits=True, return_dict_in_generate=True)
        model = self._model_for(version)
        out = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=gen_config)
        new = out.sequences[:, width:]                                        # [B, steps]
        # one step at a time: a [B, steps, V] float copy would be ~0.4 GB for 32 replies
        token_logp = torch.stack([                                            # [B, steps]
            torch.log_softmax(step.float() / self.temperature, dim=-1).gather(-1, new[:, i:i + 1]).squeeze(-1)
            for i, step in enumerate(out.logits)], dim=1)
        seconds = time.perf_counter() - start
        results = []
        for i, p in enumerate(prompts):
            ids = new[i].tolist()
            n = ids.index(tok.eos_token_id) + 1 if tok.eos_token_id in ids else len(ids)
            text = tok.decode(ids[:n], skip_special_tokens=True).strip()
            results.append(Generation(text=text, prompt_ids=list(p), output_ids=ids[:n],
                                      logprobs=token_logp[i, :n].tolist(), version=version,
                                      temperature=self.temperature, top_p=self.top_p,
                                      max_new_tokens=self.max_new_tokens, seconds=seconds))
        return results

    def _model_for(self, version: int):
        """The module that generates for ``version`` (called in the worker thread)."""
        kind = self._loaded.get(version)
        if kind is None:
            raise VersionError(f"version {version} is not loaded")
        if kind == "full":
            return self._full_models[version]
        if kind == "lora":
            self.model.set_adapter(f"v{version}")
            self.model.enable_adapter_layers()
            return self.model
        if self.model is not self.base:
            self.model.disable_adapter_layers()
        return self.model

    # -- versions -------------------------------------------------------------

    def is_loaded(self, version: int) -> bool:
        return version in self._loaded

    async def install_version(self, version: int, path: str | Path, sha256: str) -> None:
        """Verify and load a published version beside the current ones. Raises VersionError."""
        weights = await asyncio.to_thread(read_verified_version, Path(path), sha256)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def task():
            try:
                self._install(version, Path(path), *weights)
                loop.call_soon_threadsafe(_settle, fut, None)
            except Exception as e:  # noqa: BLE001
                loop.call_soon_threadsafe(_settle, fut, e)

        self._jobs.put(task)
        await fut

    def _install(self, version: int, path: Path, kind: str, state: dict) -> None:
        if kind == "full":
            model = type(self.base)(self.base.config).to(next(self.base.parameters()).dtype)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lm_head" not in k]:
                raise VersionError(f"v{version}: weights do not fit the base model "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            model.tie_weights()
            self._full_models[version] = model.eval()
        else:
            from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

            lora = LoraConfig.from_pretrained(str(path))
            name = f"v{version}"
            if self.model is self.base:
                self.model = get_peft_model(self.base, lora, adapter_name=name)
            else:
                self.model.add_adapter(name, lora)
            result = set_peft_model_state_dict(self.model, state, adapter_name=name)
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
            if bad:
                self.model.delete_adapter(name)
                raise VersionError(f"v{version}: adapter does not fit the base model ({bad[:3]})")
            self.model.eval()
        self._loaded[version] = kind
        self._forget_old()
        log.info("loaded v%d (%s) from %s", version, kind, path)

    def _forget_old(self) -> None:
        """Keep the few newest versions in memory (plus the active one and the base)."""
        keep = {0, self.active_version} | set(sorted(self._loaded)[-MAX_LOADED_VERSIONS:])
        for v in [v for v in self._loaded if v not in keep]:
            kind = self._loaded.pop(v)
            if kind == "full":
                self._full_models.pop(v, None)
            elif kind == "lora":
                self.model.delete_adapter(f"v{v}")

    def activate(self, version: int) -> None:
        """New batches use ``version`` (it must be installed); running batches finish as they are."""
        if version not in self._loaded:
            raise VersionError(f"version {version} is not loaded; install it first")
        self.active_version = version

    def close(self) -> None:
        self._jobs.put(None)


def _settle(fut: asyncio.Future, result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def read_verified_version(path: Path, sha256: str) -> tuple[str, dict]:
    """Read a version folder, check the weights' sha256 against the registry, parse them."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise VersionError(f"{path}: meta.json is missing")
    try:
        meta = json.loads(meta_path.read_text())
        kind, weights_file = meta["kind"], meta["weights_file"]
    except (ValueError, KeyError) as e:
        raise VersionError(f"{path}: meta.json is unreadable ({e})") from None
    weights = path / weights_file
    if not weights.is_file():
        raise VersionError(f"{path}: {weights_file} is missing")
    data = weights.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256 or meta.get("sha256") not in (None, sha256):
        raise VersionError(f"{path}: sha256 mismatch (registry {sha256[:12]}…, file {got[:12]}…); refusing it")
    try:
        state = load_safetensors_bytes(data)
    except Exception as e:  # noqa: BLE001 - any parse failure means a corrupt file
        raise VersionError(f"{path}: {weights_file} is not valid safetensors ({e})") from None
    return kind, state
