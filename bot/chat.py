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

Nothing raises out of ``on_message``, ``on_reaction`` or ``on_command``: a failure to store
or generate is logged once (one record, with its cause) and the person gets a short apology
(``STORE_TEXT``, ``ERROR_TEXT``), then the next message is served as usual. Per-person limits
live in ``bot.limits``: the rate limit (one notice per window) and the reaction-flood guard
(a toggled reaction costs a few writes; its final state is written by ``flush_votes``).

The core knows no platform: what differs between Discord, Slack and the console arrives in
the payloads (``Message.mentions_bot``, ``Message.rate_limited``, ``Command.prefix``,
``Command.is_platform_admin``), set by the adapter that owns the rule. It imports no torch:
the policy is handed in (``bot.policy_types.PolicyLike``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from pathlib import Path
from typing import Awaitable, Callable

from bot.config import Config
from bot.events import Command, CommandResult, HistoryItem, Message, Reaction
from bot.limits import FLOOD_WRITES, STALE, WINDOW, WRITE, RateLimit, VoteFlood
from bot.policy_types import Busy, Generation, PolicyLike, Turn, VersionError
from bot.rewards import RewardMap, canonical
from bot.store import STORE_ERRORS, Store
from bot.streaming import Pacer, ReplyStream

log = logging.getLogger(__name__)

Send = Callable[[str], Awaitable[list[str]]]
Post = Callable[[str, str], Awaitable[None]]      # (channel_id, text)

BUSY_TEXT = "I'm busy with other replies right now; please try again in a moment."
ERROR_TEXT = "Sorry, something went wrong while I was thinking. Please try again."
STORE_TEXT = ("Sorry, I can't save anything right now (my storage is failing), so I can't answer. "
              "The admins can see why in my log; please try again later.")
EMPTY_TEXT = "…"
ADMIN_COMMANDS = {"retrain", "rollback"}
POST_TRIES = 5            # a trainer result that can't be posted (the channel is gone) is given up after this
INSTALL_RETRY_SECONDS = 3600.0   # a version whose install failed for another reason than its folder (a full
                                 # disk, the int8 converter, memory) is tried again after this, not every poll
CHANGES_KEPT_SECONDS = 3600.0    # live vote changes remembered for reconcile_votes (one reply's read takes seconds)


class _Failed(Exception):
    """A step of answering a message failed (the cause is chained); ``text``: what the person
    is told, None when the platform itself refused (telling them would fail the same way)."""

    def __init__(self, stage: str, text: str | None):
        super().__init__(stage)
        self.stage, self.text = stage, text


async def _stage(stage: str, text: str | None, step: Awaitable):
    """Await ``step``; a failure becomes ``_Failed(stage, text)``."""
    try:
        return await step
    except Exception as e:  # noqa: BLE001 - on_message logs it once and tells the person
        raise _Failed(stage, text) from e


class ChatCore:
    def __init__(self, cfg: Config, store: Store, policy: PolicyLike, metrics=None,
                 clock: Callable[[], float] = time.monotonic):
        """``clock``: the monotonic clock of the rate limit, the reaction-flood guard and the
        retry of a version whose install failed."""
        self.cfg = cfg
        self.store = store
        self.policy = policy
        self.metrics = metrics    # optional: .observe_reply(platform, seconds) for each reply sent (bot/health.py)
        self.rewards = RewardMap(cfg.rewards.emoji)
        self.rate_limit = RateLimit(cfg.chat.rate_limit_per_minute, clock)   # per (platform, person)
        self.floods = VoteFlood(clock=clock)                                   # per (reply, user, emoji)
        self._clock = clock
        # reply → (user, emoji) → time.time() of its newest live change: reconcile_votes leaves those alone
        self._changed: dict[int, dict[tuple[str, str], float]] = {}
        self._votes = asyncio.Lock()          # reaction votes are decided and written one at a time, in order
        self._post_tries: dict[int, int] = {}                               # train request → failed posts
        self._posted: set[int] = set()          # train requests posted but not yet marked notified (store outage)
        # version → (sha256 that failed to install, clock time to try again: inf for a VersionError)
        self._failed: dict[int, tuple[str, float]] = {}
        self.serving_error = ""
        self._store_failing = False           # the last background poll could not write the store

    # -- messages -------------------------------------------------------------

    def wants_reply(self, msg: Message) -> bool:
        if msg.author_is_bot:
            return False
        if msg.mentions_bot or msg.replies_to_bot:
            return True
        if msg.is_dm:
            return self.cfg.chat.reply_in_dms
        return msg.channel_id in {str(c) for c in self.cfg.chat.channels}

    def turns(self, msg: Message, history: list[HistoryItem]) -> list[Turn]:
        """The conversation the model sees: recent history, then the message, newest last."""
        turns = [Turn("assistant", h.text) if h.from_bot else Turn("user", self._clip(h.text), h.author_name)
                 for h in self._context(history)]
        return turns + [Turn("user", self._clip(msg.text), msg.author_name)]

    def _context(self, history: list[HistoryItem]) -> list[HistoryItem]:
        """The history items a reply's prompt is built from (``chat.history_messages``, newest)."""
        return history[-self.cfg.chat.history_messages:] if self.cfg.chat.history_messages else []

    async def _context_authors(self, msg: Message, history: list[HistoryItem]) -> list[str]:
        """Whose words the reply to ``msg`` may hold, recorded with it for ``/forget``: the asker,
        the author of each person's message in its context ('' where the adapter could not say:
        ``/forget`` then judges the reply by its channel), and the person each of the bot's
        replies in its context answered (a reply is its asker's data; '' for one that no longer
        resolves: deleted by retention or ``/forget``, or a notice). The whole window is
        counted, also turns the prompt builder may drop to fit the token budget."""
        context = self._context(history)
        people = {msg.author_id} | {h.author_id for h in context if not h.from_bot}
        posted = [h.message_id for h in context if h.from_bot and h.message_id]
        if posted:
            people.update(await self.store.reply_askers(msg.platform, posted))
        return sorted(people)

    async def _record(self, msg: Message, history: list[HistoryItem], message_row: int, gen: Generation) -> int:
        """Store the reply row with its context authors, in one transaction; returns its id."""
        return await self.store.add_reply(
            msg.platform, msg.channel_id, message_row, gen.version, gen.text, gen.prompt_ids, gen.output_ids,
            gen.logprobs, gen.temperature, gen.top_p, gen.max_new_tokens,
            context_authors=await self._context_authors(msg, history))

    def _clip(self, text: str) -> str:
        limit = self.cfg.chat.max_message_chars
        return text if len(text) <= limit else text[-limit:]

    async def on_message(self, msg: Message, history: list[HistoryItem], send: Send,
                         stream: ReplyStream | None = None) -> int | None:
        """Answer ``msg`` if it is addressed to the bot. Returns the reply id, or None.

        Notices (rate limit, busy, error) go through ``send``; the reply too without a
        ``stream``, else it is shown on ``stream`` while it is written (see the module doc).
        Nothing raises out of here: a failure to store or generate is logged once and the
        person gets a short apology; a platform that refuses the answer is logged once."""
        if not self.wants_reply(msg):
            return None
        pacer = Pacer(stream) if stream is not None else None
        try:
            return await self._answer(msg, history, send, pacer)
        except _Failed as f:
            log.error("could not %s for message %s on %s/%s: %s: %s", f.stage, msg.message_id, msg.platform,
                      msg.channel_id, type(f.__cause__).__name__, f.__cause__, exc_info=f.__cause__)
            if f.text:
                await self._tell(f.text, send, pacer)
        except Exception:  # noqa: BLE001 - nothing escapes the chat core
            log.exception("could not answer message %s on %s/%s", msg.message_id, msg.platform, msg.channel_id)
        return None

    async def _answer(self, msg: Message, history: list[HistoryItem], send: Send, pacer: Pacer | None) -> int | None:
        key = (msg.platform, msg.author_id)
        if msg.rate_limited and self.rate_limit.over(key):
            if self.rate_limit.first_notice(key):      # one notice per window: a flood gets no flood of notices
                log.info("rate limit: %s/%s", msg.platform, msg.author_id)
                await _stage("send the rate-limit notice", None, send(
                    f"You're writing faster than I can learn; try again in a minute "
                    f"(limit {self.cfg.chat.rate_limit_per_minute}/min)."))
            return None
        started = time.monotonic()
        message_row = await _stage("store the message", STORE_TEXT, self.store.add_message(
            msg.platform, msg.message_id, msg.channel_id, msg.author_id, msg.author_name, self._clip(msg.text)))
        try:
            gen = await self._generate(self.turns(msg, history), pacer)
        except Busy:
            log.warning("busy: queue full, told %s/%s to retry", msg.platform, msg.author_id)
            await self._tell(BUSY_TEXT, send, pacer)
            return None
        except Exception as e:  # noqa: BLE001 - a failed generation must still answer the person
            raise _Failed("generate a reply", ERROR_TEXT) from e
        reply_id = await _stage("store the reply", STORE_TEXT, self._record(msg, history, message_row, gen))
        platform_ids = await _stage("send the reply", None, self._deliver(gen.text or EMPTY_TEXT, send, pacer))
        if self.metrics is not None:
            self.metrics.observe_reply(msg.platform, time.monotonic() - started)
        try:
            for pid in platform_ids:
                await self.store.link_reply_message(reply_id, msg.platform, pid)
        except Exception:  # noqa: BLE001 - the reply is out and stored; only votes on it can't find it
            log.exception("reply #%d was sent but could not be linked to its messages", reply_id)
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

    async def _tell(self, text: str, send: Send, pacer: Pacer | None) -> None:
        """A notice replaces the text shown so far, if any; else it is sent. A platform that
        refuses it too is a warning (the failure that led here is logged already)."""
        try:
            await self._deliver(text, send, pacer if pacer is not None and pacer.started else None)
        except Exception as e:  # noqa: BLE001 - nothing escapes the chat core
            log.warning("could not send a notice either: %s: %s", type(e).__name__, e)

    # -- reactions ------------------------------------------------------------

    async def on_reaction(self, r: Reaction) -> str:
        """Record or remove a vote. Returns what happened (for logs and tests); never raises:
        a vote that can't be stored is logged once and reported as "failed: ..."."""
        if r.user_is_bot:
            return "ignored: reaction by a bot"
        value = self.rewards.value(r.emoji)
        if value is None:
            return "ignored: not a voting emoji"
        try:
            reply_id = await self.store.reply_for_message(r.platform, r.message_id)
            if reply_id is None:
                return "ignored: not one of the bot's replies"
            return await self._cast(reply_id, r.user_id, canonical(r.emoji), value if r.added else None, r.at)
        except Exception as e:  # noqa: BLE001 - nothing escapes the chat core
            log.exception("could not record a reaction by %s/%s on message %s", r.platform, r.user_id, r.message_id)
            return f"failed: {type(e).__name__}"

    async def _cast(self, reply_id: int, user_id: str, emoji: str, value: float | None, at: float | None) -> str:
        """A reaction's change, through the flood guard (``bot.limits.VoteFlood``): written now,
        or held and written by ``flush_votes``, so toggling costs bounded writes and log lines;
        a change older than one already taken (``at``) is dropped. A change the store can't take
        now (a full or read-only disk) is held too: ``flush_votes`` writes it once it can.
        Each change taken is remembered with its time for ``reconcile_votes``."""
        key = (reply_id, user_id, emoji)
        async with self._votes:
            decision = self.floods.hold(key, value, at)
            if decision != STALE:
                self._changed.setdefault(reply_id, {})[(user_id, emoji)] = time.time()
            if decision == WRITE:
                try:
                    return await self.vote(reply_id, user_id, emoji, value)
                except STORE_ERRORS:
                    self.floods.put_back({key: value})      # not lost: flush_votes writes it once the store works
                    raise
        if decision == STALE:
            return "ignored: a newer change of this reaction came first"
        if self.floods.first_warning(key):
            log.warning("reaction flood: user %s changed %s on reply #%d more than %d times in %.0fs; its final "
                        "state is written every %gs until it calms down", user_id, emoji, reply_id, FLOOD_WRITES,
                        WINDOW, self.cfg.serving.poll_seconds)
        return "held: a reaction flood (the final state is written shortly)"

    async def flush_votes(self) -> int:
        """Write the final state of every held (flooded) reaction; returns how many were written.
        ``run_background`` calls it every poll and once more when it is stopped."""
        async with self._votes:
            held = self.floods.take_held()
            done = written = 0
            try:
                for (reply_id, user_id, emoji), value in held.items():
                    try:
                        await self._write_vote(reply_id, user_id, emoji, value)
                        written += 1
                    except sqlite3.IntegrityError:      # the reply is gone (/forget): nothing to vote on
                        log.debug("held vote on reply #%d dropped: the reply is gone", reply_id)
                    done += 1
            finally:
                self.floods.put_back(dict(list(held.items())[done:]))     # what a failing store left unwritten
            self.floods.prune()
        if written:
            log.debug("wrote the final state of %d flooded reaction(s)", written)
        return written

    async def vote(self, reply_id: int, user_id: str, emoji: str, value: float | None) -> str:
        """Set (value) or remove (None) one user's emoji on a reply."""
        emoji = canonical(emoji)
        if not await self._write_vote(reply_id, user_id, emoji, value):
            return "ignored: no such vote"
        if value is None:
            log.info("vote removed: reply #%d user %s %s", reply_id, user_id, emoji)
            return "removed"
        log.info("vote: reply #%d user %s %s (%+.1f)", reply_id, user_id, emoji, value)
        return "added"

    async def _write_vote(self, reply_id: int, user_id: str, emoji: str, value: float | None) -> bool:
        if value is None:
            return await self.store.remove_vote(reply_id, user_id, emoji)
        await self.store.set_vote(reply_id, user_id, emoji, value)
        return True

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

    # -- votes made while the bot was away ---------------------------------------

    async def backfill_votes(self, platform: str, read, why: str) -> tuple[int, int, int]:
        """Make the votes on the bot's replies on ``platform`` of the last ``chat.backfill_hours``
        what the platform lists now, so reactions added or removed while the bot was away
        count. ``read(channel_id, message_ids)`` is the adapter's part: every reaction on one
        reply's messages as ``Reaction``s, or None when one can't be read (deleted, no access:
        that reply's votes stay as they are). Returns (replies reconciled, votes added or
        changed, votes removed). ``chat.backfill_hours`` 0 turns it off."""
        hours = self.cfg.chat.backfill_hours
        if hours <= 0:
            return 0, 0, 0
        replies = await self.store.recent_reply_messages(platform, time.time() - hours * 3600)
        done = added = removed = 0
        for reply_id, channel_id, message_ids in replies:
            read_at = time.time()
            reactions = await read(channel_id, message_ids)
            if reactions is None:
                continue
            a, r = await self.reconcile_votes(reply_id, reactions, read_at)
            done, added, removed = done + 1, added + a, removed + r
        log.info("%s: votes reconciled after %s: %d of %d replies from the last %gh read, %d votes added, "
                 "%d removed", platform, why, done, len(replies), hours, added, removed)
        return done, added, removed

    async def reconcile_votes(self, reply_id: int, reactions: list[Reaction], read_at: float) -> tuple[int, int]:
        """Make the votes on one reply what ``reactions`` say: every reaction on all its parts
        as the platform lists them now (read at ``read_at``, ``time.time()``). Bots' reactions
        and other emoji count for nothing, as in ``on_reaction``. Returns (votes added or
        changed, removed). A (user, emoji) that changed live at or after ``read_at`` (added or
        removed while the list was read: it may show either state) is left as the live event
        left it, neither written nor deleted; so is a vote stored after ``read_at``
        (``Store.replace_votes``)."""
        votes = {}
        for r in reactions:
            value = None if r.user_is_bot else self.rewards.value(r.emoji)
            if value is not None:
                votes[(r.user_id, canonical(r.emoji))] = value
        live = {k for k, t in self._changed.get(reply_id, {}).items() if t >= read_at}
        added, removed = await self.store.replace_votes(reply_id, votes, read_at, leave=live)
        if added or removed:
            log.info("votes on reply #%d reconciled with the platform: %d added, %d removed", reply_id, added, removed)
        return added, removed

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
        """Run a command; never raises: a failure (the store, a version that can't load
        unexpectedly) is logged once and answered with a short apology."""
        try:
            return await self._command(c)
        except Exception:  # noqa: BLE001 - nothing escapes the chat core
            log.exception("%s failed for %s/%s", c.typed(c.name), c.platform, c.user_id)
            return CommandResult(f"Sorry, {c.typed(c.name)} failed; the error is in the bot's log.", ok=False)

    async def _command(self, c: Command) -> CommandResult:
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
            text += (f" {gone['replies_to_others']} of the replies answered other people with their words in the "
                     "context (or, for replies without a record of their context, came later in a channel where "
                     f"they wrote), with {_n(gone['other_votes'], 'vote')} on them.")
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
        if v is None or self._refused(active, v.sha256):
            return
        try:
            await self._load(active, v.path, v.sha256)
        except Exception as e:  # noqa: BLE001 - the folder (VersionError) or the install: disk, converter, memory
            await self._refuse(active, v.sha256, e)
            await self._fall_back(active)
            return
        self.policy.activate(active)
        self.serving_error = ""
        await self.store.set_state("serving_version", str(active))
        await self.store.set_state("serving_error", "")
        log.info("hot-swapped to v%d", active)

    def _refused(self, version: int, sha256: str | None) -> bool:
        """Did this version (these weights) fail to install, not to be tried again yet?"""
        failed = self._failed.get(version)
        return failed is not None and failed[0] == (sha256 or "") and self._clock() < failed[1]

    async def _refuse(self, version: int, sha256: str | None, e: Exception) -> None:
        """Remember a failed install, log it once and show it in /status. A broken folder
        (``VersionError``) is not tried again until its registry row changes; any other failure
        (a full disk in serving/, the int8 converter, memory) after ``INSTALL_RETRY_SECONDS``."""
        if isinstance(e, VersionError):
            why, again = str(e), math.inf
            log.error("refused v%d, still serving v%d: %s", version, self.policy.active_version, why)
        else:
            why = (f"could not install it ({type(e).__name__}: {e}); trying again in "
                   f"{INSTALL_RETRY_SECONDS / 60:.0f} min")
            again = self._clock() + INSTALL_RETRY_SECONDS
            log.error("could not install v%d, still serving v%d: %s", version, self.policy.active_version, why,
                      exc_info=e)
        self._failed[version] = (sha256 or "", again)
        self.serving_error = f"v{version}: {why}"
        await self.store.set_state("serving_error", self.serving_error)

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
            except Exception as e:  # noqa: BLE001 - as in sync_version: try the next older one
                log.warning("v%d does not load either: %s", v.id,
                            e if isinstance(e, VersionError) else f"{type(e).__name__}: {e}")
                continue
            self.policy.activate(v.id)
            await self.store.set_state("serving_version", str(v.id))
            log.warning("serving v%d, the newest version that loads, instead of the broken v%d", v.id, broken)
            return

    async def post_results(self, posters: dict[str, Post]) -> int:
        """Post finished train requests back where they were asked; one that fails POST_TRIES
        times is given up (marked notified, with an error in the log). Returns how many ended.
        A result posted while the store can't record that it was (a full disk) is remembered
        and not posted again; it is marked once the store works."""
        n = 0
        for req in await self.store.unnotified_results():
            post = posters.get(req["platform"])
            if post is None:
                continue
            if req["id"] not in self._posted and not await self._post_result(post, req):
                continue                                        # try again next poll
            self._posted.add(req["id"])
            await self.store.mark_notified(req["id"])
            self._posted.discard(req["id"])
            n += 1
        return n

    async def _post_result(self, post: Post, req: dict) -> bool:
        """Post one result; False: it failed and will be tried again (True once given up)."""
        try:
            what = "Auto-rollback" if req["requested_by"] == "auto-rollback" else f"Retrain #{req['id']}"
            await post(req["channel_id"], f"{what}: {req['result']}")
        except Exception:  # noqa: BLE001 - try again next poll, a few times
            tries = self._post_tries[req["id"]] = self._post_tries.get(req["id"], 0) + 1
            if tries < POST_TRIES:
                log.warning("could not post result of request #%d (try %d of %d)", req["id"], tries,
                            POST_TRIES, exc_info=True)
                return False
            log.error("giving up posting result of request #%d to %s/%s after %d tries", req["id"],
                      req["platform"], req["channel_id"], tries)
        return True

    async def poll(self, posters: dict[str, Post]) -> None:
        """One background poll: write held (flooded) votes, hot-swap if needed, post trainer
        results. Never raises. A store that can't be written (``STORE_ERRORS``: a full or
        read-only disk) is one error per outage, however many polls it lasts, and one warning
        when it works again; any other failure is logged with its traceback."""
        try:
            self.rate_limit.prune()
            self._forget_old_changes()
            await self.flush_votes()
            await self.sync_version()
            await self.post_results(posters)
        except STORE_ERRORS as e:
            (log.debug if self._store_failing else log.error)(
                "background poll: the store can't be written (%s: %s); trying again every %gs",
                type(e).__name__, e, self.cfg.serving.poll_seconds)
            self._store_failing = True
            return
        except Exception:  # noqa: BLE001 - keep polling; the next tick may succeed
            log.exception("background poll failed")
            return
        if self._store_failing:
            log.warning("background poll: the store can be written again")
            self._store_failing = False

    def _forget_old_changes(self) -> None:
        """Keep the live vote changes of the last ``CHANGES_KEPT_SECONDS`` only (memory stays flat)."""
        old = time.time() - CHANGES_KEPT_SECONDS
        self._changed = {rid: kept for rid, changes in self._changed.items()
                         if (kept := {k: t for k, t in changes.items() if t >= old})}

    async def run_background(self, posters: dict[str, Post]) -> None:
        """Forever: ``poll`` every poll interval. Cancelled (the bot stops), it writes the held
        votes first."""
        try:
            while True:
                await self.poll(posters)
                await asyncio.sleep(self.cfg.serving.poll_seconds)
        except asyncio.CancelledError:
            try:
                await self.flush_votes()
            except Exception:  # noqa: BLE001 - stopping anyway
                log.exception("could not write the held votes while stopping")
            raise


def _version_list(ids: list[int], most: int = 8) -> str:
    """``[3, 4]`` → "v3, v4"; a long list keeps its ends: "v3, v4, v5, … v40, v41 (20 versions)"."""
    names = [f"v{i}" for i in ids]
    if len(names) <= most:
        return ", ".join(names)
    return f"{', '.join(names[:3])}, … {', '.join(names[-2:])} ({len(names)} versions)"


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
