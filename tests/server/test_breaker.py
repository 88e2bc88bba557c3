"""The circuit breaker that pauses a worker whose requests keep failing."""

from server.workers.breaker import FIRST_PAUSE_S, MAX_PAUSE_S, TRIP_AFTER, Breaker


def test_it_trips_only_after_enough_failures_in_a_row():
    breaker = Breaker()
    assert not any(breaker.failed(now=0) for _ in range(TRIP_AFTER - 1))
    breaker.succeeded()
    assert not any(breaker.failed(now=0) for _ in range(TRIP_AFTER - 1))
    assert breaker.failed(now=10)
    assert breaker.paused_until == 10 + FIRST_PAUSE_S
    assert not breaker.may_resume(10 + FIRST_PAUSE_S / 2) and breaker.may_resume(10 + FIRST_PAUSE_S)


def test_after_a_pause_one_failure_pauses_again_for_twice_as_long_up_to_the_cap():
    breaker = Breaker()
    for _ in range(TRIP_AFTER):
        breaker.failed(now=0)
    pauses = []
    for _ in range(10):
        assert breaker.failed(now=0)
        pauses.append(breaker.pause_s)
    assert pauses[:2] == [2 * FIRST_PAUSE_S, 4 * FIRST_PAUSE_S] and pauses[-1] == MAX_PAUSE_S


def test_one_success_closes_the_breaker():
    breaker = Breaker()
    for _ in range(TRIP_AFTER):
        breaker.failed(now=0)
    breaker.succeeded()
    assert breaker.failures == 0 and not breaker.failed(now=0)


def test_failures_do_not_trip_it_while_requests_that_may_succeed_still_run():
    """Fast failures overtake slow successes of the same batch: the verdict waits for them."""
    breaker = Breaker()
    slow = {"a", "b", "c"}
    assert not any(breaker.failed(now=0, running=slow) for _ in range(3 * TRIP_AFTER))
    breaker.succeeded()  # one of the slow ones succeeded: the worker is sound
    assert breaker.failures == 0
    assert not any(breaker.failed(now=0, running={"d"}) for _ in range(TRIP_AFTER))
    assert breaker.failed(now=0, running=set())  # the last one failed too: every request failed


def test_requests_sent_after_the_failures_began_do_not_hold_the_verdict_off():
    """Steady traffic to a broken worker: something new is always in flight, yet it pauses."""
    breaker = Breaker()
    assert not breaker.failed(now=0, running={"first batch"})
    verdicts = [breaker.failed(now=0, running={f"new {i}"}) for i in range(TRIP_AFTER)]
    assert verdicts[-1] and not any(verdicts[:TRIP_AFTER - 2])
