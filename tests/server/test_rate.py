"""The token bucket behind hello and login limits."""

from server.rate import TokenBucket


def test_a_burst_then_the_rate():
    bucket = TokenBucket(rate=2, burst=3)
    assert [bucket.take(now=0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s(now=0) == 0.5
    assert not bucket.take(now=0.4) and bucket.take(now=0.5)


def test_idle_time_refills_only_up_to_the_burst():
    bucket = TokenBucket(rate=1, burst=2)
    bucket.take(now=0)
    bucket.take(now=0)
    assert bucket.take(now=1000) and bucket.take(now=1000) and not bucket.take(now=1000)


def test_a_forced_take_leaves_a_debt_that_is_paid_back_by_the_rate():
    bucket = TokenBucket(rate=1, burst=2)
    bucket.force_take(now=0, amount=5)
    assert bucket.level(now=0) == -3 and bucket.wait_s(now=0) == 4
    assert not bucket.take(now=3.5) and bucket.take(now=4)
