"""/healthz and /metrics for the bot and the trainer: one small aiohttp server per process.

    health = BotHealth(cfg, store)                       # the trainer: TrainerHealth(store, heartbeat_seconds)
    server = HealthServer(health, cfg.health.host, cfg.health.bot_port, "health.bot_port")
    await server.start()                                  # HealthError, one line, when it can't listen
    ...
    await server.stop()

``GET /healthz`` answers 200 ``{"ok": true, "checks": {...}}`` when every required check
passes, else 503 with the same body, where the failing check says why. A check is
``{"ok": bool, "required": bool, "detail": str}``:

- the bot: ``store`` (the database answers a query), ``model`` (a model is loaded and the
  registry's version synced: 503 while it loads at start), ``trainer_heartbeat`` (written
  within max(60 s, 3 × trainer.heartbeat_seconds)). The heartbeat is reported, not required:
  a bot whose trainer is stopped still chats and records votes, and restarting the bot would
  not bring the trainer back; watch it on the trainer's own /healthz.
- the trainer: ``store`` and ``heartbeat`` (its own, required: a trainer whose heartbeat no
  longer reaches the database is stuck or cut off from it).

``GET /metrics`` is Prometheus text from a registry of this process alone (not the global
one, so tests can build several). What the store holds (votes, rounds, versions, the
heartbeat) is read from it at each scrape, so it is right after a restart too; what only
this process knows (replies it sent and their latency, the queue) lives in the process.

No torch here. The trainer imports this module only when its port is set (aiohttp loads then).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import time
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger(__name__)

HEARTBEAT_KEY = "trainer_heartbeat"
TRAINER_HEARTBEAT_DEFAULT = 10.0      # trainer.heartbeat_seconds' default (trainer/config.py)
MIN_STALE_SECONDS = 60.0
STORE_TIMEOUT = 5.0                   # a /healthz or /metrics that waits longer says the store is down
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60, 120)
ROUND_OUTCOMES = ("published", "rejected", "skipped", "failed")


class HealthError(Exception):
    """The server can't listen where the config says. The message is one line naming the key and the fix."""


@dataclasses.dataclass
class Check:
    ok: bool
    detail: str
    required: bool = True


def stale_after(heartbeat_seconds: float) -> float:
    """A heartbeat older than this is stale: three missed beats, and never under a minute."""
    return max(MIN_STALE_SECONDS, 3 * heartbeat_seconds)


def trainer_heartbeat_seconds(trainer_table: dict) -> float:
    """``trainer.heartbeat_seconds`` from the raw [trainer] table (the bot does not import the
    trainer's config; an unusable value falls back to the default, the trainer itself refuses it)."""
    value = trainer_table.get("heartbeat_seconds", TRAINER_HEARTBEAT_DEFAULT)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    return float(value) if ok else TRAINER_HEARTBEAT_DEFAULT


def heartbeat_check(beat: str | None, limit: float, required: bool) -> Check:
    if beat is None:
        return Check(False, "missing: no trainer has written one to this database", required)
    age = max(0.0, time.time() - float(beat))
    if age > limit:
        return Check(False, f"stale: written {age:.0f} s ago (limit {limit:.0f} s)", required)
    return Check(True, f"written {age:.0f} s ago", required)


def vote_label(value: float) -> str:
    """An emoji value as a label: 1.0 → "+1", -1.0 → "-1", 0.5 → "+0.5"."""
    return f"{value:+g}"


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _Snapshot:
    """A collector serving families read from the store just before a scrape (collect can't await)."""

    def __init__(self, registry: CollectorRegistry):
        self.families: list = []
        registry.register(self)

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        return list(self.families)


class _Health:
    """What both processes report: the store, the active version, the trainer's heartbeat."""

    heartbeat_name = "trainer_heartbeat"
    heartbeat_required = False

    def __init__(self, store, heartbeat_seconds: float):
        self.store = store
        self.stale_after = stale_after(heartbeat_seconds)
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._snapshot = _Snapshot(self.registry)

    async def _state(self) -> tuple[int, str | None]:
        return await self.store.active_version(), await self.store.get_state(HEARTBEAT_KEY)

    def _own_checks(self) -> dict[str, Check]:
        return {}

    async def checks(self) -> dict[str, Check]:
        try:
            active, beat = await asyncio.wait_for(self._state(), STORE_TIMEOUT)
            store = Check(True, f"answers; active version v{active}")
        except Exception as e:  # noqa: BLE001 - whatever it is, the store is what failed
            store, beat = Check(False, f"does not answer: {type(e).__name__}: {e}"), None
        out = {"store": store, **self._own_checks()}
        out[self.heartbeat_name] = (heartbeat_check(beat, self.stale_after, self.heartbeat_required) if store.ok else
                                    Check(False, "unknown: the store does not answer", self.heartbeat_required))
        return out

    async def _families(self) -> list:
        active, beat = await self._state()
        out = [gauge("reactlearn_active_version", "The version the registry says serves (state.active_version).",
                     active)]
        if beat is not None:
            out.append(gauge("reactlearn_trainer_heartbeat_age_seconds", "Seconds since the trainer last wrote "
                             "its heartbeat (absent when it never did).", max(0.0, time.time() - float(beat))))
        return out

    async def refresh(self) -> None:
        """Read the store's numbers for the next scrape."""
        try:
            families, up = await asyncio.wait_for(self._families(), STORE_TIMEOUT), 1
        except Exception as e:  # noqa: BLE001 - the scrape still answers, with store_up 0
            log.warning("metrics: the store did not answer: %s: %s", type(e).__name__, e)
            families, up = [], 0
        self._snapshot.families = [gauge("reactlearn_store_up", "1 when the database answered this scrape's "
                                         "queries, else 0.", up), *families]

    def healthz(self, checks: dict[str, Check]) -> tuple[int, dict[str, Any]]:
        ok = all(c.ok for c in checks.values() if c.required)
        return (200 if ok else 503), {"ok": ok, "checks": {k: dataclasses.asdict(c) for k, c in checks.items()}}


