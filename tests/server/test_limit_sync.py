"""How the other fronts' counts enter a front's Limiter, with plain numbers for time: deltas taken
from the buckets (into debt), a subject begun here starting from the tightest view, in flight on
live fronts only, today's tokens, refunds, rows pruned and begun again."""

import datetime

import pytest

from server.errors import QuotaExceeded, RateLimited
from server.limit_sync import RemoteCounts
from server.limits import Limiter, Limits
from server.store import FrontCount

DAY = datetime.date(2026, 11, 26)
WALL = datetime.datetime(2026, 11, 26, 12, 0, 0)
STALE_S = 6.0


def row(subject="user:1", front="front-a", requests=0, tokens=0, in_flight=0, day=DAY,
        day_tokens=0, requests_left=None, tokens_left=None, at=WALL) -> FrontCount:
    return FrontCount(front, subject, requests, tokens, in_flight, day, day_tokens,
                      requests_left, tokens_left, at)


def front(limits: Limits, admitted: int = 1):
    """A front's Limiter that has admitted `admitted` requests of 10 tokens for `user:1` and has
    synced once since (so it reads others' deltas, not their whole rows)."""
    limiter = Limiter()
    subjects = [("user:1", limits)]
    for _ in range(admitted):
        limiter.admit(subjects, 10, now=0, today=DAY)
    limiter.take_changes(now=0)
    return limiter, subjects, RemoteCounts(limiter, STALE_S)


def remaining(limiter, subjects, now=0) -> str:
    return limiter.headers(subjects, now)["x-ratelimit-remaining-requests"]


def test_another_fronts_requests_are_taken_from_the_buckets_by_their_deltas():
    limiter, subjects, remote = front(Limits(rpm=10))
    remote.merge([row(requests=4)], set(), [], now=0, wall=WALL)  # new row: all of it is new
    assert remaining(limiter, subjects) == "5"
    remote.merge([row(requests=4)], set(), [], now=0, wall=WALL)  # read again: nothing new
    assert remaining(limiter, subjects) == "5"
    remote.merge([row(requests=11)], set(), [], now=0, wall=WALL)  # 7 more: a debt of 2
    assert remaining(limiter, subjects) == "0"
    with pytest.raises(RateLimited) as refused:
        limiter.admit(subjects, 10, now=0, today=DAY)
    assert refused.value.headers["Retry-After"] == "18"  # 3 requests at 1 every 6 s
    limiter.admit(subjects, 10, now=18, today=DAY)


def test_a_subject_begun_here_starts_from_the_tightest_view_of_the_others():
    limiter = Limiter()
    subjects = [("user:1", Limits(rpm=10))]
    limiter.admit(subjects, 10, now=0, today=DAY)
    written, new = limiter.take_changes(now=0)
    assert new == {"user:1"} and written[0].requests == 1
    remote = RemoteCounts(limiter, STALE_S)
    # front A has served this user for long; its bucket held 2 when it wrote, 6 s ago (+1 since)
    older = row(requests=500, requests_left=2, at=WALL - datetime.timedelta(seconds=6))
    idle = row(front="front-c", requests=80, requests_left=0,
               at=WALL - datetime.timedelta(hours=1))  # refilled long since: no bearing
    remote.merge([older, idle], new, written, now=0, wall=WALL)
    assert remaining(limiter, subjects) == "2"  # A's 3, less the 1 taken here since
    remote.merge([row(requests=501, at=WALL)], set(), [], now=0, wall=WALL)
    assert remaining(limiter, subjects) == "1"


def test_a_subject_first_seen_during_a_sync_waits_for_the_next_one():
    limiter, subjects, remote = front(Limits(rpm=10), admitted=0)
    limiter.admit(subjects, 10, now=0, today=DAY)  # tracked after the sync took its changes
    remote.merge([row(requests=500)], set(), [], now=0, wall=WALL)
    assert remaining(limiter, subjects) == "9"  # not 500 taken: it is read whole next time


