"""Limits that hold across the fronts sharing one store: each front's counts go through the
store about every COHORT_LIMIT_SYNC_S, off the request path (the bound on overshoot this leaves
is in server/limits.py).

A front writes, per subject that changed, what it admitted and charged since its last write
(added to its row's totals) and what stands now (in flight, today's tokens); it reads the other
fronts' rows. Another front's *deltas* since it last read them are taken from its own buckets;
their requests in flight (only of rows alive, refreshed while they hold some) and tokens of
today are kept as remote figures that the concurrency and daily checks add. A subject it has
just begun to count starts from the tightest of the others' buckets as they last wrote them.
Rows not updated for two days are pruned, by every front, once an hour.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import asdict

import trio

from server.periodic import Streak, every
from server.limits import CountChange, Counters, Limiter
from server.store import FrontCount, utcnow

log = logging.getLogger("cohort.limit_sync")

READ_MARGIN_S = 5.0  # rows are read again this far back: late commits, clocks a little apart
STALE_AFTER_SYNCS = 5  # a front silent this many periods is gone: its in-flight stop counting
PRUNE_AFTER = datetime.timedelta(days=2)  # > a day: a stale front's tokens of today still count
PRUNE_EVERY_S = 3600.0


class RemoteCounts:
    """The other fronts' counts as this front last read them, and how they enter its Limiter.
    A plain object: times are passed in (`now` the Limiter's clock, `wall` the store's)."""

    def __init__(self, limiter: Limiter, stale_after_s: float) -> None:
        self.limiter = limiter
        self.stale_after = datetime.timedelta(seconds=stale_after_s)
        self._rows: dict[str, dict[str, FrontCount]] = {}  # subject -> front -> last read
        self._holding: set[str] = set()  # subjects some other front has in flight

    def merge(self, rows: list[FrontCount], new: set[str], written: list[CountChange],
              now: float, wall: datetime.datetime) -> None:
        """Apply what was read: `new` are the subjects first read whole, `written` what this
        front wrote in the same sync (its own use since it began counting a new subject)."""
        for subject in new:  # counted afresh here: what was read before is another life
            self._rows.pop(subject, None)
        own = {change.subject: change for change in written if change.subject in new}
        touched = set(self._holding)
        for row in rows:
            counters = self.limiter.tracked(row.subject)
            if counters is None:
                continue
            seen = self._rows.setdefault(row.subject, {})
            before = seen.get(row.front)
            if before is None and row.subject in new:
                self._start_from(counters, row, own.get(row.subject), now, wall)
            elif before is None or row.requests < before.requests:  # new, or pruned and begun again
                self._take(counters, row.requests, row.tokens, now)
            else:
                self._take(counters, row.requests - before.requests, row.tokens - before.tokens, now)
            seen[row.front] = row
            touched.add(row.subject)
        for subject in touched:
            self._figure(subject, wall)

    @staticmethod
    def _take(counters: Counters, requests: int, tokens: int, now: float) -> None:
        if counters.requests is not None and requests > 0:
            counters.requests.force_take(now, requests)
        if counters.tokens is not None and tokens:
            if tokens > 0:
                counters.tokens.force_take(now, tokens)
            else:  # the other front gave back more than it charged since: a refund
                counters.tokens.give_back(now, -tokens)

    @staticmethod
    def _start_from(counters: Counters, row: FrontCount, own: CountChange | None, now: float,
                    wall: datetime.datetime) -> None:
        """No lower than the other front's view of the buckets (refilled since it wrote them),
        less what this front took since it began counting the subject (that view lacks it)."""
        age_s = max(0.0, (wall - row.updated_at).total_seconds())
        for bucket, left, taken in ((counters.requests, row.requests_left, own and own.requests),
                                    (counters.tokens, row.tokens_left, own and own.tokens)):
            if bucket is None or left is None:
                continue
            theirs = min(bucket.burst, left + age_s * bucket.rate) - (taken or 0)
            excess = bucket.level(now) - theirs
            if excess > 0:
                bucket.force_take(now, excess)

    def _figure(self, subject: str, wall: datetime.datetime) -> None:
        """The remote figures of one subject: in flight on live fronts, tokens of today."""
        counters = self.limiter.tracked(subject)
        rows = self._rows.get(subject, {}).values()
        alive = wall - self.stale_after
        in_flight = sum(row.in_flight for row in rows if row.updated_at >= alive)
        if in_flight:
            self._holding.add(subject)
        else:
            self._holding.discard(subject)
        if counters is not None:
            counters.remote_in_flight = in_flight
            counters.remote_day = wall.date()
            counters.remote_day_tokens = sum(row.day_tokens for row in rows
                                             if row.day == wall.date())

    def forget(self, before: datetime.datetime) -> None:
        """Drop rows pruned from the store, and those of subjects no longer counted here."""
        for subject in list(self._rows):
            if self.limiter.tracked(subject) is None:
                del self._rows[subject]
                continue
            fronts = self._rows[subject]
            for front in [f for f, row in fronts.items() if row.updated_at < before]:
                del fronts[front]


class LimitSync:
    """The front's service that shares its limit counts through the store."""

    def __init__(self, limiter: Limiter, store, front: str, period_s: float) -> None:
        self.limiter = limiter
        self.store = store
        self.front = front
        self.period_s = period_s
        self.remote = RemoteCounts(limiter, STALE_AFTER_SYNCS * period_s + READ_MARGIN_S)
        self.syncs = 0
        self.streak = Streak()  # failed syncs in a row (/health)
        self._read_at: datetime.datetime | None = None
        self._pruned_at: float | None = None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if self.period_s <= 0:
            log.info("limit sync off (COHORT_LIMIT_SYNC_S=0): each front counts for itself")
            return
        await every(self.period_s, self.sync, what="sharing limit counts with the other fronts",
                    meanwhile="each front counts for itself until the store answers",
                    streak=self.streak)

    async def sync(self, wall: datetime.datetime | None = None) -> None:
        """One round: write what changed here, read what changed elsewhere, apply it; and once
        an hour prune the rows of fronts long gone. `wall` is the store's time (tests set it)."""
        wall = wall or utcnow()
        changes, new = self.limiter.take_changes(trio.current_time())
        since = (self._read_at or wall) - datetime.timedelta(seconds=READ_MARGIN_S)
        try:
            rows = await self.store.run(self.store.sync_limit_counts, self.front,
                                        [asdict(change) for change in changes], since,
                                        sorted(new), wall)
        except BaseException:
            self.limiter.restore(changes, new)
            raise
        self._read_at = wall
        self.remote.merge(rows, new, changes, trio.current_time(), wall)
        self.syncs += 1
        now = trio.current_time()
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY_S:
            self._pruned_at = now
            pruned = await self.store.run(self.store.prune_limit_counts, wall - PRUNE_AFTER)
            self.remote.forget(wall - PRUNE_AFTER)
            if pruned:
                log.info("pruned %d limit count(s) not updated for %s", pruned, PRUNE_AFTER)
