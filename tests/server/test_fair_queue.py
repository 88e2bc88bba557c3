"""Fair shares in a model's queue: tiers, tenants' turns by tokens, per-tenant bounds; and the
scheduler never forcing batch work into a full engine (virtual time, trio's MockClock)."""

import pytest
import trio

from server.errors import QueueFull
from server.jobs import Job, JobSpec
from server.scheduling.policy import INTERACTIVE_RECENT_S
from server.scheduling.queue import batch_headroom, ModelQueue, under_share
from tests.server.test_scheduler import MAX_WAIT_S, RecordingSink, started


def job(tenant: str, *, tier: str = "interactive", cost: int = 20, at: float = 0.0) -> Job:
    spec = JobSpec("m", "completions", {"prompt": tenant}, cost=cost, tenant=tenant, tier=tier)
    return Job(spec, at, at + 60)


def tenants(jobs: list[Job]) -> str:
    return "".join(j.spec.tenant for j in jobs)


def test_a_flood_does_not_hold_back_another_tenants_few():
    queue = ModelQueue(max_size=2000)
    for i in range(1000):
        queue.push(job("A", at=i * 1e-3))
    for _ in range(8):
        queue.push(job("B", at=2.0))
    first = queue.take(32) + queue.take(32)
    assert tenants(first).count("B") == 8  # all of B's within the first two batches
    assert tenants(queue.take(32)) == "A" * 32  # and A has the engine to itself again


def test_turns_are_by_tokens_not_by_requests():
    queue = ModelQueue(max_size=100)
    for _ in range(20):
        queue.push(job("L", cost=256))  # long answers
        queue.push(job("S", cost=32))   # short ones
    taken = tenants(queue.take(20))
    assert taken.count("S") > 3 * taken.count("L")


def test_without_fair_shares_it_is_one_line_oldest_first():
    queue = ModelQueue(max_size=2000, fair=False)
    for i in range(100):
        queue.push(job("A", at=i))
    queue.push(job("B", at=100))
    assert "B" not in tenants(queue.take(100))


def test_batch_work_waits_while_interactive_work_waits():
    queue = ModelQueue(max_size=100)
    for _ in range(5):
        queue.push(job("A", tier="batch"))
    queue.push(job("B"))
    assert tenants(queue.take(3)) == "BAA"
    queue.push(job("C"))
    assert tenants(queue.take(1)) == "C"


def test_each_tenant_has_its_own_bound():
    queue = ModelQueue(max_size=3)
    for _ in range(3):
        queue.push(job("A"))
    with pytest.raises(QueueFull):
        queue.push(job("A"))
    queue.push(job("B"))  # A's flood filled A's line, not B's


def test_a_request_costlier_than_a_turn_still_leaves():
    queue = ModelQueue(max_size=10)
    queue.push(job("A", cost=100_000))
    assert len(queue.take(1)) == 1


async def test_batch_work_is_never_forced_into_a_full_engine(autojump_clock, nursery):
    sink = RecordingSink(free=0)
    scheduler = await started(sink, nursery=nursery)
    batch_job = job("A", tier="batch", at=trio.current_time())
    scheduler.submit(batch_job)
    await trio.sleep(10 * MAX_WAIT_S)
    assert sink.sent == []  # interactive work would have gone after the window; batch does not
    interactive = job("B", at=trio.current_time())
    scheduler.submit(interactive)
    await trio.sleep(2 * MAX_WAIT_S)
    assert [jobs for _, jobs, force in sink.sent] == [[interactive]]
    sink.set_free(4)
    await trio.sleep(0.01)
    assert sink.sent[-1][1] == [batch_job] and not sink.sent[-1][2]


def test_a_tenant_of_weight_two_gets_twice_the_tokens():
    queue = ModelQueue(max_size=100)
    for _ in range(40):
        heavy = job("W", cost=64)
        heavy.spec.weight = 2.0
        queue.push(heavy)
        queue.push(job("U", cost=64))
    taken = tenants(queue.take(24))
    assert taken.count("W") == 2 * taken.count("U")