def test_requests_in_flight_elsewhere_count_until_their_front_goes_quiet():
    limiter, subjects, remote = front(Limits(concurrency=3))
    remote.merge([row(in_flight=2)], set(), [], now=0, wall=WALL)
    with pytest.raises(RateLimited, match="3 requests running"):
        limiter.admit(subjects, 10, now=0, today=DAY)
    later = WALL + datetime.timedelta(seconds=STALE_S - 1)
    remote.merge([], set(), [], now=1, wall=later)  # still alive
    with pytest.raises(RateLimited):
        limiter.admit(subjects, 10, now=1, today=DAY)
    remote.merge([], set(), [], now=2, wall=WALL + datetime.timedelta(seconds=STALE_S + 1))
    limiter.admit(subjects, 10, now=2, today=DAY)  # front A stopped writing: it holds nothing


def test_today_tokens_elsewhere_count_even_from_a_stopped_front_and_yesterdays_do_not():
    limiter, subjects, remote = front(Limits(tokens_per_day=100))
    gone = WALL - datetime.timedelta(hours=3)
    remote.merge([row(day_tokens=60, at=gone),
                  row(front="front-b", day=DAY - datetime.timedelta(days=1), day_tokens=90)],
                 set(), [], now=0, wall=WALL)
    with pytest.raises(QuotaExceeded, match="70 so far"):
        limiter.admit(subjects, 40, now=0, today=DAY)
    limiter.admit(subjects, 30, now=0, today=DAY)
    tomorrow = DAY + datetime.timedelta(days=1)
    limiter.admit(subjects, 90, now=0, today=tomorrow)  # yesterday's remote figure is gone


def test_a_refund_elsewhere_gives_tokens_back():
    limiter, subjects, remote = front(Limits(tpm=1000))
    remote.merge([row(tokens=900)], set(), [], now=0, wall=WALL)
    with pytest.raises(RateLimited):
        limiter.admit(subjects, 100, now=0, today=DAY)
    remote.merge([row(tokens=100)], set(), [], now=0, wall=WALL)  # it used 100 of its 900
    limiter.admit(subjects, 100, now=0, today=DAY)


def test_a_row_pruned_and_begun_again_counts_from_zero():
    limiter, subjects, remote = front(Limits(rpm=100))
    remote.merge([row(requests=50)], set(), [], now=0, wall=WALL)
    remote.merge([row(requests=3)], set(), [], now=0, wall=WALL)  # fewer than before: a new life
    assert remaining(limiter, subjects) == str(100 - 1 - 50 - 3)


def test_changes_are_handed_over_once_and_given_back_by_a_failed_sync():
    limiter = Limiter()
    subjects = [("user:1", Limits(rpm=10)), ("key:7", Limits(tpm=1000))]
    ticket = limiter.admit(subjects, 100, now=0, today=DAY)
    limiter.settle(ticket, used_tokens=30, now=0)
    changes, new = limiter.take_changes(now=0)
    assert new == {"user:1", "key:7"}
    by_subject = {change.subject: change for change in changes}
    assert (by_subject["user:1"].requests, by_subject["user:1"].tokens) == (1, 30)
    assert by_subject["user:1"].requests_left == 9 and by_subject["key:7"].tokens_left == 970
    assert by_subject["key:7"].requests_left is None and by_subject["key:7"].in_flight == 0
    assert limiter.take_changes(now=0) == ([], set())
    limiter.restore(changes, new)
    again, new_again = limiter.take_changes(now=0)
    assert {(c.subject, c.requests, c.tokens) for c in again} == {("user:1", 1, 30),
                                                                  ("key:7", 1, 30)}
    assert new_again == new


# --- two fronts on a real store (SQLite and PostgreSQL) -------------------------------------
# Time stands still (pytest-trio's mock_clock, moved by hand) and the wall clock is passed in:
# nothing here waits on real time.

def two_fronts(database_url):
    from server.limit_sync import LimitSync
    from server.store import Store

    store = Store(database_url)
    store.create_schema()
    a, b = Limiter(), Limiter()
    return store, (a, LimitSync(a, store, "front-a", 1.0)), (b, LimitSync(b, store, "front-b", 1.0))