class BotHealth(_Health):
    """The bot's checks and metrics. ``ChatCore(..., metrics=health)`` calls ``observe_reply``;
    set ``core`` once the model is loaded and synced (until then ``model`` fails: loading)."""

    def __init__(self, cfg, store):
        super().__init__(store, trainer_heartbeat_seconds(cfg.trainer))
        self.core = None
        r = self.registry
        self.replies = Counter("reactlearn_bot_replies", "Replies this bot process sent, by platform.", ["platform"],
                               registry=r)
        self.latency = Histogram("reactlearn_bot_reply_latency_seconds", "Seconds from a message reaching the chat "
                                 "core to its reply being sent.", buckets=LATENCY_BUCKETS, registry=r)
        Gauge("reactlearn_bot_queue_depth", "Replies waiting for the model (serving.queue_size is the most).",
              registry=r).set_function(lambda: getattr(self.core.policy, "waiting", 0) if self.core else 0)
        Gauge("reactlearn_bot_serving_version", "The version new replies are generated with (NaN while loading).",
              registry=r).set_function(lambda: self.core.policy.active_version if self.core else float("nan"))

    def observe_reply(self, platform: str, seconds: float) -> None:
        self.replies.labels(platform).inc()
        self.latency.observe(seconds)

    def _own_checks(self) -> dict[str, Check]:
        if self.core is None or self.core.policy.active_version is None:
            return {"model": Check(False, "loading")}
        refused = f"; refused {self.core.serving_error}" if self.core.serving_error else ""
        return {"model": Check(True, f"serving v{self.core.policy.active_version}{refused}")}

    async def _families(self) -> list:
        out = await super()._families()
        counts, votes = await self.store.counts(), await self.store.vote_values()
        out.append(gauge("reactlearn_replies", "Replies in the store (every version and platform).",
                         counts["replies"]))
        out.append(gauge("reactlearn_rated_replies", "Replies in the store with at least one vote.", counts["rated"]))
        family = GaugeMetricFamily("reactlearn_votes", "Votes in the store, by emoji value (one per reply, user "
                                   "and emoji; a removed reaction removes its vote).", labels=["value"])
        for value, n in votes.items():
            family.add_metric([vote_label(value)], n)
        return out + [family]


class TrainerHealth(_Health):
    """The trainer's checks and metrics: its own heartbeat is required."""

    heartbeat_name = "heartbeat"
    heartbeat_required = True

    async def _families(self) -> list:
        out = await super()._families()
        statuses = await self.store.round_statuses()
        rounds = CounterMetricFamily("reactlearn_trainer_rounds", "Rounds that ended, by status.", labels=["status"])
        for status in ROUND_OUTCOMES:
            rounds.add_metric([status], statuses.get(status, 0))
        out += [rounds, gauge("reactlearn_trainer_rounds_running", "Rounds running now (0 or 1).",
                              statuses.get("running", 0))]
        last = await self.store.last_round("published")
        for column, doc in (("version", "The version the last published round made."),
                            ("kl", "The last published round's mean per-token KL to the base model (nats)."),
                            ("mean_reward", "The last published round's mean reward.")):
            if last is not None and last[column] is not None:
                out.append(gauge(f"reactlearn_trainer_last_published_{column}", doc, last[column]))
        return out


class HealthServer:
    """GET /healthz and GET /metrics on host:port for one ``BotHealth`` or ``TrainerHealth``.
    ``key`` is the setting that chose the port, named in the error when it can't listen."""

    def __init__(self, health: _Health, host: str, port: int, key: str):
        self.health, self.host, self.port, self.key = health, host, port, key
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as e:
            await runner.cleanup()
            why = "is already in use" if e.errno == errno.EADDRINUSE else f"can't be used ({e.strerror or e})"
            raise HealthError(f"cannot start: {self.host}:{self.port} ({self.key}) {why}. Stop what listens there, "
                              f"or set {self.key} to a free port (0 turns the health server off) or health.host "
                              "to an address of this machine.") from None
        self._runner = runner
        log.info("health: http://%s:%d/healthz and /metrics", self.host, self.bound_port)

    @property
    def bound_port(self) -> int:
        """The port listened on (the one the OS chose when ``port`` was 0, as tests do)."""
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        status, body = self.health.healthz(await self.health.checks())
        return web.json_response(body, status=status)

    async def _metrics(self, request: web.Request) -> web.Response:
        await self.health.refresh()
        return web.Response(body=generate_latest(self.health.registry), headers={"Content-Type": TEXT_CONTENT_TYPE})
