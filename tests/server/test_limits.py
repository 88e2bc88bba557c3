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
