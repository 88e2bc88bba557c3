"""A token bucket: at most `rate` events a second, in bursts of at most `burst`.

Time is passed in (trio.current_time() in the front), so tests drive it with trio's MockClock or
plain numbers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def level(self, now: float) -> float:
        """What there is to take now."""
        self._refill(now)
        return self.tokens

    def give_back(self, now: float, amount: float) -> None:
        """Return `amount` taken earlier and not used (never above the burst)."""
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + amount)

    def force_take(self, now: float, amount: float) -> None:
        """Spend `amount` whether or not there is that much (it was spent elsewhere: another
        front, or a batch larger than the burst): the bucket may go into debt, below zero, and
        refills from there, so the excess is paid back, not forgiven."""
        self._refill(now)
        self.tokens -= amount

    def take(self, now: float, amount: float = 1.0) -> bool:
        """Spend `amount` if there is that much now; False (and nothing spent) if not."""
        self._refill(now)
        if self.tokens < amount:
            return False
        self.tokens -= amount
        return True

    def wait_s(self, now: float, amount: float = 1.0) -> float:
        """Seconds until `amount` could be taken (0 if it can now)."""
        self._refill(now)
        return max(0.0, (amount - self.tokens) / self.rate) if self.rate > 0 else float("inf")
