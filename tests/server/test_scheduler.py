"""Batching rules, exactly, in virtual time (trio's MockClock with autojump)."""

import pytest
import trio
import trio.testing

from server.errors import NoWorkers, QueueFull
from server.jobs import Job, JobSpec
from server.scheduler import ModelQueue, Scheduler

MAX_WAIT_S = 0.1


class RecordingSink:
    """Stands in for the dispatcher: `slots` free batch slots, and a record of what left when."""

    def __init__(self, slots: int = 1_000) -> None:
        self.slots = slots
        self.sent: list[tuple[float, list[Job]]] = []
        self._changed = trio.Event()

    async def wait_for_slot(self, model: str) -> None:
        while self.slots == 0:
            await self._changed.wait()

    async def send_batch(self, model: str, jobs: list[Job]) -> bool:
        self.slots -= 1
        self.sent.append((trio.current_time(), jobs))
        return True

    def free_slot(self) -> None:
        self.slots += 1
        self._changed.set()
        self._changed = trio.Event()


def job(model: str = "m", **state) -> Job:
    now = trio.current_time()
    made = Job(JobSpec(model, "completion", {"n": 1}, prompt="hi"), now, now + 60)
    for key, value in state.items():
        setattr(made, key, value)
    return made


async def started(sink, *, max_batch_size=4, max_queue=100, nursery) -> Scheduler:
    scheduler = Scheduler(sink, max_batch_size=max_batch_size, max_wait_s=MAX_WAIT_S,
                          max_queue=max_queue)
    await nursery.start(scheduler.run)
    return scheduler


async def test_partial_batch_leaves_exactly_at_max_wait(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, nursery=nursery)
    t0 = trio.current_time()
    scheduler.submit(job())
    await trio.sleep(0.03)
    scheduler.submit(job())
    await trio.sleep(1)
    assert [(round(t - t0, 9), len(jobs)) for t, jobs in sink.sent] == [(MAX_WAIT_S, 2)]


async def test_full_batch_leaves_at_once(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, max_batch_size=4, nursery=nursery)
    t0 = trio.current_time()
    for _ in range(6):
        scheduler.submit(job())
    await trio.sleep(1)
    # four leave at t0 (full), the other two when the window of the oldest of them closes
    assert [(round(t - t0, 9), len(jobs)) for t, jobs in sink.sent] == [(0, 4), (MAX_WAIT_S, 2)]


async def test_window_counts_from_the_oldest_job_not_from_a_free_slot(autojump_clock, nursery):
    sink = RecordingSink(slots=0)
    scheduler = await started(sink, max_batch_size=8, nursery=nursery)
    t0 = trio.current_time()
    scheduler.submit(job())
    await trio.sleep(0.5)  # no worker slot for 0.5 s: the queue keeps filling meanwhile
    scheduler.submit(job())
    scheduler.submit(job())
    sink.free_slot()
    await trio.sleep(1)
    assert [(round(t - t0, 9), len(jobs)) for t, jobs in sink.sent] == [(0.5, 3)]


async def test_batches_are_per_model(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, nursery=nursery)
    scheduler.submit(job("a"))
    scheduler.submit(job("b"))
    scheduler.submit(job("a"))
    await trio.sleep(1)
    models = sorted(tuple(j.spec.model for j in jobs) for _, jobs in sink.sent)
    assert models == [("a", "a"), ("b",)]


async def test_cancelled_jobs_never_leave(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, nursery=nursery)
    keep, drop = job(), job()
    scheduler.submit(drop)
    scheduler.submit(keep)
    drop.state = "cancelled"
    await trio.sleep(1)
    assert [jobs for _, jobs in sink.sent] == [[keep]]


async def test_full_queue_refuses_with_queue_full(autojump_clock, nursery):
    sink = RecordingSink(slots=0)
    scheduler = await started(sink, max_queue=2, nursery=nursery)
    scheduler.submit(job())
    scheduler.submit(job())
    with pytest.raises(QueueFull) as refused:
        scheduler.submit(job())
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]


async def test_requeued_jobs_go_first_and_fail_queued_fails_all(autojump_clock, nursery):
    sink = RecordingSink(slots=0)
    scheduler = await started(sink, nursery=nursery)
    waiting, retried = job(), job(attempts=1)
    scheduler.submit(waiting)
    scheduler.requeue([retried])
    assert scheduler.queues["m"].take(2) == [retried, waiting]
    scheduler.submit(waiting)
    scheduler.fail_queued("m", NoWorkers("gone"))
    assert isinstance(waiting.outputs.receive_nowait(), NoWorkers)
    assert scheduler.queued() == {"m": 0}


def test_model_queue_take_skips_finished_and_respects_the_limit():
    queue = ModelQueue(max_size=10)
    jobs = [Job(JobSpec("m", "completion", {}), 0.0, 1.0) for _ in range(5)]
    for item in jobs:
        queue.push(item)
    jobs[1].state = "cancelled"
    assert queue.take(3) == [jobs[0], jobs[2], jobs[3]]
    assert queue.live_count() == 1
