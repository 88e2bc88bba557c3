"""The batching loop's one decision, as a plain function of what it sees: no tasks, no clock."""

import math

from server.scheduling.policy import (INTERACTIVE, QueueView, SchedulingPolicy, SendShort, Take,
                                      Wait)

POLICY = SchedulingPolicy(max_batch_size=8, max_wait_s=0.1)


def view(**seen) -> QueueView:
    return QueueView(**{"now": 10.0, "room": 0, "backlog_room": 4, "headroom": 2,
                        "recent_until": 12.0, "oldest_interactive": 10.0, **seen})


def test_room_sends_at_once_up_to_the_batch_size_less_the_headroom_for_batch_work():
    assert POLICY.decide(view(room=20)) == Take(8, lower_max=18)
    assert POLICY.decide(view(room=3)) == Take(3, lower_max=1)


def test_batch_work_alone_leaves_the_headroom_free_while_interactive_traffic_is_recent():
    assert POLICY.decide(view(room=2, oldest_interactive=None)) == Wait(until=12.0)
    assert POLICY.decide(view(room=2, oldest_interactive=None, now=12.0)) == Take(2, lower_max=2)


def test_full_workers_gather_interactive_work_for_the_window_then_force_it_within_the_backlog():
    assert POLICY.decide(view(now=10.05)) == Wait(until=10.1)
    assert POLICY.decide(view(now=10.1)) == Take(4, INTERACTIVE, force=True)
    assert POLICY.decide(view(now=10.1, backlog_room=0)) == Wait(queue_too=False)


def test_batch_work_is_never_forced_and_users_below_their_share_skip_the_window():
    assert POLICY.decide(view(oldest_interactive=None, now=99.0)) == Wait(until=math.inf)
    assert POLICY.decide(view(short={"user:2": 3})) == SendShort({"user:2": 3})


def test_without_fair_shares_there_is_no_headroom_backlog_or_priority():
    fifo = SchedulingPolicy(fair=False, max_batch_size=8)
    assert fifo.decide(view(room=2, oldest_interactive=None)) == Take(2, lower_max=2)
    assert (fifo.engine_backlog, fifo.headroom(256), fifo.priorities([], [])) == (0.0, 0, [])
    assert (POLICY.engine_backlog, POLICY.headroom(256)) == (0.25, 32)
