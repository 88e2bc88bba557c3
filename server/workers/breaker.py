"""A worker whose requests keep failing is taken out of placement for a while (a circuit breaker).

Without it a worker that fails every request at once (its upstream down, its engine broken in a
way that does not kill it) finishes its jobs fastest, so it looks least busy and draws the most
traffic. After `TRIP_AFTER` engine failures in a row it gets nothing for a pause that doubles
from `FIRST_PAUSE_S` to `MAX_PAUSE_S`; then it is tried again, and one more failure pauses it
again, while one success closes the breaker.

"In a row" is judged once the requests the worker held when the run of failures began have
answered: a request that fails at once overtakes a request of the same batch that succeeds a
second later, so failures counted while those still run say nothing yet about the worker (a few
bad requests in a batch would otherwise pause a sound worker, and with it every request behind
them). Requests sent after the run began do not delay the verdict, so steady traffic to a
broken worker cannot keep it from pausing.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

TRIP_AFTER = 5
FIRST_PAUSE_S = 1.0
MAX_PAUSE_S = 30.0


@dataclass
class Breaker:
    failures: int = 0  # engine failures in a row
    pause_s: float = 0.0
    paused_until: float = 0.0
    awaited: set[str] = field(default_factory=set)  # held when the failures began, unanswered

    def failed(self, now: float, running: Collection[str] = ()) -> bool:
        """Count one failure; True if the worker must pause now (until `paused_until`).

        `running`: the worker's requests still unanswered, any of which may yet succeed."""
        if not self.failures:
            self.awaited = set(running)  # what may still prove the worker sound
        else:
            self.awaited.intersection_update(running)  # those answered since: not any more
        self.failures += 1
        if self.failures < TRIP_AFTER or self.awaited:
            return False
        self.pause_s = min(MAX_PAUSE_S, self.pause_s * 2 if self.pause_s else FIRST_PAUSE_S)
        self.paused_until = now + self.pause_s
        return True

    def succeeded(self) -> None:
        self.failures = 0
        self.pause_s = 0.0

    def may_resume(self, now: float) -> bool:
        return now >= self.paused_until
