"""The model at serving time.

- ``build_prompt`` renders the chat template and cuts old context to the token budget.
- ``generate`` queues a request; worker threads ("lanes") take up to ``batch_size``
  waiting requests at once and sample them together on the serving engine. The event loop
  never runs the model. Past ``queue_size`` waiting requests, ``generate`` raises ``Busy``.
- The engine is CTranslate2 int8 (``bot/ct2_engine.py``, several lanes side by side) where
  it can run the model, else transformers on torch (``bot/torch_engine.py``, one lane), the
  reference path. ``serving.engine`` picks; a failure to start the fast one falls back.
- ``generate(turns, on_partial=f)`` streams: ``f(text_so_far)`` is called on the event
  loop as tokens arrive, so adapters can show the reply while it is written.
- Each batch is pinned to the version that is active when the batch starts; the
  version is recorded with every reply, so a swap never mixes versions inside a reply.
- ``install_version`` verifies a published version (``versions.read_verified``: inside the
  versions folder, sizes, sha256 of the weights file, JSON shapes, finite weights) and loads
  it beside the current ones in a worker, between batches (a misfit leaves nothing loaded);
  ``activate`` then points new batches at it. Version 0 is the base model.

Logprobs: for every sampled token we record log softmax(logits / temperature) at that
token under the engine that sampled it, i.e. the tempered distribution the sample came
from, before top-p truncation. The trainer recomputes it with a forward pass.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bot import process, versions
from bot.policy_types import Busy, Generation, Turn, VersionError
from bot.torch_engine import TorchEngine


log = logging.getLogger(__name__)
MAX_LOADED_VERSIONS = 3   # active + previous + one being swapped in
GATHER_SECONDS = 0.005    # a lane waits this long for requests arriving together before it starts


ZERO_WIDTH = "\u200b"


def special_strings(tokenizer) -> list[str]:
    """The texts the tokenizer turns into control tokens (``<|im_start|>``, ``<|endoftext|>``, ...),
    longest first."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    return sorted((s for s in found if s), key=len, reverse=True)


def defang(text: str, specials: list[str]) -> str:
    """``text`` with every control-token string broken by a zero-width space after its first
    character: it reads the same, and encodes as plain text instead of a control token."""
    for s in specials:
        if s in text:
            text = text.replace(s, s[0] + ZERO_WIDTH + s[1:])
    return text


def render_turns(tokenizer, system_prompt: str, turns: list[Turn], specials: list[str] | None = None) -> list[int]:
    """Prompt ids for ``turns``: the chat template over exactly the turns the bot built.
    What people wrote (text and display names) can never become a control token, so nobody
    can open a system turn or end theirs by typing ``<|im_start|>system``."""
    specials = special_strings(tokenizer) if specials is None else specials
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for t in turns:
        text = defang(t.text, specials)
        content = f"{defang(t.name, specials)}: {text}" if t.name and t.role == "user" else text
        messages.append({"role": t.role, "content": content})
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(rendered, add_special_tokens=False)


@dataclass
class _Job:
    prompt_ids: list[int]
    done: Callable[[Any], None]    # called in the worker with a Generation or an Exception
    partial: Callable[[list[int]], None] | None = None   # called in the worker with the ids so far


