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
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import GenerationConfig

from bot import process, versions
from bot.policy_types import Busy, Generation, Turn, VersionError


log = logging.getLogger(__name__)
MAX_LOADED_VERSIONS = 3   # active + previous + one being swapped in


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

        process.set_torch_threads(cfg.model.threads)
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
        files = await asyncio.to_thread(versions.read_verified, Path(path), sha256)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def task():
            try:
                self._install(version, files)
                loop.call_soon_threadsafe(_settle, fut, None)
            except Exception as e:  # noqa: BLE001
                loop.call_soon_threadsafe(_settle, fut, e)

        self._jobs.put(task)
        await fut

    def _install(self, version: int, files: versions.VersionFiles) -> None:
        """Load a verified version beside the others (worker thread, between batches)."""
        label = f"v{version}"
        if files.kind == "full":
            model = type(self.base)(self.base.config).to(next(self.base.parameters()).dtype)
            versions.load_full_weights(model, files.state, label)
            self._full_models[version] = model.eval()
        else:
            self.model = versions.add_adapter(self.model, files, label, label).eval()
        self._loaded[version] = files.kind
        self._forget_old()
        log.info("loaded v%d (%s) from %s", version, files.kind, files.path)

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