def test_a_user_below_its_share_of_the_engines_is_short_by_the_difference():
    held = {"A": (16, 1.0), "B": (3, 1.0)}
    assert under_share({"A": 1.0, "B": 1.0}, held, capacity=16) == {"B": 5}
    assert under_share({"A": 1.0}, held, capacity=16) == {}  # A holds more than half
    heavy = {"A": (8, 3.0), "B": (3, 1.0)}  # weight 3 against 1: A's share is 12 of 16
    assert under_share({"A": 3.0, "B": 1.0}, heavy, capacity=16) == {"A": 4, "B": 1}
    assert under_share({"A": 1.0}, {}, capacity=16) == {}  # alone: no one to be fair to


async def test_a_user_below_its_share_skips_the_window_and_the_backlog(autojump_clock, nursery):
    sink = RecordingSink(free=0)
    sink.backlog = 0  # the engines' queues hold their bound of the busy user's work
    sink.seqs, sink.holding = 16, {"A": (18, 1.0), "B": (7, 1.0)}
    scheduler = await started(sink, nursery=nursery)
    flood = [job("A", at=trio.current_time()) for _ in range(5)]
    for queued in flood:
        scheduler.submit(queued)
    few = [job("B", at=trio.current_time()) for _ in range(3)]
    for queued in few:
        scheduler.submit(queued)
    await trio.sleep(0)
    await trio.sleep(0)
    assert sink.beyond == few[:1]  # B is one short of its 8, at once, with no window
    assert trio.current_time() == 0
    await trio.sleep(10 * MAX_WAIT_S)
    assert sink.beyond == few[:1]  # the rest of B and all of A wait for room
    assert all(not any(j in flood for j in jobs) for _, jobs, _ in sink.sent)


async def test_batch_work_leaves_the_headroom_free_and_interactive_work_takes_it(autojump_clock,
                                                                                 nursery):
    sink = RecordingSink(free=5)
    sink.reserve = 1  # a slot batch work leaves free
    scheduler = await started(sink, nursery=nursery)
    scheduler.submit(job("B", at=trio.current_time()))  # interactive traffic: the headroom holds
    await trio.sleep(0)
    batch_jobs = [job("A", tier="batch", at=trio.current_time()) for _ in range(6)]
    for queued in batch_jobs:
        scheduler.submit(queued)
    await trio.sleep(10 * MAX_WAIT_S)
    assert sum(len(jobs) for _, jobs, _ in sink.sent) == 4  # B's, and 3 of A's: 1 of 5 kept
    interactive = job("B", at=trio.current_time())
    scheduler.submit(interactive)
    await trio.sleep(MAX_WAIT_S / 10)
    assert sink.sent[-1][1] == [interactive] and sink.sent[-1][0] == 10 * MAX_WAIT_S  # at once

async def test_idle_capacity_goes_to_batch_work_once_interactive_traffic_is_not_recent(
        autojump_clock, nursery):
    """Work-conserving: the headroom may delay batch work, never stop it. With no interactive
    arrival for INTERACTIVE_RECENT_S, batch work takes the slots that were kept."""
    sink = RecordingSink(free=3)
    sink.reserve = 2
    scheduler = await started(sink, nursery=nursery)
    scheduler.submit(job("B", at=trio.current_time()))
    await trio.sleep(0)
    for _ in range(4):
        scheduler.submit(job("A", tier="batch", at=trio.current_time()))
    await trio.sleep(1)
    assert [len(jobs) for _, jobs, _ in sink.sent] == [1]  # 2 free, both kept
    await trio.sleep(INTERACTIVE_RECENT_S)
    assert [(t, len(jobs)) for t, jobs, _ in sink.sent][1:] == [(INTERACTIVE_RECENT_S, 2)]


async def test_batch_work_with_no_interactive_traffic_takes_every_free_slot(autojump_clock,
                                                                           nursery):
    sink = RecordingSink(free=4)
    sink.reserve = 1
    scheduler = await started(sink, nursery=nursery)
    for _ in range(6):
        scheduler.submit(job("A", tier="batch", at=trio.current_time()))
    await trio.sleep(1)
    assert [len(jobs) for _, jobs, _ in sink.sent] == [4]


@pytest.mark.parametrize("max_num_seqs, kept", [(1, 0), (2, 1), (256, 32)])
def test_the_headroom_never_takes_a_whole_engine(max_num_seqs, kept):
    """An eighth of each engine is kept (rounded up), never all of it: an idle engine with
    max_num_seqs 1 takes batch work even while interactive traffic is recent."""
    assert batch_headroom(max_num_seqs, 0.125) == kept
