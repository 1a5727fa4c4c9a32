"""Workloads the benchmarks share: simulated people, the plain baselines, LoRA versions, a lag probe.

- :class:`People`: N people, each sends a message through the real ``ChatCore.on_message``,
  waits for the reply, sends the next; every outcome is recorded (:class:`Outcome`). With
  ``stream`` they pass the core a :class:`BenchStream` and the first text is timed too.
- :class:`Plain` (:func:`load_plain`, :func:`plain_generate`): plain transformers
  ``model.generate`` in float32 on the same model folder, forced to exactly ``new_tokens``
  tokens, first token timed with a streamer (the baseline beside the product's numbers).
- :func:`prepare_versions`: LoRA version folders written the way the trainer writes them
  (``trainer.publish.stage`` + ``commit`` of a ``Learner.candidate``), not yet registered;
  :func:`register` then does what the trainer's publish does last: one registry row, active.
- :class:`LagProbe`: a task that sleeps 10 ms in a loop and records how late it wakes.
- :func:`queue_depth` / :class:`DepthMonitor`: how many replies wait in the policy's queue.

torch, transformers and peft are imported inside the functions that need them.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench import common
from bot.chat import BUSY_TEXT, ERROR_TEXT
from bot.events import Message

PLATFORM = "bench"


# -- simulated people ---------------------------------------------------------------------

@dataclass
class Outcome:
    person: int
    started: float                 # perf_counter when on_message was called
    sent: float | None             # when the reply (or a notice) was delivered: send, or stream.finish
    finished: float                # when on_message returned
    kind: str                      # "reply" | "busy" | "error" | "none" | "exception"
    reply_id: int | None = None
    detail: str = ""
    first_text: float | None = None   # streaming only: when stream.start showed the first text
    updates: int = 0                  # streaming only: stream.update calls

    @property
    def latency(self) -> float:
        return (self.sent or self.finished) - self.started

    @property
    def first_text_latency(self) -> float | None:
        return None if self.first_text is None else self.first_text - self.started


class BenchStream:
    """A ReplyStream (bot/chat.py) that shows nothing and notes when each call came."""

    def __init__(self, min_interval: float, ids: list[str]):
        self.min_interval = min_interval
        self.ids = ids
        self.first: float | None = None
        self.final: float | None = None
        self.text: str | None = None
        self.updates = 0

    async def start(self, text: str) -> None:
        self.first = time.perf_counter()

    async def update(self, text: str) -> None:
        self.updates += 1

    async def finish(self, text: str) -> list[str]:
        self.final, self.text = time.perf_counter(), text
        return self.ids


def where(e: BaseException) -> str:
    """``repr(e)`` and the project's innermost frames it passed through (bot/, trainer/)."""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if "/bot/" in f.filename or "/trainer/" in f.filename]
    at = " <- ".join(f"{Path(f.filename).parent.name}/{Path(f.filename).name}:{f.lineno} {f.name}"
                     for f in frames[::-1][:3])
    return f"{e!r} at {at}" if at else repr(e)


def core_streams(core) -> bool:
    """Does this checkout's ChatCore.on_message take a ``stream``?"""
    return "stream" in inspect.signature(core.on_message).parameters


