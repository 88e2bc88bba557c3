"""Per user and per API key limits, checked in memory on the hot path: requests per minute,
tokens per minute, concurrent requests and tokens per day, with OpenAI's 429s and headers.

A request is admitted only if every subject it counts against (its user, and its key) has room;
then it is counted against all of them at once. Tokens are charged up front at the request's
cost (its prompt's estimated tokens plus the `max_tokens` it asks for) and settled when it ends
against what it really used: a short answer gives back what it did not take, and a prompt that
was longer than its estimate is charged the difference, so a tpm limit or a daily quota holds
against real use, overshot by at most the requests in flight when it runs out.

Several fronts on one store share their counts through it (server/limit_sync.py), never on the
request path: every COHORT_LIMIT_SYNC_S each front writes what it admitted and reads what the
others did, takes their use from its own buckets (into debt if need be, so an overshoot is paid
back, not forgiven) and adds their requests in flight and tokens of today to its checks. The
bound on overshoot: until a front hears of the others' use, it admits what it saw remaining. A
front's admissions reach another within one sync window W (at most two periods: the writer's,
then the reader's), so with N fronts a subject may get, within W, up to (N-1) times what was left
at the last sync plus (N-1) x rate x W beyond its limit (rpm and tpm; concurrency and the daily
quota likewise, (N-1) times what was left). With COHORT_LIMIT_SYNC_S=0 each front counts for
itself and the bound is N times every limit.

The headers are OpenAI's: `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
`x-ratelimit-reset-requests` (and `-tokens`), on every response of a limited subject.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

from server.errors import QuotaExceeded, RateLimited
from server.rate import TokenBucket

MAX_SUBJECTS = 100_000  # subjects tracked at once; the idlest go first beyond it


@dataclass(frozen=True)
class Limits:
    """One subject's limits; 0 means none. `weight` and `priority` shape its fair share."""

    rpm: int = 0
    tpm: int = 0
    concurrency: int = 0
    tokens_per_day: int = 0
    weight: float = 1.0
    priority: str = "interactive"  # interactive | batch

    @property
    def limiting(self) -> bool:
        return bool(self.rpm or self.tpm or self.concurrency or self.tokens_per_day)


@dataclass
class Counters:
    """What one subject has used: this front's count, and the other fronts' as last synced."""

    requests: TokenBucket | None = None  # the other fronts' use is taken from these too
    tokens: TokenBucket | None = None
    in_flight: int = 0
    day: datetime.date | None = None
    day_tokens: int = 0
    remote_in_flight: int = 0
    remote_day: datetime.date | None = None
    remote_day_tokens: int = 0
    unsynced_requests: int = 0  # admitted here since the last sync
    unsynced_tokens: int = 0  # charged here since the last sync, net of refunds


@dataclass(frozen=True)
class CountChange:
    """One subject's counts on this front for the other fronts: admitted and charged since the
    last sync, and what stands now (in flight, today's tokens, what its buckets hold)."""

    subject: str
    requests: int
    tokens: int
    in_flight: int
    day: datetime.date | None
    day_tokens: int
    requests_left: float | None
    tokens_left: float | None


@dataclass
class Ticket:
    """An admitted request's hold on its subjects, given back by `Limiter.settle`."""

    subjects: list[tuple[str, Limits]]
    charged: int
    headers: dict[str, str] = field(default_factory=dict)
    day: datetime.date | None = None  # its tokens count on that day's quota
    holds_slot: bool = True  # counted in flight (a stored task is not: it runs later)


def _who(subject: str) -> str:
    """`user` or `key`, from a subject such as `user:alice`."""
    return subject.split(":")[0]


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `1h2m3s`."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


