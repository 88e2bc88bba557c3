"""Micro-batching: per-model bounded queues, and the loop that turns them into batches.

A batch leaves when it holds `max_batch_size` jobs, or `max_wait_s` after its oldest job arrived,
whichever comes first, and only when a ready worker has a free batch slot: while every slot is busy
the queue keeps filling, so the next batch leaves fuller.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Iterable
from typing import Protocol

import trio

from server.errors import NoWorkers, QueueFull
from server.jobs import Job

log = logging.getLogger("cohort.scheduler")


class ModelQueue:
    """The queue policy for one model, with no tasks in it: what waits, and what leaves next."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._jobs: collections.deque[Job] = collections.deque()
        self._changed = trio.Event()

    def __len__(self) -> int:
        return len(self._jobs)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def push(self, job: Job) -> None:
        """Queue a new job, or refuse it with QueueFull when the queue is at its bound."""
        if len(self._jobs) >= self.max_size:
            raise QueueFull(
                f"the queue for model {job.spec.model!r} holds {self.max_size} requests; "
                "retry later (COHORT_MAX_QUEUE sets the bound)")
        self._jobs.append(job)
        self._notify()

    def push_front(self, jobs: Iterable[Job]) -> None:
        """Put jobs back at the head (a retry after a worker died); the bound does not apply."""
        self._jobs.extendleft(reversed(list(jobs)))
        self._notify()

    def oldest_arrival(self) -> float | None:
        self._drop_cancelled()
        return self._jobs[0].enqueued_at if self._jobs else None

    def take(self, max_jobs: int) -> list[Job]:
        """Remove and return up to `max_jobs` live jobs, oldest first."""
        batch: list[Job] = []
        while self._jobs and len(batch) < max_jobs:
            job = self._jobs.popleft()
            if job.state == "queued":
                batch.append(job)
        return batch

    def drain(self) -> list[Job]:
        jobs = self.take(len(self._jobs))
        self._notify()
        return jobs

    def _drop_cancelled(self) -> None:
        while self._jobs and self._jobs[0].state != "queued":
            self._jobs.popleft()

    def live_count(self) -> int:
        return sum(1 for job in self._jobs if job.state == "queued")

    async def wait_changed(self) -> None:
        await self._changed.wait()


class BatchSink(Protocol):
    """What the scheduler needs from the dispatcher."""

    async def wait_for_slot(self, model: str) -> None:
        """Return once some ready worker of `model` can take another batch."""

    async def send_batch(self, model: str, jobs: list[Job]) -> bool:
        """Hand a batch to the least busy ready worker; False if none could take it now."""


class Scheduler:
    """Owns one ModelQueue and one batching task per model, in the nursery it is started in."""

    def __init__(self, sink: BatchSink, *, max_batch_size: int, max_wait_s: float,
                 max_queue: int) -> None:
        self.sink = sink
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.queues: dict[str, ModelQueue] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; the batching tasks live in this nursery."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started(self)
            await trio.sleep_forever()

    def submit(self, job: Job) -> None:
        """Queue a job (QueueFull if its model's queue is at its bound)."""
        queue = self.queues.get(job.spec.model)
        if queue is None:
            if self._nursery is None:
                raise RuntimeError("the scheduler is not running")
            queue = self.queues[job.spec.model] = ModelQueue(self.max_queue)
            self._nursery.start_soon(self._batch_loop, job.spec.model, queue)
        queue.push(job)

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs whose worker died back at the head of their queues."""
        for job in jobs:
            self.queues[job.spec.model].push_front([job])

    def fail_queued(self, model: str, error: NoWorkers) -> None:
        """The model lost its last ready worker: fail what waits for it now, not at its deadline."""
        queue = self.queues.get(model)
        if queue is not None:
            for job in queue.drain():
                job.fail(error)

    def queued(self) -> dict[str, int]:
        return {model: queue.live_count() for model, queue in self.queues.items()}

    async def _batch_loop(self, model: str, queue: ModelQueue) -> None:
        while True:
            while queue.oldest_arrival() is None:
                await queue.wait_changed()
            await self.sink.wait_for_slot(model)
            oldest = queue.oldest_arrival()
            if oldest is None:  # cancelled or failed while we waited for a slot
                continue
            # The window is counted from the oldest job's arrival, not from when a slot freed up.
            with trio.move_on_at(oldest + self.max_wait_s):
                # len() bounds the live count from above: the O(n) count runs only near full
                while len(queue) < self.max_batch_size or queue.live_count() < self.max_batch_size:
                    await queue.wait_changed()
            batch = queue.take(self.max_batch_size)
            if batch and not await self.sink.send_batch(model, batch):
                queue.push_front(batch)
                await trio.sleep(0)  # the sink had no slot after all: let its state move on
