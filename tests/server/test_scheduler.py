"""The batching loop's rules, exactly, in virtual time (trio's MockClock with autojump)."""

import pytest
import trio
import trio.testing

from server.errors import NoWorkers, QueueFull
from server.jobs import Job, JobSpec
from server.scheduler import Scheduler
from server.scheduling.policy import SchedulingPolicy
from server.scheduling.queue import ModelQueue

MAX_WAIT_S = 0.1


class RecordingSink:
    """Stands in for the dispatcher: `free` sequences of room, and a record of what left when."""

    def __init__(self, free: int = 1_000, takes: bool = True) -> None:
        self.free = free
        self.takes = takes  # False: no worker reads (every send comes back)
        self.backlog = 1_000  # what may be forced into the engines' queues
        self.holding: dict[str, tuple[int, float]] = {}  # per tenant: sequences held, weight
        self.seqs = 0  # the engines' max_num_seqs together (0: no shares to keep)
        self.reserve = 0  # slots batch work leaves free
        self.sent: list[tuple[float, list[Job], bool]] = []
        self.beyond: list[Job] = []  # sent beyond the backlog bound
        self._changed = trio.Event()

    def room(self, model: str) -> int:
        return self.free

    def backlog_room(self, model: str) -> int:
        return self.backlog

    def held(self, model: str) -> dict[str, tuple[int, float]]:
        return self.holding

    def capacity(self, model: str) -> int:
        return self.seqs

    def headroom(self, model: str) -> int:
        return self.reserve

    async def wait_for_change(self) -> None:
        await self._changed.wait()

    async def send_batch(self, model: str, jobs: list[Job], *, force: bool = False,
                         beyond_backlog: bool = False) -> list[Job]:
        if not self.takes:
            return jobs
        self.free = max(0, self.free - len(jobs))
        self.sent.append((trio.current_time(), jobs, force))
        self.beyond.extend(jobs if beyond_backlog else [])
        for sent in jobs:  # what the dispatcher's `held` would count next
            seqs, weight = self.holding.get(sent.spec.tenant, (0, sent.spec.weight))
            self.holding[sent.spec.tenant] = (seqs + sent.seqs, weight)
        return []

    def set_free(self, free: int) -> None:
        self.free = free
        self._changed.set()
        self._changed = trio.Event()


def job(model: str = "m", **state) -> Job:
    now = trio.current_time()
    made = Job(JobSpec(model, "completions", {"prompt": "hi"}), now, now + 60)
    for key, value in state.items():
        setattr(made, key, value)
    return made


async def started(sink, *, max_batch_size=4, max_queue=100, nursery) -> Scheduler:
    scheduler = Scheduler(sink, SchedulingPolicy(max_batch_size=max_batch_size,
                                                 max_wait_s=MAX_WAIT_S, max_queue=max_queue))
    await nursery.start(scheduler.run)
    return scheduler


def timeline(sink: RecordingSink, t0: float) -> list[tuple[float, int, bool]]:
    return [(round(t - t0, 9), len(jobs), force) for t, jobs, force in sink.sent]


async def test_a_request_leaves_at_once_while_a_worker_has_room(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, nursery=nursery)
    t0 = trio.current_time()
    scheduler.submit(job())
    await trio.sleep(0.03)
    scheduler.submit(job())
    await trio.sleep(1)
    assert timeline(sink, t0) == [(0, 1, False), (0.03, 1, False)]


async def test_what_arrives_together_leaves_together_up_to_the_batch_size(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, max_batch_size=4, nursery=nursery)
    t0 = trio.current_time()
    for _ in range(6):
        scheduler.submit(job())
    await trio.sleep(1)
    assert timeline(sink, t0) == [(0, 4, False), (0, 2, False)]


async def test_room_bounds_the_batch_and_the_rest_waits(autojump_clock, nursery):
    sink = RecordingSink(free=2)
    scheduler = await started(sink, max_batch_size=8, nursery=nursery)
    t0 = trio.current_time()
    for _ in range(5):
        scheduler.submit(job())
    await trio.sleep(0.04)
    sink.set_free(8)  # a report: the engine finished some sequences
    await trio.sleep(0.01)
    assert timeline(sink, t0) == [(0, 2, False), (0.04, 3, False)]


async def test_while_every_worker_is_full_requests_gather_until_room_appears(autojump_clock, nursery):
    sink = RecordingSink(free=0)
    scheduler = await started(sink, max_batch_size=8, nursery=nursery)
    t0 = trio.current_time()
    scheduler.submit(job())
    await trio.sleep(0.02)
    scheduler.submit(job())
    scheduler.submit(job())
    await trio.sleep(0.03)
    sink.set_free(100)
    await trio.sleep(1)
    assert timeline(sink, t0) == [(0.05, 3, False)]


async def test_the_window_bounds_the_wait_then_the_engines_queue_takes_them(autojump_clock, nursery):
    sink = RecordingSink(free=0)
    scheduler = await started(sink, max_batch_size=8, nursery=nursery)
    t0 = trio.current_time()
    scheduler.submit(job())
    await trio.sleep(0.03)
    scheduler.submit(job())
    await trio.sleep(1)
    # counted from the oldest job's arrival; both leave, forced, when its window closes
    assert timeline(sink, t0) == [(MAX_WAIT_S, 2, True)]


async def test_jobs_nobody_takes_go_back_in_front_and_wait_for_a_change(autojump_clock, nursery):
    sink = RecordingSink(takes=False)
    scheduler = await started(sink, nursery=nursery)
    first, second = job(), job()
    scheduler.submit(first)
    scheduler.submit(second)
    await trio.sleep(1)
    assert sink.sent == [] and scheduler.queued() == {"m": 2}
    sink.takes = True
    sink.set_free(10)
    await trio.sleep(0.001)
    assert [jobs for _, jobs, _ in sink.sent] == [[first, second]]


async def test_batches_are_per_model(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, nursery=nursery)
    scheduler.submit(job("a"))
    scheduler.submit(job("b"))
    scheduler.submit(job("a"))
    await trio.sleep(1)
    models = sorted(tuple(j.spec.model for j in jobs) for _, jobs, _ in sink.sent)
    assert models == [("a", "a"), ("b",)]


async def test_cancelled_jobs_never_leave(autojump_clock, nursery):
    sink = RecordingSink()
    scheduler = await started(sink, nursery=nursery)
    keep, drop = job(), job()
    scheduler.submit(drop)
    scheduler.submit(keep)
    drop.state = "cancelled"
    await trio.sleep(1)
    assert [jobs for _, jobs, _ in sink.sent] == [[keep]]


async def test_full_queue_refuses_with_queue_full(autojump_clock, nursery):
    sink = RecordingSink(free=0)
    scheduler = await started(sink, max_queue=2, nursery=nursery)
    scheduler.submit(job())
    scheduler.submit(job())
    with pytest.raises(QueueFull) as refused:
        scheduler.submit(job())
    assert refused.value.status == 429 and refused.value.headers["Retry-After"]


async def test_requeued_jobs_go_first_and_fail_queued_fails_all(autojump_clock, nursery):
    sink = RecordingSink(free=0)
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
    jobs = [Job(JobSpec("m", "completions", {}), 0.0, 1.0) for _ in range(5)]
    for item in jobs:
        queue.push(item)
    jobs[1].state = "cancelled"
    assert queue.take(3) == [jobs[0], jobs[2], jobs[3]]
    assert queue.live_count() == 1