class People:
    """``n`` people talking to ``core`` until :meth:`stop`; one message in flight each.

    ``stream``: None sends replies whole (``send``); a number passes a :class:`BenchStream`
    with that ``min_interval`` (the core must take ``stream``)."""

    def __init__(self, core, n: int, tag: str = "p", stream: float | None = None):
        if stream is not None and not core_streams(core):
            raise SystemExit("--stream: this checkout's ChatCore.on_message takes no stream")
        self.core, self.n, self.tag, self.stream = core, n, tag, stream
        self.outcomes: list[Outcome] = []
        self._prompts = common.prompts()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> "People":
        self._tasks = [asyncio.create_task(self._person(i)) for i in range(self.n)]
        return self

    async def stop(self) -> None:
        """No new messages; wait for the ones in flight."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _person(self, i: int) -> None:
        k = 0
        while not self._stop.is_set():
            k += 1
            text = self._prompts[(i * 37 + k) % len(self._prompts)]
            msg = Message(PLATFORM, f"{self.tag}-m{i}-{k}", f"{self.tag}-c{i}", f"u{i}", f"Person{i}", text,
                          mentions_bot=True, rate_limited=False)
            self.outcomes.append(await self._one(i, k, msg))

    async def _one(self, i: int, k: int, msg: Message) -> Outcome:
        first: dict = {}
        parts = 0

        async def send(text: str) -> list[str]:
            nonlocal parts
            parts += 1
            first.setdefault("t", time.perf_counter())
            first.setdefault("text", text)
            return [f"{self.tag}-r{i}-{k}-{parts}"]

        stream = None if self.stream is None else BenchStream(self.stream, [f"{self.tag}-s{i}-{k}"])
        extra = {} if stream is None else {"stream": stream}
        t0 = time.perf_counter()
        try:
            rid = await self.core.on_message(msg, [], send, **extra)
        except Exception as e:  # noqa: BLE001 - a benchmark counts failures, it does not stop on them
            return Outcome(i, t0, first.get("t"), time.perf_counter(), "exception", None, where(e))
        done = time.perf_counter()
        sent, text = first.get("t"), first.get("text")
        if stream is not None and stream.final is not None and (sent is None or stream.final < sent):
            sent, text = stream.final, stream.text
        streamed = {} if stream is None else {"first_text": stream.first, "updates": stream.updates}
        if rid is not None:
            return Outcome(i, t0, sent, done, "reply", rid, **streamed)
        kind = "busy" if text == BUSY_TEXT else "error" if text == ERROR_TEXT else "none"
        return Outcome(i, t0, sent, done, kind, None, text or "", **streamed)

    def count(self, kind: str, since: float = 0.0, until: float = float("inf")) -> int:
        return sum(1 for o in self.outcomes if o.kind == kind and since <= o.started < until)


async def reply_rows(store, outcomes: list[Outcome]) -> dict[int, tuple[int, int]]:
    """reply id → (version, output tokens) from the store, for the outcomes that are replies."""
    rows = {}
    for o in outcomes:
        if o.reply_id is not None:
            r = await store.get_reply(o.reply_id)
            rows[o.reply_id] = (r.version, len(r.output_ids))
    return rows


def queue_depth(policy) -> int | None:
    """Replies waiting in the policy's queue: a public ``waiting`` (attribute or method) when
    the policy has one, else the private ``_waiting`` counter; None when neither exists."""
    w = getattr(policy, "waiting", None)
    if w is None:
        w = getattr(policy, "_waiting", None)
    if callable(w):
        w = w()
    return int(w) if w is not None else None


class DepthMonitor:
    """Samples :func:`queue_depth` every ``interval`` seconds; ``max`` is the deepest seen."""

    def __init__(self, policy, interval: float = 0.005):
        self.policy, self.interval, self.max, self.available = policy, interval, 0, queue_depth(policy) is not None
        self._task: asyncio.Task | None = None

    def start(self) -> "DepthMonitor":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            d = queue_depth(self.policy)
            if d is not None:
                self.max = max(self.max, d)
            await asyncio.sleep(self.interval)

    async def stop(self) -> int | None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.max if self.available else None


# -- the plain baseline ----------------------------------------------------------------------

def load_plain(cfg):
    """(model, tokenizer) straight from transformers in float32, from the folder the product uses."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bot.models import resolve_model

    path = resolve_model(cfg.model.name, Path(cfg.model.cache_dir).expanduser())
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


