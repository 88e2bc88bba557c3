"""Per user and per API key limits, checked in memory on the hot path: requests per minute,
tokens per minute, concurrent requests and tokens per day, with OpenAI's 429s and headers.

A request is admitted only if every subject it counts against (its user, and its key) has room;
then it is counted against all of them at once. Tokens are charged up front at the request's
cost (its prompt's estimated tokens plus the `max_tokens` it asks for) and settled when it ends
against what it really used, so a short answer gives back what it did not take. Each front
counts for itself: with N fronts behind a balancer a subject may get up to N times its limits
(the bound on overshoot); give each front 1/N of a limit where that matters.

The headers are OpenAI's: `x-ratelimit-limit-requests`, `x-ratelimit-remaining-requests`,
`x-ratelimit-reset-requests` (and `-tokens`), on every response of a limited subject.
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass, field

from server.errors import QuotaExceeded, RateLimited
from server.scheduling.rate import TokenBucket

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
    """What one subject has used, as this front counted it."""

    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    in_flight: int = 0
    day: datetime.date | None = None
    day_tokens: int = 0


@dataclass
class Ticket:
    """An admitted request's hold on its subjects, given back by `Limiter.settle`."""

    subjects: list[tuple[str, Limits]]
    charged: int
    headers: dict[str, str] = field(default_factory=dict)


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `1h2m3s`."""
    seconds = max(0, math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if hours or minutes else "") + f"{secs}s"


class Limiter:
    def __init__(self) -> None:
        self._counters: dict[str, Counters] = {}

    def _of(self, subject: str, limits: Limits, now: float) -> Counters:
        counters = self._counters.get(subject)
        if counters is None:
            if len(self._counters) >= MAX_SUBJECTS:
                idle = next((s for s, c in self._counters.items() if not c.in_flight), None)
                if idle is not None:
                    del self._counters[idle]
            counters = self._counters[subject] = Counters()
        if limits.rpm and (counters.requests is None or counters.requests.burst != limits.rpm):
            counters.requests = TokenBucket(limits.rpm / 60, limits.rpm, updated=now)
        if limits.tpm and (counters.tokens is None or counters.tokens.burst != limits.tpm):
            counters.tokens = TokenBucket(limits.tpm / 60, limits.tpm, updated=now)
        return counters

    def admit(self, subjects: list[tuple[str, Limits]], cost: int, now: float,
              today: datetime.date) -> Ticket:
        """Count a request of `cost` tokens against every limited subject, or refuse it with a
        429 that says which limit and when to retry (nothing is counted then)."""
        limited = [(subject, limits) for subject, limits in subjects if limits.limiting]
        for subject, limits in limited:
            self._check(subject, limits, cost, now, today)
        for subject, limits in limited:
            counters = self._of(subject, limits, now)
            if counters.requests is not None:
                counters.requests.take(now)
            if counters.tokens is not None:
                counters.tokens.take(now, min(cost, counters.tokens.burst))
            counters.in_flight += 1
            counters.day_tokens += cost
        ticket = Ticket(limited, cost)
        ticket.headers = self.headers(limited, now)
        return ticket

    def _check(self, subject: str, limits: Limits, cost: int, now: float,
               today: datetime.date) -> None:
        counters = self._of(subject, limits, now)
        if counters.day != today:
            counters.day, counters.day_tokens = today, 0
        who = subject.split(":")[0]

        def headers() -> dict[str, str]:  # built only for a refusal: admitting stays cheap
            return self.headers([(subject, limits)], now)

        if limits.tokens_per_day and counters.day_tokens + cost > limits.tokens_per_day:
            midnight = datetime.datetime.combine(today + datetime.timedelta(days=1),
                                                 datetime.time())
            wait = (midnight - datetime.datetime.now(datetime.timezone.utc).replace(
                tzinfo=None)).total_seconds()
            raise QuotaExceeded(
                f"this {who}'s quota of {limits.tokens_per_day} tokens a day is used up "
                f"({counters.day_tokens} so far, this request may take {cost}); it renews at "
                "midnight UTC", headers={**headers(), "Retry-After": str(max(1, math.ceil(wait)))})
        if limits.concurrency and counters.in_flight >= limits.concurrency:
            raise RateLimited(f"this {who} has {counters.in_flight} requests running, its limit "
                              f"is {limits.concurrency} at once",
                              headers={**headers(), "Retry-After": "1"})
        for bucket, name, amount, per in ((counters.requests, "requests", 1, limits.rpm),
                                          (counters.tokens, "tokens", cost, limits.tpm)):
            if bucket is None:
                continue
            # a request above a whole minute's worth waits for a full bucket, not forever
            wait = bucket.wait_s(now, min(amount, bucket.burst))
            if wait > 0:
                raise RateLimited(
                    f"rate limit reached for this {who}: {per} {name} per minute; retry in "
                    f"{wait:.1f} s", headers={**headers(), "Retry-After": str(max(1, math.ceil(wait)))})

    def settle(self, ticket: Ticket, used_tokens: int | None, now: float) -> None:
        """The request ended: free its concurrency slot, give back the tokens it did not use."""
        refund = 0 if used_tokens is None else max(0, ticket.charged - used_tokens)
        for subject, _ in ticket.subjects:
            counters = self._counters.get(subject)
            if counters is None:
                continue
            counters.in_flight = max(0, counters.in_flight - 1)
            counters.day_tokens = max(0, counters.day_tokens - refund)
            if counters.tokens is not None and refund:
                counters.tokens.give_back(now, refund)

    def headers(self, subjects: list[tuple[str, Limits]], now: float) -> dict[str, str]:
        """OpenAI's x-ratelimit headers, for the tightest of the subjects' minute limits."""
        out: dict[str, str] = {}
        for name, attr in (("requests", "requests"), ("tokens", "tokens")):
            tightest = None
            for subject, limits in subjects:
                counters = self._counters.get(subject)
                bucket = getattr(counters, attr) if counters else None
                if bucket is None:
                    continue
                if tightest is None or bucket.level(now) < tightest.tokens:
                    tightest = bucket
            if tightest is not None:
                out[f"x-ratelimit-limit-{name}"] = str(int(tightest.burst))
                out[f"x-ratelimit-remaining-{name}"] = str(int(tightest.tokens))
                out[f"x-ratelimit-reset-{name}"] = _duration(
                    (tightest.burst - tightest.tokens) / tightest.rate)
        return out