class Policy:
    def __init__(self, model, tokenizer, *, temperature: float = 0.8, top_p: float = 0.95,
                 max_new_tokens: int = 96, system_prompt: str = "", max_context_tokens: int = 512,
                 queue_size: int = 16, batch_size: int = 8, engine: str = "torch", work_dir: Path | None = None,
                 cache_dir: Path | None = None, versions_dir: Path | None = None):
        """``versions_dir``: where published versions live; a registry path elsewhere is refused."""
        self.base = model.eval()
        self.versions_dir = Path(versions_dir) if versions_dir is not None else None
        self.max_version_bytes = versions.max_weights_bytes(model)   # a bigger weights file is refused unread
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.system_prompt = system_prompt
        self._specials = special_strings(tokenizer)   # once: build_prompt renders several times per reply
        self.max_context_tokens = max_context_tokens
        self.queue_size, self.batch_size = queue_size, batch_size
        self.active_version = 0
        self.engine = self._start_engine(engine, work_dir, cache_dir)
        if not isinstance(self.engine, TorchEngine):
            self.base = None               # the fast engine keeps only its int8 copies (bot/ct2_engine.py)
        self._loaded: dict[int, str] = {0: "base"}   # version → "base" | "lora" | "full"
        self._jobs: queue.Queue = queue.Queue()
        self._waiting = 0
        self._closed = False
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, name=f"policy-lane-{i}", daemon=True)
                         for i in range(self.engine.lanes)]
        for w in self._workers:
            w.start()
        atexit.register(_close_at_exit, weakref.ref(self))   # let running batches finish first

    def _start_engine(self, name: str, work_dir: Path | None, cache_dir: Path | None):
        """The fast engine when asked for and able to run here, else the torch reference."""
        if name == "ctranslate2":
            from bot import ct2_engine

            why = ct2_engine.available()
            if not why:
                try:
                    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="reactlearn-serving-"))
                    return ct2_engine.CT2Engine(self.base, self.tokenizer, temperature=self.temperature,
                                                work_dir=work_dir, cache_dir=cache_dir)
                except Exception as e:  # noqa: BLE001 - an architecture it can't convert, a full disk, ...
                    why = f"{type(e).__name__}: {e}"
            log.warning("serving engine ctranslate2 unavailable (%s); using torch", why)
        return TorchEngine(self.base, self.tokenizer)

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
                   queue_size=cfg.serving.queue_size, batch_size=cfg.serving.batch_size, engine=cfg.serving.engine,
                   work_dir=Path(cfg.data_dir).expanduser() / "serving",
                   cache_dir=Path(cfg.model.cache_dir).expanduser() / "ctranslate2", versions_dir=cfg.versions_dir)

    # -- prompts --------------------------------------------------------------

    def _render(self, turns: list[Turn]) -> list[int]:
        return render_turns(self.tokenizer, self.system_prompt, turns, self._specials)

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

    async def generate(self, turns: list[Turn], on_partial: Callable[[str], None] | None = None) -> Generation:
        """Sample a reply. ``on_partial(text_so_far)`` is called on the event loop as it grows."""
        return (await self.generate_many([self.build_prompt(turns)], on_partial))[0]

    async def generate_many(self, prompts: list[list[int]],
                            on_partial: Callable[[str], None] | None = None) -> list[Generation]:
        """Sample one reply per prompt (token ids). Raises Busy if they don't all fit in the queue,
        RuntimeError once the policy is closed (its lanes are gone: a request would wait forever)."""
        loop = asyncio.get_running_loop()
        futures = []
        with self._lock:        # with close(): no request is queued behind the lanes' stop
            if self._closed:
                raise RuntimeError("the policy is closed; it generates no more replies")
            if self._waiting + len(prompts) > self.queue_size:
                raise Busy(f"{self._waiting} replies are already waiting")
            self._waiting += len(prompts)
            for ids in prompts:
                fut = loop.create_future()

                def done(result, fut=fut):
                    loop.call_soon_threadsafe(_settle, fut, result)

                futures.append(fut)
                self._jobs.put(_Job(list(ids), done, self._partial_sender(loop, on_partial)))
        return list(await asyncio.gather(*futures))

    def seed(self, value: int) -> None:
        """Seed the engine's sampling (the simulation's --seed). Replies are reproducible when
        the same requests form the same batches."""
        self.engine.seed(value)

    @property
    def waiting(self) -> int:
        """Requests queued and not yet taken into a batch."""
        return self._waiting

    def pause(self) -> threading.Event:
        """Park every lane until the returned event is set, so that the requests queued
        meanwhile form full batches (the simulation asks a whole round at once)."""
        release = threading.Event()
        for _ in range(self.engine.lanes):
            self._jobs.put(lambda: release.wait(timeout=120))
        return release

    def _partial_sender(self, loop, on_partial):
        """A worker-side callback that decodes the ids so far and hands new text to the loop."""
        if on_partial is None:
            return None
        last = [""]

        def partial(ids: list[int]) -> None:
            text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
            if text and text != last[0]:
                last[0] = text
                loop.call_soon_threadsafe(on_partial, text)
        return partial

    def _run(self) -> None:
        """A lane: take jobs, generate in batches, install versions between batches."""
        while True:
            job = self._jobs.get()
            if job is None:
                self._jobs.put(None)       # let the other lanes see it too
                return
            if callable(job):              # an install task queued by install_version
                job()
                continue
            batch = self._fill_batch(job)
            try:
                results = self._generate_batch(batch, self.active_version)
            except Exception as e:  # noqa: BLE001 - every waiting reply must get an answer
                # each request's caller gets the exception and logs it (bot/chat.py: once per message)
                log.debug("generation failed for a batch of %d", len(batch), exc_info=True)
                results = [e] * len(batch)
            for j, r in zip(batch, results):
                j.done(r)

    def _fill_batch(self, job: _Job) -> list[_Job]:
        """``job`` and the requests waiting behind it, up to ``batch_size``. With several lanes
        a lane takes its share of what waits (16 arriving together: 8 and 8, not 1 and 15)."""
        if self.engine.lanes > 1:
            time.sleep(GATHER_SECONDS)     # requests that arrive together get batched together
        limit = self.batch_size
        if self.engine.lanes > 1:
            limit = min(limit, max(1, -(-(self._jobs.qsize() + 1) // self.engine.lanes)))
        batch = [job]
        while len(batch) < limit:
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
        return batch

    def _generate_batch(self, batch: list[_Job], version: int) -> list[Generation]:
        start = time.perf_counter()

        def on_step(row: int, ids: list[int]) -> None:
            if batch[row].partial is not None:
                batch[row].partial(ids)

        sampled = self.engine.sample([j.prompt_ids for j in batch], version, temperature=self.temperature,
                                     top_p=self.top_p, max_new_tokens=self.max_new_tokens, on_step=on_step)
        seconds = time.perf_counter() - start
        return [Generation(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                           prompt_ids=list(j.prompt_ids), output_ids=ids, logprobs=logps, version=version,
                           temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                           seconds=seconds)
                for j, (ids, logps) in zip(batch, sampled)]

    # -- versions -------------------------------------------------------------

    def is_loaded(self, version: int) -> bool:
        return version in self._loaded

    async def install_version(self, version: int, path: str | Path, sha256: str) -> None:
        """Verify and load a published version beside the current ones. Raises VersionError for
        anything wrong with the folder (``versions.read_verified``, then the fit to the base
        while it is applied); the versions already loaded stay as they were. RuntimeError once
        the policy is closed (as ``generate_many``: no lane would ever run the install)."""
        self._check_open()
        files = await asyncio.to_thread(versions.read_verified, Path(path), sha256, version=version,
                                        root=self.versions_dir, max_bytes=self.max_version_bytes)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def task():
            try:
                self._install(version, files)
                loop.call_soon_threadsafe(_settle, fut, None)
            except Exception as e:  # noqa: BLE001
                loop.call_soon_threadsafe(_settle, fut, e)

        with self._lock:        # with close(): no install is queued behind the lanes' stop
            self._check_open()
            self._jobs.put(task)
        await fut

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("the policy is closed; it installs no more versions")

    def _install(self, version: int, files: versions.VersionFiles) -> None:
        """Load a verified version beside the others (in a lane, between batches)."""
        self.engine.install(version, files)
        self._loaded[version] = files.kind
        self._forget_old()
        log.info("loaded v%d (%s) from %s", version, files.kind, files.path)

    def _forget_old(self) -> None:
        """Keep the few newest versions in memory (plus the active one and the base)."""
        keep = {0, self.active_version} | set(sorted(self._loaded)[-MAX_LOADED_VERSIONS:])
        for v in [v for v in self._loaded if v not in keep]:
            self._loaded.pop(v)
            self.engine.forget(v)

    def activate(self, version: int) -> None:
        """New batches use ``version`` (it must be installed); running batches finish as they are."""
        if version not in self._loaded:
            raise VersionError(f"version {version} is not loaded; install it first")
        self.active_version = version

    def close(self, timeout: float = 60.0) -> None:
        """Stop the lanes once the batches they are running finish, then release the engine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        for w in self._workers:
            if w is not threading.current_thread():
                w.join(timeout)
        self.engine.close()


def _settle(fut: asyncio.Future, result: Any) -> None:
    if fut.done():
        return
    if isinstance(result, BaseException):
        fut.set_exception(result)
    else:
        fut.set_result(result)


def _close_at_exit(ref) -> None:
    policy = ref()
    if policy is not None:
        policy.close(timeout=30.0)