@contextmanager
def torch_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)`` in this thread, then put it back."""
    import torch

    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != old:
            torch.set_num_threads(old)


class Plain:
    """The plain baseline: the model from :func:`load_plain`, generating with the torch thread
    count this process had when it was loaded. Load it *before* the policy: a serving engine
    may change the process's thread settings (CTranslate2 leaves the main thread at 1), and
    the baseline should not pay for that."""

    def __init__(self, cfg):
        import torch

        self.threads = torch.get_num_threads()
        t0 = time.perf_counter()
        self.model, self.tok = load_plain(cfg)
        self.load_s = time.perf_counter() - t0

    def generate(self, prompts: list[list[int]], *, temperature: float, top_p: float, new_tokens: int,
                 first_token: bool = True) -> dict:
        with torch_threads(self.threads):
            return plain_generate(self.model, self.tok, prompts, temperature=temperature, top_p=top_p,
                                  new_tokens=new_tokens, first_token=first_token)


def first_token_streamer():
    """A transformers streamer (``BaseStreamer``) that only notes when the first generated token
    arrives: generate first ``put``s the prompt, then each step's new tokens. ``.first`` is
    the perf_counter of that second ``put``."""
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.puts = 0
            self.first: float | None = None

        def put(self, value) -> None:
            self.puts += 1
            if self.puts == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    return FirstToken()


def plain_generate(model, tok, prompts: list[list[int]], *, temperature: float, top_p: float,
                   new_tokens: int, first_token: bool = True) -> dict:
    """One plain ``model.generate`` of ``prompts`` (token ids, left-padded), exactly ``new_tokens``
    new tokens each. Returns seconds, ttft (seconds to the first token) and tokens."""
    import torch

    from bot.torch_engine import left_pad

    ids, mask = left_pad(prompts, tok.pad_token_id)
    width = ids.shape[1]
    streamer = first_token_streamer() if first_token else None
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature,
                             top_p=top_p, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id, streamer=streamer)
    seconds = time.perf_counter() - t0
    tokens = int(out.shape[0] * (out.shape[1] - width))
    ttft = streamer.first - t0 if streamer is not None and streamer.first is not None else None
    return {"seconds": seconds, "ttft": ttft, "tokens": tokens}


# -- versions ------------------------------------------------------------------------------

@dataclass
class PreparedVersion:
    version: int
    path: str
    sha256: str


def prepare_versions(cfg, n: int, *, first: int = 1, seed: int = 0, noise: float = 1e-3) -> list[PreparedVersion]:
    """``n`` LoRA version folders v{first}.. in ``cfg.versions_dir``, as a round writes them
    (a fresh ``Learner.candidate``, its lora_B set to small seeded noise so each version really
    differs from the base, ``stage`` + ``commit``). Not registered: see :func:`register`."""
    import torch

    from trainer.config import load_trainer_config
    from trainer.learner import Learner
    from trainer.publish import commit, stage
    from bot import versions as bv

    tcfg = load_trainer_config(cfg)
    learner = Learner(cfg, tcfg, progress=False)
    cand = learner.candidate(None, seed)
    learner.base = None                      # only the candidate is needed from here on
    gen = torch.Generator().manual_seed(seed)
    out = []
    for v in range(first, first + n):
        with torch.no_grad():
            for name, p in cand.model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * noise)
        tmp, sha = stage(cfg.versions_dir, v, cand.model, cand.kind, {"bench": True})
        final = cfg.versions_dir / bv.dirname(v)
        commit(tmp, final)
        out.append(PreparedVersion(v, str(final.resolve()), sha))
    return out


async def register(store, pv: PreparedVersion, parent: int | None = None) -> float:
    """Register ``pv`` as published and active in one transaction (the last step of the
    trainer's publish). Returns perf_counter right after the commit: the activation time."""
    await store.add_version(pv.version, pv.version - 1 if parent is None else parent, pv.path, pv.sha256,
                            "published", {"last_reply_id": 0, "bench": True}, activate=True)
    return time.perf_counter()


# -- event-loop lag ------------------------------------------------------------------------

class LagProbe:
    """Sleeps ``interval`` in a loop; records (wake time, how late it woke) in seconds."""

    def __init__(self, interval: float = 0.010):
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> "LagProbe":
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.samples.append((now, max(0.0, now - t - self.interval)))

    def between(self, t0: float, t1: float) -> list[float]:
        return [lag for t, lag in self.samples if t0 <= t <= t1]

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
