"""How much work one person can cause: bookkeeping only (no store, no I/O), on a clock that
tests can move.

- ``RateLimit``: replies per person per minute; a person over the limit is told once per
  window (``first_notice``), so a flood of messages gets one notice, not a flood of them.
- ``VoteFlood``: a reaction toggled again and again (one user, one reply, one emoji) costs
  a bounded number of store writes. The first ``FLOOD_WRITES`` changes in a window are
  written at once (people who change their mind are never delayed); after that the key
  is *held*: each change only replaces its final state in memory, and the chat core
  writes the held states every poll (``take_held``). At most ``FLOOD_WRITES`` writes per
  key and window plus one per poll while it floods, however many events arrive.
  Changes that say when they happened (``at``: Slack's event_ts; Slack's client hands events
  over concurrently, so two toggles a moment apart may arrive swapped) are kept in order:
  one older than a change already taken for its key is ``STALE`` and dropped.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Hashable

WINDOW = 60.0          # seconds: the rate limit's window, and the reaction-flood guard's
FLOOD_WRITES = 4       # changes of one (reply, user, emoji) written at once per window; later ones are held

Clock = Callable[[], float]
WRITE, HELD, STALE = "write", "held", "stale"      # what VoteFlood.hold decides for a change


class RateLimit:
    def __init__(self, per_minute: int, clock: Clock = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._recent: dict[Hashable, deque] = {}    # person → times of the messages let through
        self._noticed: dict[Hashable, float] = {}   # person → when they were last told

    def over(self, key: Hashable) -> bool:
        """True when ``key`` had ``per_minute`` messages let through in the last window (this
        one is then not counted); else this message is counted and False returned."""
        if self.per_minute <= 0:
            return False
        now = self.clock()
        window = _recent_window(self._recent.setdefault(key, deque()), now)
        if len(window) >= self.per_minute:
            return True
        window.append(now)
        return False

    def first_notice(self, key: Hashable) -> bool:
        """True for the first over-limit message of ``key`` in a window: tell them once."""
        return _first_in_window(self._noticed, key, self.clock())

    def prune(self) -> None:
        """Forget people who wrote nothing in the last window (keeps memory flat for months)."""
        now = self.clock()
        self._recent = {k: w for k, w in self._recent.items() if w and now - w[-1] <= WINDOW}
        self._noticed = {k: t for k, t in self._noticed.items() if now - t < WINDOW}


class VoteFlood:
    def __init__(self, writes: int = FLOOD_WRITES, clock: Clock = time.monotonic):
        self.writes = writes
        self.clock = clock
        self.held: dict[Hashable, float | None] = {}       # key → the final state waiting to be written
        self._written: dict[Hashable, deque] = {}          # key → times of its writes in the window
        self._warned: dict[Hashable, float] = {}           # key → when its flood was last logged
        self._newest: dict[Hashable, tuple[float, float]] = {}    # key → (newest ``at`` taken, clock then)

    def hold(self, key: Hashable, value: float | None, at: float | None = None) -> str:
        """A change of ``key`` to ``value`` (None: removed) that happened at ``at`` (None: unknown).
        WRITE: write it now (it is counted); HELD: ``take_held`` hands its final state over
        later; STALE: a newer change of ``key`` was taken already, drop this one."""
        now = self.clock()
        if at is not None:
            newest = self._newest.get(key)
            if newest is not None and at < newest[0]:
                return STALE
            self._newest[key] = (at, now)
        if key in self.held:
            self.held[key] = value
            return HELD
        times = _recent_window(self._written.setdefault(key, deque()), now)
        if len(times) >= self.writes:
            self.held[key] = value
            return HELD
        times.append(now)
        return WRITE

    def first_warning(self, key: Hashable) -> bool:
        """True once per window for a held key: log a flood once, not once per event."""
        return _first_in_window(self._warned, key, self.clock())

    def take_held(self) -> dict[Hashable, float | None]:
        """The held final states, to be written now; the keys stop being held (a key still
        flooding is held again by its next change)."""
        held, self.held = self.held, {}
        return held

    def put_back(self, states: dict[Hashable, float | None]) -> None:
        """States that could not be written: held again (a newer change of a key wins)."""
        for key, value in states.items():
            self.held.setdefault(key, value)

    def prune(self) -> None:
        """Forget keys with no write in the last window and nothing held."""
        now = self.clock()
        idle = [k for k, t in self._written.items() if k not in self.held and (not t or now - t[-1] > WINDOW)]
        for key in idle:
            self._written.pop(key, None)
        self._warned = {k: t for k, t in self._warned.items() if now - t < WINDOW}
        self._newest = {k: n for k, n in self._newest.items() if now - n[1] <= WINDOW}


def _recent_window(times: deque, now: float) -> deque:
    """``times`` with the stamps older than one window dropped (in place)."""
    while times and now - times[0] > WINDOW:
        times.popleft()
    return times


def _first_in_window(last: dict, key: Hashable, now: float) -> bool:
    """True (and ``last[key]`` set to now) unless ``key`` had its turn within the window."""
    if now - last.get(key, now - WINDOW) < WINDOW:
        return False
    last[key] = now
    return True