class Limiter:
    """Every limited subject's counters on this front; `take_changes` and `tracked` are for the
    limit sync, the rest for the routes."""

    def __init__(self) -> None:
        self._counters: dict[str, Counters] = {}
        self._changed: set[str] = set()  # counts moved since the last sync
        self._new: set[str] = set()  # tracked since the last sync: the others' rows not read yet

    def _of(self, subject: str, limits: Limits, now: float) -> Counters:
        counters = self._counters.get(subject)
        if counters is None:
            if len(self._counters) >= MAX_SUBJECTS:
                # an idle subject goes, with at most one sync period of counts not yet shared
                idle = next((s for s, c in self._counters.items() if not c.in_flight), None)
                if idle is not None:
                    del self._counters[idle]
                    self._changed.discard(idle)
                    self._new.discard(idle)
            counters = self._counters[subject] = Counters()
            self._new.add(subject)
        if limits.rpm and (counters.requests is None or counters.requests.burst != limits.rpm):
            counters.requests = TokenBucket(limits.rpm / 60, limits.rpm, updated=now)
        if limits.tpm and (counters.tokens is None or counters.tokens.burst != limits.tpm):
            counters.tokens = TokenBucket(limits.tpm / 60, limits.tpm, updated=now)
        return counters

    def admit(self, subjects: list[tuple[str, Limits]], cost: int, now: float,
              today: datetime.date, *, requests: int = 1, holds_slot: bool = True) -> Ticket:
        """Count `requests` requests of `cost` tokens in all against every limited subject, or
        refuse them all with a 429 that says which limit and when to retry (nothing is counted
        then). `holds_slot=False` (stored tasks) leaves the concurrency limit out."""
        limited = [(subject, limits) for subject, limits in subjects if limits.limiting]
        checked = [self._check(subject, limits, cost, now, today, requests, holds_slot)
                   for subject, limits in limited]
        for (subject, _), counters in zip(limited, checked):
            # after the check there is room for all of it, unless it is over a whole burst:
            # then it may start from a full bucket, and the rest is a debt paid back by the rate
            if counters.requests is not None:
                counters.requests.force_take(now, requests)
            if counters.tokens is not None:
                counters.tokens.force_take(now, cost)
            if holds_slot:
                counters.in_flight += 1
            counters.day_tokens += cost
            counters.unsynced_requests += requests
            counters.unsynced_tokens += cost
            self._changed.add(subject)
        ticket = Ticket(limited, cost, day=today, holds_slot=holds_slot)
        ticket.headers = self.headers(limited, now)
        return ticket

    def admit_batch(self, subjects: list[tuple[str, Limits]], costs: list[int], now: float,
                    today: datetime.date) -> list[Ticket]:
        """Count a batch of stored tasks as `len(costs)` requests and the sum of their costs, all
        or none; one ticket per task, so each settles against its own use."""
        whole = self.admit(subjects, sum(costs), now, today, requests=len(costs),
                           holds_slot=False)
        return [Ticket(whole.subjects, cost, whole.headers, today, holds_slot=False)
                for cost in costs]

    def _check(self, subject: str, limits: Limits, cost: int, now: float,
               today: datetime.date, requests: int, holds_slot: bool) -> Counters:
        """The subject's counters, if they have room for this; else the 429 that says why."""
        counters = self._of(subject, limits, now)
        if counters.day != today:
            counters.day, counters.day_tokens = today, 0
        day_tokens = counters.day_tokens + (
            counters.remote_day_tokens if counters.remote_day == today else 0)
        if limits.tokens_per_day and day_tokens + cost > limits.tokens_per_day:
            midnight = datetime.datetime.combine(today + datetime.timedelta(days=1),
                                                 datetime.time())
            wait = (midnight - datetime.datetime.now(datetime.timezone.utc).replace(
                tzinfo=None)).total_seconds()
            raise QuotaExceeded(
                f"this {_who(subject)}'s quota of {limits.tokens_per_day} tokens a day is used "
                f"up ({day_tokens} so far, this request may take {cost}); it renews at "
                "midnight UTC", headers=self._refusal(subject, limits, now, wait))
        in_flight = counters.in_flight + counters.remote_in_flight
        if holds_slot and limits.concurrency and in_flight >= limits.concurrency:
            raise RateLimited(f"this {_who(subject)} has {in_flight} requests running, its "
                              f"limit is {limits.concurrency} at once",
                              headers=self._refusal(subject, limits, now, 1))
        for bucket, name, amount, per in ((counters.requests, "requests", requests, limits.rpm),
                                          (counters.tokens, "tokens", cost, limits.tpm)):
            if bucket is None:
                continue
            # a request above a whole minute's worth waits for a full bucket, not forever
            wait = bucket.wait_s(now, min(amount, bucket.burst))
            if wait > 0:
                batch = f" (this batch counts {requests})" if name == "requests" and \
                    requests > 1 else ""
                raise RateLimited(
                    f"rate limit reached for this {_who(subject)}: {per} {name} per minute"
                    f"{batch}; retry in {wait:.1f} s",
                    headers=self._refusal(subject, limits, now, wait))
        return counters

    def _refusal(self, subject: str, limits: Limits, now: float, wait: float) -> dict[str, str]:
        """A 429's headers: the subject's x-ratelimit figures and when to retry."""
        return {**self.headers([(subject, limits)], now),
                "Retry-After": str(max(1, math.ceil(wait)))}

    def settle(self, ticket: Ticket, used_tokens: int | None, now: float) -> None:
        """The request ended: free its concurrency slot and charge what it really used instead
        of its estimate: unused tokens go back (to the daily quota only on the day they were
        charged), use above the estimate is charged too (the buckets may go into debt), so a
        limit holds against real use, overshot by at most the requests in flight. `None`: its
        use is unknown (cut off mid-run), and the estimate stands."""
        delta = 0 if used_tokens is None else used_tokens - ticket.charged
        for subject, _ in ticket.subjects:
            counters = self._counters.get(subject)
            if counters is None:
                continue
            if ticket.holds_slot:
                counters.in_flight = max(0, counters.in_flight - 1)
            if delta:
                if counters.day == ticket.day:
                    counters.day_tokens = max(0, counters.day_tokens + delta)
                if counters.tokens is not None:
                    if delta < 0:
                        counters.tokens.give_back(now, -delta)
                    else:
                        counters.tokens.force_take(now, delta)
                counters.unsynced_tokens += delta
            self._changed.add(subject)

    # --- for the limit sync (server/limit_sync.py) ------------------------------------------

    def tracked(self, subject: str) -> Counters | None:
        """A subject's counters, unless it is not tracked here or was first tracked after the
        last `take_changes` (the other fronts' rows for it are read at the next sync)."""
        return None if subject in self._new else self._counters.get(subject)

    def take_changes(self, now: float) -> tuple[list[CountChange], set[str]]:
        """What changed since the last call (its unsynced counts now handed over), and the
        subjects first tracked since; a sync that fails gives both back with `restore`."""
        changes = []
        for subject in self._changed:
            counters = self._counters[subject]
            changes.append(CountChange(
                subject, counters.unsynced_requests, counters.unsynced_tokens,
                counters.in_flight, counters.day, counters.day_tokens,
                counters.requests.level(now) if counters.requests is not None else None,
                counters.tokens.level(now) if counters.tokens is not None else None))
            counters.unsynced_requests = counters.unsynced_tokens = 0
        new, self._changed, self._new = self._new, set(), set()
        return changes, new

    def restore(self, changes: list[CountChange], new: set[str]) -> None:
        """Take back what a failed sync did not share, to share it at the next."""
        for change in changes:
            counters = self._counters.get(change.subject)
            if counters is not None:
                counters.unsynced_requests += change.requests
                counters.unsynced_tokens += change.tokens
                self._changed.add(change.subject)
        self._new |= {subject for subject in new if subject in self._counters}

    def headers(self, subjects: list[tuple[str, Limits]], now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit headers, for the tightest of the subjects' minute limits."""
        out: dict[str, str] = {}
        for name in ("requests", "tokens"):
            tightest = None
            for subject, _ in subjects:
                counters = self._counters.get(subject)
                bucket = getattr(counters, name) if counters else None
                if bucket is None:
                    continue
                if tightest is None or bucket.level(now) < tightest.tokens:
                    tightest = bucket
            if tightest is not None:
                out[f"x-ratelimit-limit-{name}"] = str(int(tightest.burst))
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(tightest.tokens)))
                out[f"x-ratelimit-reset-{name}"] = _duration(
                    (tightest.burst - tightest.tokens) / tightest.rate)
        return out
