"""Login lockouts: a few failures free, then waits that double; per user and per address."""

import pytest

from server.errors import LoginThrottled
from server.login_throttle import (FREE_FAILURES_ADDRESS, FREE_FAILURES_USER, MAX_LOCK_S,
                                   LoginThrottle)


def fail(throttle, times, user="alice", address="10.0.0.1", now=0.0):
    for _ in range(times):
        throttle.failed(user, address, now)


def test_a_few_failures_are_free():
    throttle = LoginThrottle()
    fail(throttle, FREE_FAILURES_USER)
    throttle.check("alice", "10.0.0.1", now=0)


def test_past_them_each_failure_locks_twice_as_long():
    throttle = LoginThrottle()
    fail(throttle, FREE_FAILURES_USER + 1)
    with pytest.raises(LoginThrottled) as refused:
        throttle.check("alice", "10.0.0.2", now=0.5)  # another address: still this user
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
    throttle.check("alice", "10.0.0.2", now=1.0)
    fail(throttle, 1, now=1.0)
    with pytest.raises(LoginThrottled):
        throttle.check("alice", "10.0.0.1", now=2.9)
    throttle.check("alice", "10.0.0.1", now=3.0)


def test_the_lockout_is_capped():
    throttle = LoginThrottle()
    fail(throttle, FREE_FAILURES_USER + 40)
    with pytest.raises(LoginThrottled) as refused:
        throttle.check("alice", "x", now=0)
    assert int(refused.value.headers["Retry-After"]) == MAX_LOCK_S


def test_a_success_clears_the_user_but_not_a_guessing_address():
    throttle = LoginThrottle()
    for number in range(FREE_FAILURES_ADDRESS + 1):  # one address, many users
        throttle.failed(f"user{number}", "10.0.0.9", 0)
    throttle.succeeded("user0")
    with pytest.raises(LoginThrottled):
        throttle.check("someone", "10.0.0.9", now=0)
    throttle.check("someone", "10.0.0.8", now=0)