def at(seconds: float) -> datetime.datetime:
    return WALL + datetime.timedelta(seconds=seconds)


async def sync_round(t: float, *syncs) -> None:
    for sync in syncs:
        await sync.sync(at(t))


async def test_a_rate_used_up_on_one_front_is_refused_on_the_other(database_url, mock_clock):
    store, (a, sync_a), (b, sync_b) = two_fronts(database_url)
    key = [("key:7", Limits(rpm=6))]
    a.admit(key, 10, now=0, today=DAY)
    b.admit(key, 10, now=0, today=DAY)
    await sync_round(0, sync_a, sync_b, sync_a)  # both count the key, each knows the other's one
    admitted = 0
    while True:
        try:
            a.admit(key, 10, now=0, today=DAY)
        except RateLimited:
            break
        admitted += 1
    assert admitted == 4  # the whole minute's 6, less the one each front took
    await sync_round(1, sync_a, sync_b)
    with pytest.raises(RateLimited) as refused:
        b.admit(key, 10, now=0, today=DAY)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    mock_clock.jump(10)  # one request's worth refilled, on both fronts alike
    b.admit(key, 10, now=10, today=DAY)
    await sync_round(2, sync_b, sync_a)
    with pytest.raises(RateLimited):
        a.admit(key, 10, now=10, today=DAY)


async def test_requests_in_flight_count_across_fronts_until_their_front_is_gone(database_url,
                                                                                 mock_clock):
    store, (a, sync_a), (b, sync_b) = two_fronts(database_url)
    key = [("key:7", Limits(concurrency=2))]
    b.admit(key, 10, now=0, today=DAY)
    tickets = [a.admit(key, 10, now=0, today=DAY), a.admit(key, 10, now=0, today=DAY)]
    await sync_round(0, sync_b, sync_a, sync_b)
    with pytest.raises(RateLimited, match="3 requests running"):
        b.admit(key, 10, now=0, today=DAY)
    a.settle(tickets.pop(), used_tokens=10, now=0)
    await sync_round(1, sync_a, sync_b)
    with pytest.raises(RateLimited, match="2 requests running"):
        b.admit(key, 10, now=0, today=DAY)
    # A holds its request for a long stream: its row is kept alive by each of its syncs
    await sync_round(15, sync_a, sync_b)
    with pytest.raises(RateLimited):
        b.admit(key, 10, now=0, today=DAY)
    # then A stops (killed: no more syncs); once its row is stale, its in flight stop counting
    await sync_round(15 + 5 * 1.0 + 5.0 - 1, sync_b)
    with pytest.raises(RateLimited):
        b.admit(key, 10, now=0, today=DAY)
    await sync_round(15 + 5 * 1.0 + 5.0 + 1, sync_b)
    b.admit(key, 10, now=0, today=DAY)


async def test_todays_tokens_of_a_stopped_front_count_and_old_rows_are_pruned(database_url,
                                                                           mock_clock):
    store, (a, sync_a), (b, sync_b) = two_fronts(database_url)
    key = [("key:7", Limits(tokens_per_day=100))]
    a.admit(key, 70, now=0, today=DAY)
    await sync_round(0, sync_a)
    b.admit(key, 10, now=0, today=DAY)
    await sync_round(3600, sync_b)  # A stopped long ago; its tokens of today still count
    with pytest.raises(QuotaExceeded, match="80 so far"):
        b.admit(key, 30, now=0, today=DAY)
    assert await store.run(store.prune_limit_counts, at(-1)) == 0
    mock_clock.jump(3600)  # B's hourly prune is due at its next sync: A's row is days old,
    await sync_round(3 * 86400, sync_b)  # B's is alive (its request still runs)
    rows = await store.run(store.sync_limit_counts, "front-c", [], at(-10), ["key:7"],
                           at(3 * 86400))
    assert [(row.front, row.in_flight, row.updated_at) for row in rows] == [
        ("front-b", 1, at(3 * 86400))]
