"""The platform-free chat core: when to reply, context, recording, reactions, commands.

Adapters translate platform events into ``bot.events`` payloads and call:

    reply_id = await core.on_message(msg, history, send)   # send(text) -> [platform ids]
    reply_id = await core.on_message(msg, history, send, stream)   # shown as it is written
    outcome  = await core.on_reaction(reaction)
    result   = await core.on_command(command)
    await core.run_background({"discord": post})            # hot-swap + posting train results

A reply is written to the store before it is sent, so a crash while sending loses
nothing the trainer needs; the platform ids are linked once the send returns.

Streaming: with a ``ReplyStream`` the person sees the reply while it is written. The policy's
``on_partial`` only remembers the newest text; a pacing task (``Pacer``) shows the first text
at once (``stream.start``) and then the newest text at most every ``stream.min_interval``
seconds (``stream.update``). When generation ends the reply row is stored, then
``stream.finish(final text)`` delivers it and its platform ids are linked. A failed start or
update is logged once and ends the streaming of that reply; a failed finish falls back to
``send``. Either way the person gets the final text, stored and linked.

The core knows no platform: what differs between Discord, Slack and the console arrives in
the payloads (``Message.mentions_bot``, ``Message.rate_limited``, ``Command.prefix``,
``Command.is_platform_admin``), set by the adapter that owns the rule. It imports no torch:
the policy is handed in (``bot.policy_types.PolicyLike``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Awaitable, Callable

from bot.config import Config
from bot.events import Command, CommandResult, HistoryItem, Message, Reaction
from bot.policy_types import Busy, Generation, PolicyLike, Turn, VersionError
from bot.rewards import RewardMap, canonical
from bot.store import Store
from bot.streaming import Pacer, ReplyStream

log = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[list[str]]]
Post = Callable[[str, str], Awaitable[None]]      # (channel_id, text)

BUSY_TEXT = "I'm busy with other replies right now; please try again in a moment."
ERROR_TEXT = "Sorry, something went wrong while I was thinking. Please try again."
EMPTY_TEXT = "…"
ADMIN_COMMANDS = {"retrain", "rollback"}
POST_TRIES = 5            # a trainer result that can't be posted (the channel is gone) is given up after this


class ChatCore:
    def __init__(self, cfg: Config, store: Store, policy: PolicyLike, metrics=None):
        self.cfg = cfg
        self.store = store
        self.policy = policy
        self.metrics = metrics    # optional: .observe_reply(platform, seconds) for each reply sent (bot/health.py)
        self.rewards = RewardMap(cfg.rewards.emoji)
        self._recent: dict[tuple[str, str], deque] = defaultdict(deque)   # rate limit windows
        self._noticed: dict[tuple[str, str], float] = {}                   # when each person was last told
        self._post_tries: dict[int, int] = {}                               # train request → failed posts
        self._failed: dict[int, str] = {}     # version → sha256 that failed to load (not retried)
        self.serving_error = ""

    # -- messages -------------------------------------------------------------

    def wants_reply(self, msg: Message) -> bool:
        if msg.author_is_bot:
            return False
        if msg.mentions_bot or msg.replies_to_bot:
            return True
        if msg.is_dm:
            return self.cfg.chat.reply_in_dms
        return msg.channel_id in {str(c) for c in self.cfg.chat.channels}

    def _rate_limited(self, msg: Message) -> bool:
        limit = self.cfg.chat.rate_limit_per_minute
        if limit <= 0 or not msg.rate_limited:
            return False
        window, now = self._recent[(msg.platform, msg.author_id)], time.monotonic()
        while window and now - window[0] > 60:
            window.popleft()
        if len(window) >= limit:
            return True
        window.append(now)
        return False

    def _first_notice(self, msg: Message) -> bool:
        """True for the first over-limit message of a person in a 60 s window."""
        key, now = (msg.platform, msg.author_id), time.monotonic()
        if now - self._noticed.get(key, -60.0) < 60:
            return False
        self._noticed[key] = now
        return True

    def turns(self, msg: Message, history: list[HistoryItem]) -> list[Turn]:
        """The conversation the model sees: recent history, then the message, newest last."""
        keep = history[-self.cfg.chat.history_messages:] if self.cfg.chat.history_messages else []
        turns = [Turn("assistant", h.text) if h.from_bot else Turn("user", self._clip(h.text), h.author_name)
                 for h in keep]
        return turns + [Turn("user", self._clip(msg.text), msg.author_name)]

    def _clip(self, text: str) -> str:
        limit = self.cfg.chat.max_message_chars
        return text if len(text) <= limit else text[-limit:]

    async def on_message(self, msg: Message, history: list[HistoryItem], send: Send,
                         stream: ReplyStream | None = None) -> int | None:
        """Answer ``msg`` if it is addressed to the bot. Returns the reply id, or None.

        Notices (rate limit, busy, error) go through ``send``; the reply too without a
        ``stream``, else it is shown on ``stream`` while it is written (see the module doc)."""
        if not self.wants_reply(msg):
            return None
        if self._rate_limited(msg):
            if self._first_notice(msg):      # one notice per window: a flood gets no flood of notices
                log.info("rate limit: %s/%s", msg.platform, msg.author_id)
                await send(f"You're writing faster than I can learn; try again in a minute "
                           f"(limit {self.cfg.chat.rate_limit_per_minute}/min).")
            return None
        started = time.monotonic()
        message_row = await self.store.add_message(msg.platform, msg.message_id, msg.channel_id, msg.author_id,
                                                   msg.author_name, self._clip(msg.text))
        pacer = Pacer(stream) if stream is not None else None
        try:
            gen = await self._generate(self.turns(msg, history), pacer)
        except Busy:
            log.warning("busy: queue full, told %s/%s to retry", msg.platform, msg.author_id)
            await self._notice(BUSY_TEXT, send, pacer)
            return None
        except Exception:  # noqa: BLE001 - a failed generation must still answer the person
            log.exception("generation failed for message %s", msg.message_id)
            await self._notice(ERROR_TEXT, send, pacer)
            return None
        reply_id = await self.store.add_reply(
            msg.platform, msg.channel_id, message_row, gen.version, gen.text, gen.prompt_ids, gen.output_ids,
            gen.logprobs, gen.temperature, gen.top_p, gen.max_new_tokens)
        platform_ids = await self._deliver(gen.text or EMPTY_TEXT, send, pacer)
        if self.metrics is not None:
            self.metrics.observe_reply(msg.platform, time.monotonic() - started)
        for pid in platform_ids:
            await self.store.link_reply_message(reply_id, msg.platform, pid)
        log.info("reply #%d on %s/%s by v%d: %d tokens in %.1fs%s", reply_id, msg.platform, msg.channel_id,
                 gen.version, len(gen.output_ids), gen.seconds, " (streamed)" if pacer and pacer.started else "")
        return reply_id

    async def _generate(self, turns: list[Turn], pacer: Pacer | None) -> Generation:
        if pacer is None:
            return await self.policy.generate(turns)
        pacer.open()
        try:
            return await self.policy.generate(turns, on_partial=pacer.on_partial)
        finally:
            await pacer.close()

    async def _deliver(self, text: str, send: Send, pacer: Pacer | None) -> list[str]:
        """The final text through the stream (or ``send`` without one, or when finish fails)."""
        if pacer is None:
            return await send(text)
        try:
            return await pacer.stream.finish(text)
        except Exception:  # noqa: BLE001 - never lose the reply: post it afresh
            log.warning("finishing a streamed reply failed; sending it afresh", exc_info=True)
            return await send(text)

    async def _notice(self, text: str, send: Send, pacer: Pacer | None) -> None:
        """A notice replaces the text shown so far, if any; else it is sent."""
        await self._deliver(text, send, pacer if pacer is not None and pacer.started else None)

    # -- reactions ------------------------------------------------------------

    async def on_reaction(self, r: Reaction) -> str:
        """Record or remove a vote. Returns what happened (for logs and tests)."""
        if r.user_is_bot:
            return "ignored: reaction by a bot"
        value = self.rewards.value(r.emoji)
        if value is None:
            return "ignored: not a voting emoji"
        reply_id = await self.store.reply_for_message(r.platform, r.message_id)
        if reply_id is None:
            return "ignored: not one of the bot's replies"
        return await self.vote(reply_id, r.user_id, r.emoji, value if r.added else None)

    async def vote(self, reply_id: int, user_id: str, emoji: str, value: float | None) -> str:
        """Set (value) or remove (None) one user's emoji on a reply."""
        emoji = canonical(emoji)
        if value is None:
            if not await self.store.remove_vote(reply_id, user_id, emoji):
                return "ignored: no such vote"
            log.info("vote removed: reply #%d user %s %s", reply_id, user_id, emoji)
            return "removed"
        await self.store.set_vote(reply_id, user_id, emoji, value)
        log.info("vote: reply #%d user %s %s (%+.1f)", reply_id, user_id, emoji, value)
        return "added"

    async def vote_by_id(self, reply_id: int, user_id: str, emoji: str, added: bool = True) -> str:
        """A vote on a reply named by its id (the console's /up 12), not by a platform message."""
        if await self.store.get_reply(reply_id) is None:
            return f"ignored: there is no reply #{reply_id}"
        value = self.rewards.value(emoji)
        if value is None:
            return "ignored: not a voting emoji"
        return await self.vote(reply_id, user_id, emoji, value if added else None)

    async def is_bot_reply(self, platform: str, platform_message_id: str) -> bool:
        """Is this platform message (a part of) one of the bot's recorded replies?"""
        return await self.store.reply_for_message(platform, platform_message_id) is not None

    def is_voting_emoji(self, emoji: str) -> bool:
        return self.rewards.value(emoji) is not None

    @property
    def seed_emoji(self) -> list[str]:
        """The emoji the adapter puts on each reply so people can vote in one click."""
        return self.rewards.seed_emoji if self.cfg.rewards.seed_reactions else []

    # -- commands -------------------------------------------------------------

    def is_admin(self, c: Command) -> bool:
        chat = self.cfg.chat
        return (c.is_platform_admin or c.user_id in {str(u) for u in chat.admin_user_ids}
                or bool(set(c.role_ids) & {str(r) for r in chat.admin_role_ids}))

    async def on_command(self, c: Command) -> CommandResult:
        admin = self.is_admin(c)
        if c.name in ADMIN_COMMANDS and not admin:
            log.info("refused /%s for non-admin %s/%s", c.name, c.platform, c.user_id)
            return CommandResult(f"Only admins can use {c.typed(c.name)}.", ok=False)
        log.info("command /%s by %s/%s %s", c.name, c.platform, c.user_id, c.args or "")
        if c.name == "retrain":
            rid = await self.store.add_train_request(c.platform, c.channel_id, c.user_id)
            return CommandResult(f"Retrain request #{rid} queued; the trainer will post the result here.", ok=True)
        if c.name == "status":
            text, chart = await self.status_text(), await self.status_chart()
            return CommandResult(text, ok=True, image=chart)
        if c.name == "rollback":
            return await self.rollback(c.args.get("version"), c)
        if c.name == "forget":
            target = str(c.args.get("user") or c.user_id)
            if target != c.user_id and not admin:
                return CommandResult("You can only forget yourself; admins can forget others.", ok=False)
            return CommandResult(await self.forget(c, target), ok=True)
        return CommandResult(f"Unknown command {c.typed(c.name)}. "
                             f"Try retrain, status, rollback or forget.", ok=False)

    async def forget(self, c: Command, target: str) -> str:
        """Delete ``target``'s data (``Store.forget_user``) and say what went, and which published
        versions were trained on it, with the newest earlier version an admin can roll back to."""
        gone = await self.store.forget_user(c.platform, target)
        log.info("forget: %d messages, %d replies (%d to others), %d votes (%d by others) deleted; "
                 "versions trained on them: %s", gone["messages"], gone["replies"], gone["replies_to_others"],
                 gone["votes"], gone["other_votes"], gone["trained"] or "none")
        text = (f"Forgot user {target}: {gone['messages']} messages, {gone['replies']} replies, "
                f"{gone['votes']} votes deleted.")
        if gone["replies_to_others"]:
            text += (f" {gone['replies_to_others']} of the replies answered other people in channels where they "
                     f"wrote (their words may have been in the context), with {_n(gone['other_votes'], 'vote')} "
                     "on them.")
        if not gone["trained"]:
            return text + " No published version was trained on their data."
        text += f" Versions trained on their data: {_version_list(gone['trained'])}."
        for vid in gone["untouched"]:
            v = await self.store.get_version(vid)
            if v is not None and (v.path is None or Path(v.path).exists()):
                older = "the base model" if vid == 0 else f"v{vid}"
                return text + (f" An admin can {c.typed('rollback')} {vid} to serve {older}, the newest version "
                               "made before their data.")
        return text

    async def rollback(self, version, c: Command) -> CommandResult:
        status = c.typed("status")
        try:
            version = int(version)
        except (TypeError, ValueError):
            return CommandResult(f"Usage: {c.typed('rollback')} VERSION (a number, see {status}).",
                                 ok=False)
        v = await self.store.get_version(version)
        if v is None:
            return CommandResult(f"There is no version {version}.", ok=False)
        if v.status != "published":
            return CommandResult(f"v{version} was rejected ({v.reason}); it can't be activated.", ok=False)
        if v.path and not Path(v.path).exists():
            return CommandResult(f"v{version}'s files were pruned (the trainer keeps the newest "
                                 f"keep_versions on disk); pick a newer one from {status}.", ok=False)
        try:
            await self._load(version, v.path, v.sha256)
        except VersionError as e:
            return CommandResult(f"Can't roll back to v{version}: {e}. Still serving v{self.policy.active_version}.",
                                 ok=False)
        await self.store.activate(version)
        self.policy.activate(version)
        await self.store.set_state("serving_version", str(version))
        log.info("rolled back to v%d", version)
        return CommandResult(f"Rolled back: now serving v{version}.", ok=True)

    async def status_chart(self) -> str | None:
        """Draw /status's chart (bot/chart.py) as ``data_dir/status.png``; its path, or None
        when it cannot be drawn (logged: the text answer goes out regardless)."""
        from bot.chart import draw_status_chart

        s = self.store
        path = Path(self.cfg.data_dir).expanduser() / "status.png"
        try:
            await asyncio.to_thread(draw_status_chart, await s.versions(), await s.rating_by_version(),
                                    await s.active_version(), path)
        except Exception:  # noqa: BLE001 - a picture must never cost the answer
            log.exception("could not draw the status chart")
            return None
        return str(path)

    async def status_text(self, n_versions: int = 5) -> str:
        s = self.store
        counts = await s.counts()
        active = await s.active_version()
        ratings = await s.rating_by_version()
        versions = await s.versions()
        waiting = await s.count_rated_since(await s.last_trained_reply_id(), time.time())
        beat = await s.get_state("trainer_heartbeat")
        age = f"{time.time() - float(beat):.0f}s ago" if beat else "never"
        lines = [f"Active version: v{active} (serving v{self.policy.active_version})"]
        if self.serving_error:
            lines.append(f"Refused checkpoint: {self.serving_error}")
        lines.append(f"Replies: {counts['replies']}, votes: {counts['votes']}, rated replies: {counts['rated']}")
        previous = max([v.id for v in versions if v.status == "published" and v.id < active], default=None)
        for label, v in (("active", active), ("previous", previous)):
            if v is not None:
                n, rate = ratings.get(v, (0, None))
                lines.append(f"Like-rate of {label} v{v}: " + (f"{rate:.0%} of {n} rated" if n else "no votes yet"))
        lines.append(f"Rated replies waiting for the next round: {waiting}")
        rounds = await s.rounds()
        if rounds:
            last = rounds[-1]
            lines.append(f"Last round: {last['status']}" + (f" ({last['reason']})" if last["reason"] else ""))
        lines.append(f"Trainer heartbeat: {age}")
        lines.append("Versions (newest first):")
        for v in versions[::-1][:n_versions]:
            n, rate = ratings.get(v.id, (0, None))
            liked = f"liked {rate:.0%} of {n}" if n else "no votes"
            what = f"rejected: {v.reason}" if v.status == "rejected" else liked
            lines.append(f"  v{v.id}{' (active)' if v.id == active else ''}: {what}")
        return "\n".join(lines)

    # -- background: hot-swap and trainer results ------------------------------

    async def _load(self, version: int, path: str | None, sha256: str | None) -> None:
        if self.policy.is_loaded(version):
            return
        if not path or not sha256:
            raise VersionError(f"v{version} has no files in the registry")
        await self.policy.install_version(version, path, sha256)

    async def sync_version(self) -> None:
        """Follow the registry's active version; refuse (and remember) broken checkpoints."""
        active = await self.store.active_version()
        if active == self.policy.active_version:
            return
        v = await self.store.get_version(active)
        if v is None or self._failed.get(active) == (v.sha256 or ""):
            return
        try:
            await self._load(active, v.path, v.sha256)
        except VersionError as e:
            self._failed[active] = v.sha256 or ""
            self.serving_error = f"v{active}: {e}"
            log.error("refused v%d, still serving v%d: %s", active, self.policy.active_version, e)
            await self.store.set_state("serving_error", self.serving_error)
            await self._fall_back(active)
            return
        self.policy.activate(active)
        self.serving_error = ""
        await self.store.set_state("serving_version", str(active))
        await self.store.set_state("serving_error", "")
        log.info("hot-swapped to v%d", active)

    async def _fall_back(self, broken: int) -> None:
        """At start (only the base serves yet): serve the newest published version older than
        the broken active one that loads, instead of the base. The registry is left as it is."""
        if self.policy.active_version != 0:
            return
        for v in sorted(await self.store.versions(), key=lambda v: -v.id):
            if not 0 < v.id < broken or v.status != "published" or not v.path:
                continue
            try:
                await self._load(v.id, v.path, v.sha256)
            except VersionError as e:
                log.warning("v%d does not load either: %s", v.id, e)
                continue
            self.policy.activate(v.id)
            await self.store.set_state("serving_version", str(v.id))
            log.warning("serving v%d, the newest version that loads, instead of the broken v%d", v.id, broken)
            return

    async def post_results(self, posters: dict[str, Post]) -> int:
        """Post finished train requests back where they were asked; one that fails POST_TRIES
        times is given up (marked notified, with an error in the log). Returns how many ended."""
        n = 0
        for req in await self.store.unnotified_results():
            post = posters.get(req["platform"])
            if post is None:
                continue
            try:
                what = "Auto-rollback" if req["requested_by"] == "auto-rollback" else f"Retrain #{req['id']}"
                await post(req["channel_id"], f"{what}: {req['result']}")
            except Exception:  # noqa: BLE001 - try again next poll, a few times
                tries = self._post_tries[req["id"]] = self._post_tries.get(req["id"], 0) + 1
                if tries < POST_TRIES:
                    log.warning("could not post result of request #%d (try %d of %d)", req["id"], tries,
                                POST_TRIES, exc_info=True)
                    continue
                log.error("giving up posting result of request #%d to %s/%s after %d tries", req["id"],
                          req["platform"], req["channel_id"], tries)
            await self.store.mark_notified(req["id"])
            n += 1
        return n

    async def run_background(self, posters: dict[str, Post]) -> None:
        """Forever: every poll interval, hot-swap if needed and post trainer results."""
        while True:
            try:
                await self.sync_version()
                await self.post_results(posters)
            except Exception:  # noqa: BLE001 - keep polling; the next tick may succeed
                log.exception("background poll failed")
            await asyncio.sleep(self.cfg.serving.poll_seconds)


def _version_list(ids: list[int], most: int = 8) -> str:
    """``[3, 4]`` → "v3, v4"; a long list keeps its ends: "v3, v4, v5, … v40, v41 (20 versions)"."""
    names = [f"v{i}" for i in ids]
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:3])}, … {', '.join(names[-2:])} ({len(names)} versions)"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
