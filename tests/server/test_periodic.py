"""The front's repeated store work: a round the store refuses is done again next period, and the
front lives on; a bug still ends it."""

import logging

import peewee
import pytest
import trio
import trio.testing

from server.periodic import Streak, every


async def test_a_round_the_store_refuses_is_tried_again_next_period_and_recovery_is_said(
        autojump_clock, caplog):
    rounds: list[float] = []

    async def round_() -> None:
        rounds.append(trio.current_time())
        if len(rounds) in (2, 3):
            raise peewee.OperationalError("database is locked")

    caplog.set_level(logging.INFO, "cohort.periodic")
    streak = Streak()
    with trio.move_on_after(6.5):
        await every(2.0, round_, what="renewing leases", meanwhile="tasks run on", streak=streak)
    assert streak.failures == 2  # what /health shows
    with trio.move_on_after(4.5):
        await every(2.0, round_, what="renewing leases", meanwhile="tasks run on", streak=streak)
    assert rounds == [2.0, 4.0, 6.0, 8.5, 10.5]  # every period, failures or not
    assert streak.failures == 0
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("renewing leases failed (database is locked; 1 in a row); "
                                  "tasks run on")
    assert messages[1:] == ["renewing leases works again after 2 failed round(s)"]  # not each one


async def test_the_first_round_may_run_at_once(autojump_clock):
    rounds: list[float] = []

    async def round_() -> None:
        rounds.append(trio.current_time())

    with trio.move_on_after(7):
        await every(3.0, round_, what="housekeeping", first_now=True)
    assert rounds == [0.0, 3.0, 6.0]


async def test_an_error_that_is_not_the_stores_is_a_bug_and_ends_the_loop(autojump_clock):
    async def round_() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await every(1.0, round_, what="housekeeping")
