"""Limits per user and key, in virtual time: RPM, TPM settled on use, concurrency, daily quota,
and OpenAI's headers."""

import datetime

import pytest

from server.errors import QuotaExceeded, RateLimited
from server.limits import Limiter, Limits

DAY = datetime.date(2026, 11, 26)


def test_requests_per_minute_refill_over_the_minute():
    limiter = Limiter()
    user = [("user:1", Limits(rpm=2))]
    limiter.admit(user, 10, now=0, today=DAY)
    ticket = limiter.admit(user, 10, now=0, today=DAY)
    assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
    assert ticket.headers["x-ratelimit-reset-requests"] == "1m0s"
    with pytest.raises(RateLimited) as refused:
        limiter.admit(user, 10, now=1, today=DAY)
    assert refused.value.status == 429 and refused.value.code == "rate_limit_exceeded"
    assert refused.value.headers["Retry-After"] == "29"
    limiter.admit(user, 10, now=30, today=DAY)


def test_tokens_are_charged_up_front_and_given_back_when_unused():
    limiter = Limiter()
    key = [("key:7", Limits(tpm=1000))]
    ticket = limiter.admit(key, 800, now=0, today=DAY)
    with pytest.raises(RateLimited):
        limiter.admit(key, 300, now=0, today=DAY)
    limiter.settle(ticket, used_tokens=100, now=0)  # it asked for 800 and used 100
    limiter.admit(key, 300, now=0, today=DAY)


def test_concurrency_counts_requests_until_they_end():
    limiter = Limiter()
    user = [("user:1", Limits(concurrency=1))]
    ticket = limiter.admit(user, 10, now=0, today=DAY)
    with pytest.raises(RateLimited):
        limiter.admit(user, 10, now=0, today=DAY)
    limiter.settle(ticket, used_tokens=10, now=0)
    limiter.admit(user, 10, now=0, today=DAY)


def test_a_daily_quota_is_insufficient_quota_until_the_next_day():
    limiter = Limiter()
    user = [("user:1", Limits(tokens_per_day=100))]
    limiter.admit(user, 60, now=0, today=DAY)
    with pytest.raises(QuotaExceeded) as refused:
        limiter.admit(user, 60, now=0, today=DAY)
    assert refused.value.code == "insufficient_quota"
    limiter.admit(user, 60, now=0, today=DAY + datetime.timedelta(days=1))


def test_a_request_counts_against_its_user_and_its_key_or_neither():
    limiter = Limiter()
    subjects = [("user:1", Limits(rpm=10)), ("key:7", Limits(rpm=1))]
    limiter.admit(subjects, 1, now=0, today=DAY)
    with pytest.raises(RateLimited):
        limiter.admit(subjects, 1, now=0, today=DAY)  # the key is out; the user is not charged
    other_key = [("user:1", Limits(rpm=10)), ("key:8", Limits())]
    ticket = limiter.admit(other_key, 1, now=0, today=DAY)
    assert ticket.headers["x-ratelimit-remaining-requests"] == "8"


def test_unlimited_subjects_cost_nothing_and_get_no_headers():
    limiter = Limiter()
    ticket = limiter.admit([("user:1", Limits())], 10, now=0, today=DAY)
    assert ticket.headers == {} and ticket.subjects == []


def test_a_batch_counts_its_requests_and_costs_all_or_none_without_a_concurrency_slot():
    limiter = Limiter()
    user = [("user:1", Limits(rpm=5, tpm=1000, concurrency=1))]
    limiter.admit(user, 10, now=0, today=DAY)  # one request in flight: the slot is taken
    tickets = limiter.admit_batch(user, [100, 200, 300], now=0, today=DAY)
    assert [t.charged for t in tickets] == [100, 200, 300] and not tickets[0].holds_slot
    assert tickets[0].headers["x-ratelimit-remaining-requests"] == "1"
    with pytest.raises(RateLimited, match="this batch counts 2"):
        limiter.admit_batch(user, [1, 1], now=0, today=DAY)
    limiter.settle(tickets[2], used_tokens=50, now=0)  # each item settles its own
    assert limiter.headers(user, 0)["x-ratelimit-remaining-tokens"] == str(1000 - 610 + 250)
    with pytest.raises(RateLimited, match="1 requests running"):
        limiter.admit(user, 10, now=0, today=DAY)  # settling a task freed no slot


def test_a_batch_over_a_whole_minute_waits_for_a_full_bucket_then_owes_the_rest():
    limiter = Limiter()
    user = [("user:1", Limits(rpm=4))]
    limiter.admit(user, 1, now=0, today=DAY)
    with pytest.raises(RateLimited):
        limiter.admit_batch(user, [1] * 10, now=0, today=DAY)
    limiter.admit_batch(user, [1] * 10, now=15, today=DAY)  # full again: it takes 10 of 4
    with pytest.raises(RateLimited) as refused:
        limiter.admit(user, 1, now=15, today=DAY)
    assert refused.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.headers["Retry-After"] == "105"  # 7 requests at one every 15 s


def test_a_refund_after_midnight_leaves_the_new_days_quota_alone():
    limiter = Limiter()
    user = [("user:1", Limits(tokens_per_day=100))]
    ticket = limiter.admit(user, 90, now=0, today=DAY)
    tomorrow = DAY + datetime.timedelta(days=1)
    limiter.admit(user, 90, now=0, today=tomorrow)
    limiter.settle(ticket, used_tokens=0, now=0)  # yesterday's refund
    with pytest.raises(QuotaExceeded):
        limiter.admit(user, 20, now=0, today=tomorrow)


def test_use_above_the_estimate_is_charged_so_a_quota_holds_against_real_use():
    """A request estimated at 13 tokens that used 26 costs 26: the quota of 100 is spent after
    four such requests (overshot by the last one only), and the fifth is refused."""
    limiter = Limiter()
    user = [("user:1", Limits(tokens_per_day=100))]
    served = 0
    with pytest.raises(QuotaExceeded):
        for _ in range(20):
            ticket = limiter.admit(user, 13, now=0, today=DAY)
            limiter.settle(ticket, used_tokens=26, now=0)
            served += 1
    assert served == 4  # 4 x 26 = 104: over by at most the one request that was in flight


def test_use_above_the_estimate_puts_the_token_bucket_into_debt():
    limiter = Limiter()
    key = [("key:7", Limits(tpm=60))]
    ticket = limiter.admit(key, 10, now=0, today=DAY)
    limiter.settle(ticket, used_tokens=90, now=0)  # 30 beyond a whole minute's worth
    with pytest.raises(RateLimited) as refused:
        limiter.admit(key, 10, now=0, today=DAY)
    assert refused.value.headers["Retry-After"] == "40"  # the debt of 30, then 10 more, at 1/s
    limiter.admit(key, 10, now=40, today=DAY)


def test_a_refusal_after_admission_gives_everything_back():
    limiter = Limiter()
    user = [("user:1", Limits(tokens_per_day=100, concurrency=1))]
    ticket = limiter.admit(user, 90, now=0, today=DAY)
    limiter.settle(ticket, used_tokens=0, now=0)  # refused at submit: nothing ran
    limiter.admit(user, 90, now=0, today=DAY)
