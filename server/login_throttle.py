"""Password guessing gets slower and slower: per user and per client address, in memory.

A few failures are free (people mistype); after that each failure locks the user (or address)
out for twice as long as the last, from 1 s up to 15 minutes, and a login attempt while locked
out is a 429 with `Retry-After`, without checking the password at all (so a guess in the lockout
costs no bcrypt and tells nothing). A success clears the user's count. An address gets a larger
free budget than a user, since one address may hold many honest users. The counts live in each
front's memory: with N fronts a guesser gets at most N times the attempts.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import LoginThrottled

FREE_FAILURES_USER = 5
FREE_FAILURES_ADDRESS = 20
FIRST_LOCK_S = 1.0
MAX_LOCK_S = 900.0
FORGET_AFTER_S = 3600.0  # an hour without a failure starts over
MAX_TRACKED = 100_000  # users and addresses remembered at once (beyond: the oldest go)


@dataclass
class Record:
    failures: int = 0
    last_failure: float = 0.0
    locked_until: float = 0.0


class LoginThrottle:
    def __init__(self) -> None:
        self._records: dict[tuple[str, str], Record] = {}

    def check(self, username: str, address: str, now: float) -> None:
        """Refuse an attempt while its user or its address is locked out."""
        wait = max(self._locked_for(("user", username), now),
                   self._locked_for(("address", address), now))
        if wait > 0:
            seconds = max(1, round(wait + 0.499))
            raise LoginThrottled(
                f"too many failed logins for this user or from this address; retry in "
                f"{seconds} s", headers={"Retry-After": str(seconds)})

    def failed(self, username: str, address: str, now: float) -> None:
        self._fail(("user", username), FREE_FAILURES_USER, now)
        self._fail(("address", address), FREE_FAILURES_ADDRESS, now)

    def succeeded(self, username: str) -> None:
        self._records.pop(("user", username), None)

    def _locked_for(self, key: tuple[str, str], now: float) -> float:
        record = self._records.get(key)
        return 0.0 if record is None else record.locked_until - now

    def _fail(self, key: tuple[str, str], free: int, now: float) -> None:
        record = self._records.get(key)
        if record is None or now - record.last_failure > FORGET_AFTER_S:
            if len(self._records) >= MAX_TRACKED:
                del self._records[next(iter(self._records))]
            record = self._records[key] = Record()
        record.failures += 1
        record.last_failure = now
        over = record.failures - free
        if over > 0:
            record.locked_until = now + min(MAX_LOCK_S, FIRST_LOCK_S * 2 ** (over - 1))
