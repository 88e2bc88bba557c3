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
