"""The front's repeated store work (leases, housekeeping, limit sync), one rule for all of it: a
round the store cannot do now (locked, restarting, unreachable) is logged and done again next
period, never the end of the front. Requests keep being served meanwhile; what the round keeps
(a lease, a shared count) degrades as each caller's docstring says. Any other error is a bug and
still ends the front (status 70), so its keeper restarts it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import peewee
import trio

log = logging.getLogger("cohort.periodic")

STORE_ERRORS = (peewee.PeeweeException,)  # peewee wraps every driver's errors in these
LOG_EVERY = 60  # after the first failure with its traceback, one line per this many failures


@dataclass
class Streak:
    """Failed rounds in a row, for `/health` to show (0: the last round worked)."""

    failures: int = 0


async def every(period_s: float, round_: Callable[[], Awaitable[object]], *, what: str,
                meanwhile: str = "", first_now: bool = False, streak: Streak | None = None) -> None:
    """Run `round_` every `period_s` seconds, for good. `what` names it in the log; `meanwhile`
    says what holds while the store fails; `streak` counts the failures in a row."""
    streak = streak or Streak()
    if not first_now:
        await trio.sleep(period_s)
    while True:
        try:
            await round_()
        except STORE_ERRORS as error:
            streak.failures += 1
            if streak.failures == 1 or streak.failures % LOG_EVERY == 0:
                log.warning("%s failed (%s; %d in a row)%s; tried again every %g s", what, error,
                            streak.failures, f"; {meanwhile}" if meanwhile else "", period_s,
                            exc_info=streak.failures == 1)
        else:
            if streak.failures:
                log.info("%s works again after %d failed round(s)", what, streak.failures)
            streak.failures = 0
        await trio.sleep(period_s)
